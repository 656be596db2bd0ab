"""Instruction data for the trainer: files of records (.jsonl, .json, .parquet, .arrow: records.py), one example per
record, in the formats TRL's SFTTrainer reads, each tokenized with a mask of the tokens that are trained on (the
others are context only: their labels are ignored by the loss, as TRL's completion-only and assistant-only losses
do):

    {"text": "..."}                                  every token (and an end-of-sequence token)
    {"prompt": "...", "completion": "..."}           the completion's tokens and an end-of-sequence token
        (both start with the tokenizer's BOS, or whatever special tokens tokenizer(text) puts first, as context)
    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}
        rendered by the tokenizer's chat template; the assistant turns, their end-of-turn marks included
    {"prompt": [messages], "completion": [messages]}  a conversation whose completion's assistant turns are trained

Function calling, as TRL and transformers' chat templates take it: a conversation's record may hold "tools" (a
list of JSON-schema function definitions, or that list as a JSON string), passed to the template as `tools=`, and
an assistant message may hold "tool_calls" ([{"type": "function", "function": {"name", "arguments"}}], content
then optional); the tool calls are trained on with their turn, the tools' definitions and the "tool" messages
(the results) are context. A template that would leave the tools or a tool call out of the text is an error.

Other keys of a record (an id, a source) are ignored. A conversation is rendered whole, once; each assistant turn
starts where the template puts its content (found by rendering the conversation with a stand-in content for
that message) and ends where the rendering of the conversation up to that message ends (or, for a template that
renders a last turn differently, after its content and its end-of-turn mark). The text is tokenized whole,
and a token is trained on when its last character lies in a trained span: the tokens are those of the rendered
text, with no token of its own at a piece boundary.
"""
from __future__ import annotations

import dataclasses
import json
from typing import List, Optional, Sequence, Tuple

from .config import ConfigError

ROLES = ("system", "user", "assistant", "tool", "ipython")   # ipython: Llama 3.1's tool results


_SENTINEL = "\x00qlora_ext\x00"   # a stand-in content, to find where the template puts a message's content


def _render(tokenizer, messages, tools=None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=generation_prompt)


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


def _assistant_spans(tokenizer, messages: list, first: int, where: str,
                     tools: Optional[list] = None) -> Tuple[str, List[Tuple[int, int]]]:
    """(the conversation as the chat template renders it, the character spans of the assistant turns from message
    `first` on). A turn starts where the template puts its content (found by rendering the conversation with a
    stand-in content for it) and ends where the rendering of the conversation up to it ends, its end-of-turn
    mark included; when that is not how the whole conversation goes on (a template that renders a last turn
    differently, as Qwen3's does), after its content and the end-of-turn mark the template gives a last turn (or
    the end-of-sequence mark), where the conversation has it. A turn of tool calls alone: _call_only_span. The
    tool calls of every message must be in the text, and those of a trained turn within its span."""
    full = _render(tokenizer, messages, tools)
    eos = getattr(tokenizer, "eos_token", None) or ""
    calls = {k: _calls_region(tokenizer, messages, k, tools, full, where)
             for k, m in enumerate(messages) if m.get("tool_calls")}
    spans = []
    for k in range(first, len(messages)):
        if messages[k]["role"] != "assistant":
            continue
        if k in calls and not messages[k]["content"]:
            start, end = _call_only_span(tokenizer, messages, k, tools, full, where)
        else:
            start, end = _content_span(tokenizer, messages, k, tools, full, eos, where)
        lo, hi = calls.get(k, (start, end))
        if not (start <= lo or full[lo:start].isspace()) or not (hi <= end or full[end:hi].isspace()):
            raise ConfigError(f"{where}: the tokenizer's chat template puts the tool calls of message {k} outside "
                              "the turn's text from its content on (before the content?): they would not be "
                              "trained on")
        spans.append((start, end))
    return full, spans


def _content_span(tokenizer, messages: list, k: int, tools, full: str, eos: str, where: str) -> Tuple[int, int]:
    """The span of assistant message k with a content (see _assistant_spans)."""
    stand_in = _render(tokenizer, messages[:k] + [dict(messages[k], content=_SENTINEL)] + messages[k + 1:], tools)
    cut = stand_in.find(_SENTINEL)
    before, after = stand_in[:cut], stand_in[cut + len(_SENTINEL):]
    if cut < 0 or not full.startswith(before) or not full.endswith(after) or len(before) + len(after) > len(full):
        why = ("drops the content beside its tool calls, or changes other text with it" if messages[k].get("tool_calls")
               else "changes other text with its content")
        raise ConfigError(f"{where}: the tokenizer's chat template renders message {k} (the assistant's) in a way "
                          f"that cannot be located in the conversation (it {why})")
    start, content_end = len(before), len(full) - len(after)
    upto = _render(tokenizer, messages[:k + 1], tools)
    if full.startswith(upto) and len(upto) >= content_end:
        return start, len(upto)
    # the end-of-turn mark the template puts after this turn's content when it is the last one
    last = _render(tokenizer, messages[:k] + [dict(messages[k], content=_SENTINEL)], tools)
    mark = last[last.find(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in last else ""
    if not (mark and full.startswith(mark, content_end)):
        mark = eos if eos and full.startswith(eos, content_end) else ""
    return start, content_end + len(mark)


def _calls_region(tokenizer, messages: list, k: int, tools, full: str, where: str) -> Tuple[int, int]:
    """Where message k's tool calls are in `full`: the characters that change when they are left out (with the
    whitespace that separates them from the content). None change in a template without function calling, which
    would train a turn on a reply the data does not hold."""
    without = _render(tokenizer, messages[:k] + [{key: v for key, v in messages[k].items() if key != "tool_calls"}]
                      + messages[k + 1:], tools)
    if without == full:
        raise ConfigError(f"{where}: the tokenizer's chat template does not render \"tool_calls\" (message {k}; "
                          f"{'the record has no' if tools is None else 'with'} \"tools\"): use a model whose template "
                          "supports function calling (tools=, tool_calls)")
    lo = 0
    while lo < min(len(full), len(without)) and full[lo] == without[lo]:
        lo += 1
    common_tail = 0
    while common_tail < min(len(full), len(without)) - lo and full[-1 - common_tail] == without[-1 - common_tail]:
        common_tail += 1
    return lo, len(full) - common_tail


def _call_only_span(tokenizer, messages: list, k: int, tools, full: str, where: str) -> Tuple[int, int]:
    """The span of assistant message k made of tool calls alone. It starts where the template puts a content
    (with a stand-in content), or, for a template that drops content beside calls, where its generation prompt
    after the messages before ends; it ends where the conversation up to it ends, or, where the template renders
    a last turn differently (Qwen3's think block), where the calls and the end-of-turn mark of such a last turn
    end in the conversation."""
    message = dict(messages[k], content=_SENTINEL)
    stand_in = _render(tokenizer, messages[:k] + [message] + messages[k + 1:], tools)
    cut = stand_in.find(_SENTINEL)
    start = cut if cut >= 0 and full.startswith(stand_in[:cut]) else None
    if start is None:
        try:   # a template may refuse a conversation cut before message k (Llama 3.1 with tools, no user yet)
            bare = _render(tokenizer, messages[:k], tools) if k else ""
            prompt = _render(tokenizer, messages[:k], tools, generation_prompt=True)
        except Exception:
            bare = prompt = ""
        if len(prompt) > len(bare) and full.startswith(prompt):   # (no generation prompt: the header is unknown)
            start = len(prompt)
    upto = _render(tokenizer, messages[:k + 1], tools)
    end = len(upto) if full.startswith(upto) else None
    if end is None and start is not None:   # this turn's calls and end mark as a last turn renders them
        last = _render(tokenizer, messages[:k] + [message], tools)
        tail = last[last.find(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in last else ""
        # (a separator between content and calls, such as Qwen's newline, is not there without the content)
        end = next((start + len(tail) - i for i in range(min(8, len(tail))) if full.startswith(tail[i:], start)),
                   None)
    if start is None or end is None or end <= start:
        raise ConfigError(f"{where}: the tokenizer's chat template renders message {k} (the assistant's tool calls) "
                          "in a way that cannot be located in the conversation (where it starts or ends)")
    return start, end


def _conversation(tokenizer, messages, where: str, first: int = 0,
                  tools=None) -> Tuple[str, List[Tuple[int, int]]]:
    """(the chat template's text of a conversation, the character spans of its assistant turns from message
    `first` on: those trained)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: \"messages\" need a tokenizer with a chat template, and this one has none "
                          "(give the run one: --chat-template chatml, a .jinja file or a tokenizer folder; or use "
                          "{\"prompt\", \"completion\"} records instead)")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
    messages = [_checked_message(m, where) for m in messages]
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise ConfigError(f"{where}: a conversation without an assistant message has nothing to train on")
    tools = _checked_tools(tools, where)
    if tools is not None and _render(tokenizer, messages, tools) == _render(tokenizer, messages):
        raise ConfigError(f"{where}: the tokenizer's chat template leaves \"tools\" out of the text (it has no "
                          "function calling): use a model whose template supports tools=")
    return _assistant_spans(tokenizer, messages, first, where, tools)


def _checked_message(m, where: str) -> dict:
    """A message as the template gets it; an assistant's tool calls may come without content (None, missing: "",
    which templates test for)."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ConfigError(f"{where}: each message must be {{\"role\": one of {ROLES}, \"content\": a string}}, "
                          f"got {m!r}")
    calls = m.get("tool_calls")
    if calls == []:   # (exports write it for "no calls")
        m, calls = {key: v for key, v in m.items() if key != "tool_calls"}, None
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list) or \
                not all(isinstance(c, dict) for c in calls):
            raise ConfigError(f"{where}: \"tool_calls\" must be a list of objects ({{\"type\": "
                              f"\"function\", \"function\": {{\"name\", \"arguments\"}}}}) on an assistant message, "
                              f"got {m!r}")
        if m.get("content") is None:
            m = dict(m, content="")
    if m["role"] in ("tool", "ipython") and isinstance(m.get("content"), (dict, list)):
        return m   # a tool's result as JSON (Llama 3.1's template renders it with tojson)
    if not isinstance(m.get("content"), str):
        what = "null or missing" if m.get("content") is None else type(m["content"]).__name__
        raise ConfigError(f"{where}: a message's \"content\" must be a string (it may be null or missing only "
                          f"beside \"tool_calls\"), got {what} in {m!r}")
    return m


def _checked_tools(tools, where: str) -> Optional[list]:
    """A record's "tools": a list of function definitions (objects), or that list as a JSON string (as datasets
    often store it); None when the record has none."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: \"tools\" is a string but not JSON ({e})") from e
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConfigError(f"{where}: \"tools\" must be a list of function definitions (JSON objects), got "
                          f"{tools!r}"[:300])
    return tools or None


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
    tools = record.get("tools")
    conversational = kinds[0] == "messages" or isinstance(record.get("prompt"), list)
    if tools is not None and not conversational:
        raise ConfigError(f"{where}: \"tools\" go with conversations (\"messages\", or prompt and completion as "
                          "lists of messages), whose chat template renders them")
    if kinds[0] == "messages":
        return RenderedRecord(where, *_conversation(tokenizer, record["messages"], where, tools=tools),
                              "conversation")
    if kinds[0] == "text":
        if not isinstance(record["text"], str):
            raise ConfigError(f"{where}: \"text\" must be a string, got {type(record['text']).__name__}")
        return RenderedRecord(where, record["text"], [], "text")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):   # TRL's conversational prompt-completion
        return RenderedRecord(where, *_conversation(tokenizer, prompt + completion, where, first=len(prompt),
                                                    tools=tools), "conversation")
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
