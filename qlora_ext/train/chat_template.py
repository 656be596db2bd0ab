"""--chat-template: a chat template for a run whose tokenizer has none (a base model trained on conversations)
or should use another, as TRL's `chat_template_path` gives one. The flag names a template file, a tokenizer
folder whose template to take, "chatml", or is the template's text; the run's config keeps the text itself, so
a resume, `merge` (whose tokenizer is saved with it), `eval` and `generate --chat` render as training did
without the file."""
import json
import os
import re
from typing import Callable, List, Optional

from .config import ConfigError

# ChatML (as SmolLM2 and Qwen render conversations): "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BUILTIN = {"chatml": CHATML}


def is_template_text(value: str) -> bool:
    """Whether value is a Jinja template's text rather than a name or a path (a chat template prints or loops)."""
    return "{{" in value or "{%" in value


def resolve_chat_template(value: Optional[str]) -> Optional[str]:
    """The template text that --chat-template `value` names: "chatml"; the text itself; a file holding the
    template (a .jinja file, or a .json file with a "chat_template" entry, as tokenizer_config.json); or a
    folder with chat_template.jinja or a tokenizer_config.json that has one (a model or tokenizer directory).
    ConfigError naming the flag otherwise."""
    if value is None or is_template_text(value):
        return value
    if value in BUILTIN:
        return BUILTIN[value]
    flag = f"--chat-template {value!r}"
    value = os.path.expanduser(value)
    if os.path.isdir(value):
        # transformers 5 saves chat_template.jinja; processors chat_template.json; older tokenizers keep it in
        # tokenizer_config.json
        for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            path = os.path.join(value, name)
            if os.path.isfile(path):
                text = _read_template(path, flag)
                if text is not None:
                    return text
        raise ConfigError(f"{flag}: the folder has no chat_template.jinja, and no chat_template.json or "
                          "tokenizer_config.json with a chat_template")
    if not os.path.isfile(value):
        raise ConfigError(f"{flag} is not a file, a folder, a template's text or one of {sorted(BUILTIN)}")
    text = _read_template(value, flag)
    if text is None:
        raise ConfigError(f"{flag}: the JSON file has no \"chat_template\" entry")
    return text


def _read_template(path: str, flag: str) -> Optional[str]:
    """The template in path: a .json file's "chat_template" (its "default" one where it holds named templates;
    None if it has none), else the file's text."""
    try:
        with open(path, encoding="utf-8-sig") as f:   # (a byte-order mark is not part of the template)
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}: cannot read {path}: {e}") from e
    if not path.lower().endswith(".json"):
        if not is_template_text(text):
            raise ConfigError(f"{flag}: {path} holds no Jinja template (no {{{{ }}}} or {{% %}})")
        return text
    try:
        entry = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{flag}: {path} is not a JSON object: {e}") from e
    if isinstance(entry, list):   # named templates ([{"name": "default", "template": ...}, ...])
        named = {t.get("name"): t.get("template") for t in entry if isinstance(t, dict)}
        entry = named.get("default")
        if entry is None:
            raise ConfigError(f"{flag}: {path} holds named chat templates {sorted(map(str, named))} and no "
                              "\"default\" one: give the template itself")
    if entry is not None and not (isinstance(entry, str) and is_template_text(entry)):
        # (the config keeps the text, and reads a value that is not template text as a name or path again)
        raise ConfigError(f"{flag}: the chat_template of {path} is not a Jinja template ({str(entry)[:60]!r})")
    return entry


def use_chat_template(tokenizer, template: str, log: Callable[[str], None] = print) -> None:
    """Gives tokenizer the template, after checking that it renders a short conversation (with and without the
    generation prompt; no system message, which some templates refuse); notes the template's markers that are
    not single tokens of this tokenizer (they are then trained as the several tokens that spell them: adding
    them as tokens needs new embedding rows, which this trainer does not do)."""
    probe = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello."}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False, chat_template=template)
        tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True, chat_template=template)
    except Exception as e:   # jinja2's errors, the template's raise_exception
        raise ConfigError(f"--chat-template: the template cannot render a user, assistant conversation: "
                          f"{type(e).__name__}: {e}") from e
    tokenizer.chat_template = template
    spelled = [m for m in markers(template) if not _single_token(tokenizer, m)]
    if spelled:
        log(f"note: --chat-template: {', '.join(spelled)} {'is' if len(spelled) == 1 else 'are'} not a token of "
            "this tokenizer; the text spells it out of several tokens")


# What templates write as special tokens: <|...|> (ChatML's <|im_start|>, Llama 3's <|eot_id|>), <word> and
# </word> (Gemma's <start_of_turn>, Qwen3's <think>, </s>) and [WORD] / [/WORD] (Mistral's [INST]); not Llama 2's
# <<SYS>>, which is text by design, nor comparisons inside Jinja tags ("a<b and c>d" has spaces).
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|(?<!<)</?[A-Za-z][A-Za-z0-9_\-]*>(?!>)|\[/?[A-Z][A-Z_]*\]")


def markers(template: str) -> List[str]:
    """The special-token-like markers written in template (_MARKER), once each, in order."""
    return list(dict.fromkeys(_MARKER.findall(template)))


def _single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False).input_ids) == 1
