"""Instruction data for the trainer: files of records (.jsonl, .json, .parquet: records.py), one example per
record, in the formats TRL's SFTTrainer reads, each tokenized with a mask of the tokens that are trained on (the
others are context only: their labels are ignored by the loss, as TRL's completion-only and assistant-only losses
do):

    {"text": "..."}                                  every token (and an end-of-sequence token)
    {"prompt": "...", "completion": "..."}           the completion's tokens and an end-of-sequence token
        (both start with the tokenizer's BOS, or whatever special tokens tokenizer(text) puts first, as context)
    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}
        rendered by the tokenizer's chat template; the assistant turns, their end-of-turn marks included
    {"prompt": [messages], "completion": [messages]}  a conversation whose completion's assistant turns are trained

Other keys of a record (an id, a source) are ignored. A conversation is rendered whole, once; each assistant turn
starts where the template puts its content (found by rendering the conversation with a stand-in content for
that message) and ends where the rendering of the conversation up to that message ends (or, for a template that
renders a last turn differently, after its content and its end-of-turn mark). The text is tokenized whole,
and a token is trained on when its last character lies in a trained span: the tokens are those of the rendered
text, with no token of its own at a piece boundary.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from .config import ConfigError

ROLES = ("system", "user", "assistant", "tool")


_SENTINEL = "\x00qlora_ext\x00"   # a stand-in content, to find where the template puts a message's content


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _trained_flags(offsets, spans: Sequence[Tuple[int, int]], length: int) -> List[bool]:
    """Whether each token (its character offsets) is trained on: its last character lies in one of the spans
    [start, end), i.e. start < token end <= end (one pass over the text and one over the tokens)."""
    if not spans:
        return [False] * len(offsets)
    assert all(0 <= s <= e <= length for s, e in spans), (spans, length)
    inside = bytearray(length + 1)
    for s, e in spans:
        inside[s + 1:e + 1] = b"\x01" * max(e - s, 0)
    return [inside[b] == 1 for _, b in offsets]


def _tokens_batch(tokenizer, texts: Sequence[str],
                  spans: Sequence[Sequence[Tuple[int, int]]]) -> List[Tuple[List[int], List[bool]]]:
    """The tokens of each text and whether each is trained on: the text is tokenized whole, and a token is
    trained on when its last character lies in one of its character spans [start, end) (so a token that brings
    a space into a span, as SentencePiece's "▁" does, counts for the span). A fast tokenizer takes the texts in
    one call (its threads share them out); a slow tokenizer (no offsets) tokenizes each piece on its own."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return [(list(ids), _trained_flags(offsets, text_spans, len(text)))
                for ids, offsets, text, text_spans in zip(enc["input_ids"], enc["offset_mapping"], texts, spans)]
    out = []
    for text, text_spans in zip(texts, spans):
        ids: List[int] = []
        trained: List[bool] = []
        cuts = sorted({0, len(text), *(c for span in text_spans for c in span)})
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"] if b > a else []
            ids += piece
            trained += [any(s <= a and b <= e for s, e in text_spans)] * len(piece)
        out.append((ids, trained))
    return out


def _assistant_spans(tokenizer, messages: list, first: int, where: str) -> Tuple[str, List[Tuple[int, int]]]:
    """(the conversation as the chat template renders it, the character spans of the assistant turns from message
    `first` on). A turn starts where the template puts its content (found by rendering the conversation with a
    stand-in content for it) and ends where the rendering of the conversation up to it ends, its end-of-turn
    mark included; when that is not how the whole conversation goes on (a template that renders a last turn
    differently, as Qwen3's does), after its content and the end-of-turn mark the template gives a last turn (or
    the end-of-sequence mark), where the conversation has it."""
    full = _render(tokenizer, messages)
    eos = getattr(tokenizer, "eos_token", None) or ""
    spans = []
    for k in range(first, len(messages)):
        if messages[k]["role"] != "assistant":
            continue
        stand_in = _render(tokenizer, messages[:k] + [dict(messages[k], content=_SENTINEL)] + messages[k + 1:])
        cut = stand_in.find(_SENTINEL)
        before, after = stand_in[:cut], stand_in[cut + len(_SENTINEL):]
        if cut < 0 or not full.startswith(before) or not full.endswith(after) or len(before) + len(after) > len(full):
            raise ConfigError(f"{where}: the tokenizer's chat template renders message {k} (the assistant's) in a way "
                              "that cannot be located in the conversation (it changes other text with its content)")
        start, content_end = len(before), len(full) - len(after)
        upto = _render(tokenizer, messages[:k + 1])
        if full.startswith(upto) and len(upto) >= content_end:
            end = len(upto)
        else:  # the end-of-turn mark the template puts after this turn's content when it is the last one
            last = _render(tokenizer, messages[:k] + [dict(messages[k], content=_SENTINEL)])
            mark = last[last.find(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in last else ""
            if not (mark and full.startswith(mark, content_end)):
                mark = eos if eos and full.startswith(eos, content_end) else ""
            end = content_end + len(mark)
        spans.append((start, end))
    return full, spans


def _conversation(tokenizer, messages, where: str, first: int = 0) -> Tuple[str, List[Tuple[int, int]]]:
    """(the chat template's text of a conversation, the character spans of its assistant turns from message
    `first` on: those trained)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: \"messages\" need a tokenizer with a chat template, and this one has none "
                          "(use {\"prompt\", \"completion\"} records instead)")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
    for m in messages:
        if isinstance(m, dict) and m.get("tool_calls"):
            raise ConfigError(f"{where}: messages with \"tool_calls\" (function calling) are not supported: each "
                              f"message must be {{\"role\", \"content\": a string}}, got {m!r}")
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: each message must be {{\"role\": one of {ROLES}, \"content\": a string}}, "
                              f"got {m!r}")
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise ConfigError(f"{where}: a conversation without an assistant message has nothing to train on")
    return _assistant_spans(tokenizer, messages, first, where)


def special_prefix(tokenizer) -> List[int]:
    """The special tokens tokenizer(text) puts before a text's own tokens: [BOS] for Llama- and Mistral-style
    tokenizers, [] for most others. (A chat template writes its own, so a conversation gets none added.)"""
    for probe in ("a", "the", "0", " ", "."):
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        if not plain:   # a probe the vocabulary cannot spell (no unknown token): try another
            continue
        with_special = list(tokenizer(probe)["input_ids"])
        for i in range(len(with_special) - len(plain) + 1):
            if with_special[i:i + len(plain)] == plain:
                return with_special[:i]
        return []
    return []


def frame(ids: Sequence[int], prefix: Optional[Sequence[int]], end: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(the tokens to put before ids, those to put after): prefix and end. prefix None: the framing of runs from
    before --add-bos (nothing before, end after, always). Otherwise a prefix or an end the ids already have (a
    text that starts with "<s>" or ends with "</s>") is not added twice, as TRL adds them."""
    if prefix is None:
        return [], list(end)
    prefix, end, ids = list(prefix), list(end), list(ids)
    has_prefix = bool(prefix) and ids[:len(prefix)] == prefix
    has_end = bool(end) and ids[-len(end):] == end
    return ([] if has_prefix else prefix), ([] if has_end else end)


def text_trained(ids: Sequence[int], prefix: Optional[Sequence[int]]) -> List[bool]:
    """The trained flags of a framed text: every token but a leading prefix (added or the text's own), which is
    context."""
    n = len(prefix) if prefix and list(ids[:len(prefix)]) == list(prefix) else 0
    return [False] * n + [True] * (len(ids) - n)


@dataclasses.dataclass
class RenderedRecord:
    """A record as text, before tokenizing: the text, the character spans trained on, and how it is framed:
    "text" (every token but the prefix trained), "completion" (prompt + completion, the completion's span
    trained; both framed with the prefix and an end-of-sequence token) or "conversation" (a chat template's
    text, which writes its own special tokens)."""
    where: str
    text: str
    spans: List[Tuple[int, int]]
    kind: str


def render_record(tokenizer, record, where: str) -> RenderedRecord:
    """One record (see the module's docstring) as text to tokenize; other keys of the record (an id, a source)
    are ignored. A record of no known format is an error naming `where`."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    kinds = [k for k, keys in (("messages", {"messages"}), ("prompt", {"prompt", "completion"}), ("text", {"text"}))
             if keys <= set(record)]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: a record must hold exactly one of \"text\", \"prompt\" + \"completion\" or "
                          f"\"messages\", got the keys {sorted(record)}")
    if kinds[0] == "messages":
        return RenderedRecord(where, *_conversation(tokenizer, record["messages"], where), "conversation")
    if kinds[0] == "text":
        if not isinstance(record["text"], str):
            raise ConfigError(f"{where}: \"text\" must be a string, got {type(record['text']).__name__}")
        return RenderedRecord(where, record["text"], [], "text")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):   # TRL's conversational prompt-completion
        return RenderedRecord(where, *_conversation(tokenizer, prompt + completion, where, first=len(prompt)),
                              "conversation")
    for key in ("prompt", "completion"):
        if not isinstance(record[key], str):
            raise ConfigError(f"{where}: \"{key}\" must be a string (or both lists of messages), got "
                              f"{type(record[key]).__name__}")
    return RenderedRecord(where, prompt + completion, [(len(prompt), len(prompt) + len(completion))], "completion")


def tokenize_rendered(tokenizer, rendered: Sequence[RenderedRecord],
                      prefix: Optional[Sequence[int]] = None) -> List[Tuple[List[int], List[bool]]]:
    """(token ids, trained flag per token) of each rendered record, the texts tokenized in one call: a text or a
    prompt + completion starts with `prefix` (special_prefix(tokenizer)), as context, and ends with one
    end-of-sequence token (frame(); prefix None: as before --add-bos); a conversation is its template's tokens.
    An error of the tokenizer names the record it came from."""
    try:
        bodies = _tokens_batch(tokenizer, [r.text for r in rendered], [r.spans for r in rendered])
    except Exception as e:  # find the record (a lone surrogate, say) that the tokenizer refused
        if len(rendered) > 1:
            return [example for r in rendered for example in tokenize_rendered(tokenizer, [r], prefix)]
        raise ConfigError(f"{rendered[0].where}: {type(e).__name__}: {e}") from e
    eos = getattr(tokenizer, "eos_token_id", None)
    end = [eos] if eos is not None else []
    examples = []
    for r, (body, trained) in zip(rendered, bodies):
        if r.kind == "conversation":
            examples.append((body, trained))
            continue
        head, tail = frame(body, prefix, end)
        ids = head + body + tail
        if r.kind == "text":
            examples.append((ids, text_trained(ids, prefix)))
        else:
            examples.append((ids, [False] * len(head) + trained + [True] * len(tail)))
    return examples


def tokenize_record(tokenizer, record, where: str,
                    prefix: Optional[Sequence[int]] = None) -> Tuple[List[int], List[bool]]:
    """(token ids, trained flag per token) of one record (see the module's docstring): render_record, then
    tokenize_rendered."""
    return tokenize_rendered(tokenizer, [checked_render(tokenizer, record, where)], prefix)[0]


def checked_render(tokenizer, record, where: str) -> RenderedRecord:
    """render_record, with any error (a chat template's) a ConfigError naming `where`."""
    try:
        return render_record(tokenizer, record, where)
    except ConfigError:
        raise
    except Exception as e:  # a chat template's raise_exception (roles must alternate)
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from e
