"""Instruction data for the trainer: JSON Lines files (.jsonl), one example per line, in the formats TRL's SFTTrainer
reads, each tokenized with a mask of the tokens that are trained on (the others are context only: their labels
are ignored by the loss, as TRL's completion-only and assistant-only losses do):

    {"text": "..."}                                  every token (and an end-of-sequence token)
    {"prompt": "...", "completion": "..."}           the completion's tokens and an end-of-sequence token
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
        rendered by the tokenizer's chat template; the assistant turns' tokens (their end-of-turn marks included)

A conversation is rendered one message at a time (the chat template applied to the first k messages, and with
the generation prompt before an assistant turn; before a first message that is the assistant's, what the template
puts before its content), so each assistant turn is the text its message adds; a template
that rewrites earlier text when a message is added cannot be cut this way and is refused. Each piece is tokenized
on its own, so a token never spans a trained and an untrained piece.
"""
from __future__ import annotations

import json
from typing import List, Tuple

from .config import ConfigError

ROLES = ("system", "user", "assistant", "tool")


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


_SENTINEL = "\x00qlora_ext\x00"


def _before_first_assistant(tokenizer, message: dict) -> str:
    """What the template renders before the content of a conversation's first message when that is the
    assistant's (a default system prompt, the assistant header): the text before a stand-in content."""
    text = _render(tokenizer, [dict(message, content=_SENTINEL)], False)
    return text[:text.index(_SENTINEL)] if _SENTINEL in text else ""


def _conversation(tokenizer, messages: list, where: str) -> Tuple[List[int], List[bool]]:
    """(ids, trained) of a conversation: the chat template's text cut at each message, assistant turns trained."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: \"messages\" need a tokenizer with a chat template, and this one has none "
                          "(use {\"prompt\", \"completion\"} records instead)")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: each message must be {{\"role\": one of {ROLES}, \"content\": a string}}, "
                              f"got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: a conversation without an assistant message has nothing to train on")
    pieces: List[Tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = _render(tokenizer, messages[:k], True) if k else _before_first_assistant(tokenizer, m)
            if not prompt.startswith(done):
                break
            pieces.append((prompt[len(done):], False))
            done = prompt
        text = _render(tokenizer, messages[:k + 1], False)
        if not text.startswith(done):
            break
        pieces.append((text[len(done):], m["role"] == "assistant"))
        done = text
    else:
        ids: List[int] = []
        trained: List[bool] = []
        for text, train in pieces:
            piece = _ids(tokenizer, text)
            ids += piece
            trained += [train] * len(piece)
        return ids, trained
    raise ConfigError(f"{where}: the tokenizer's chat template rewrites earlier text when a message is added, so "
                      "the assistant turns cannot be cut out of the conversation")


def tokenize_record(tokenizer, record, where: str) -> Tuple[List[int], List[bool]]:
    """(token ids, trained flag per token) of one JSONL record (see the module's docstring)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    end = [eos] if eos is not None else []
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    keys = set(record)
    if keys == {"text"} and isinstance(record["text"], str):
        ids = _ids(tokenizer, record["text"]) + end
        return ids, [True] * len(ids)
    if keys == {"prompt", "completion"} and all(isinstance(record[k], str) for k in keys):
        prompt, completion = _ids(tokenizer, record["prompt"]), _ids(tokenizer, record["completion"]) + end
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if keys == {"messages"}:
        return _conversation(tokenizer, record["messages"], where)
    raise ConfigError(f"{where}: a record must be {{\"text\": str}}, {{\"prompt\": str, \"completion\": str}} or "
                      f"{{\"messages\": [...]}}, got the keys {sorted(keys)}")


def tokenize_jsonl(path: str, tokenizer) -> Tuple[List[int], List[bool]]:
    """The examples of the JSON Lines file `path`, one after the other: (token ids, trained flag per token).
    Blank lines are skipped; a line that is not a record of a known format is an error naming the line."""
    ids: List[int] = []
    trained: List[bool] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from e
            record_ids, record_trained = tokenize_record(tokenizer, record, where)
            ids += record_ids
            trained += record_trained
    if not ids:
        raise ConfigError(f"{path} holds no examples")
    return ids, trained
