"""--chat-template: what the flag may name (a name, the text, a .jinja or .json file, a tokenizer folder), the
errors that name it, and the tokenizer check (renders a conversation; markers that are not tokens noted)."""
import json

import pytest

from qlora_ext.train.chat_template import CHATML, markers, resolve_chat_template, use_chat_template
from qlora_ext.train.config import ConfigError, TrainConfig
# a byte-level BPE tokenizer with ChatML's markers as tokens (and Llama 3's not), a template of its own
from tests.test_instructions import tokenizer  # noqa: F401  (a fixture)

pytest.importorskip("transformers")

LLAMA3_LIKE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
               "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
               "\n\n{% endif %}")


def test_names_texts_files_and_folders_resolve_to_the_template_text(tmp_path):
    assert resolve_chat_template(None) is None
    assert resolve_chat_template("chatml") == CHATML
    assert resolve_chat_template(LLAMA3_LIKE) == LLAMA3_LIKE      # the text itself
    (tmp_path / "t.jinja").write_text(LLAMA3_LIKE)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == LLAMA3_LIKE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    assert resolve_chat_template(str(tmp_path / "tokenizer_config.json")) == CHATML
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert resolve_chat_template(str(folder)) == CHATML
    (folder / "chat_template.jinja").write_text(LLAMA3_LIKE)   # transformers 5 saves the template on its own
    assert resolve_chat_template(str(folder)) == LLAMA3_LIKE
    (tmp_path / "bom.jinja").write_bytes(b"\xef\xbb\xbf" + CHATML.encode())   # a byte-order mark is dropped
    assert resolve_chat_template(str(tmp_path / "bom.jinja")) == CHATML
    (tmp_path / "BOM.JSON").write_bytes(b"\xef\xbb\xbf" + json.dumps({"chat_template": CHATML}).encode())
    assert resolve_chat_template(str(tmp_path / "BOM.JSON")) == CHATML
    processor = tmp_path / "processor"
    processor.mkdir()
    (processor / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA3_LIKE}))
    assert resolve_chat_template(str(processor)) == LLAMA3_LIKE
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "{{ 1 }}"},
                                                   {"name": "default", "template": CHATML}]}))
    assert resolve_chat_template(str(named)) == CHATML
    # the config keeps the text: a saved run renders without the file
    cfg = TrainConfig(chat_template=str(tmp_path / "t.jinja")).validate()
    assert cfg.chat_template == LLAMA3_LIKE
    assert TrainConfig.from_dict(cfg.to_dict()).validate().chat_template == LLAMA3_LIKE


def test_what_is_not_a_template_is_an_error_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--chat-template 'nope' is not a file, a folder, a template's text"):
        resolve_chat_template("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no chat_template.jinja, and no chat_template.json or tokenizer_config"):
        resolve_chat_template(str(tmp_path / "empty"))
    (tmp_path / "empty" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ConfigError, match="has no chat_template.jinja, and no chat_template.json or tokenizer_config"):
        resolve_chat_template(str(tmp_path / "empty"))
    (tmp_path / "c.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ConfigError, match='no "chat_template" entry'):
        resolve_chat_template(str(tmp_path / "c.json"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a JSON object"):
        resolve_chat_template(str(tmp_path / "bad.json"))
    (tmp_path / "n.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": CHATML}]}))
    with pytest.raises(ConfigError, match=r"named chat templates \['tool_use'\] and no \"default\""):
        resolve_chat_template(str(tmp_path / "n.json"))
    for entry in ("", "chatml", 3):   # a JSON entry must be a template's text too (the config keeps the text)
        (tmp_path / "e.json").write_text(json.dumps({"chat_template": entry}))
        with pytest.raises(ConfigError, match="is not a Jinja template"):
            resolve_chat_template(str(tmp_path / "e.json"))
    (tmp_path / "plain.txt").write_text("just words")
    with pytest.raises(ConfigError, match="holds no Jinja template"):
        resolve_chat_template(str(tmp_path / "plain.txt"))
    (tmp_path / "latin1.jinja").write_bytes(b"{{ '\xe9' }}")
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_chat_template(str(tmp_path / "latin1.jinja"))
    with pytest.raises(ConfigError, match="--chat-template"):
        TrainConfig(chat_template="nope").validate()


def test_the_tokenizer_takes_a_template_that_renders(tokenizer):
    import copy
    tok = copy.deepcopy(tokenizer)   # (each case works on its own copy)
    notes = []
    use_chat_template(tok, CHATML, notes.append)
    assert tok.chat_template == CHATML and notes == []    # ChatML's markers are tokens of this tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok = copy.deepcopy(tokenizer)
    use_chat_template(tok, LLAMA3_LIKE, notes.append)
    assert len(notes) == 1 and "<|start_header_id|>, <|end_header_id|>, <|eot_id|> are not a token" in notes[0]
    broken = copy.deepcopy(tokenizer)
    before = broken.chat_template
    with pytest.raises(ConfigError, match="cannot render a user, assistant conversation: .*no loops here"):
        use_chat_template(broken, "{{ raise_exception('no loops here') }}", notes.append)
    with pytest.raises(ConfigError, match="cannot render"):
        use_chat_template(broken, "{% for m in messages %}{{ m.nope.deeper }}{% endfor %}", notes.append)
    assert broken.chat_template == before     # a refused template is not set


def test_markers_are_listed_once_in_order():
    assert markers(LLAMA3_LIKE) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert markers(CHATML) == ["<|im_start|>", "<|im_end|>"]


def test_markers_of_other_template_families():
    """Gemma's <start_of_turn>, Qwen3's <think>, </s> and Mistral's [INST] are markers too; Llama 2's <<SYS>> and
    comparisons inside Jinja tags are not."""
    template = ("{{ bos_token }}{% if messages|length>1 and x<y %}<<SYS>>{% endif %}<start_of_turn>user\n"
                "[INST] {{ m }} [/INST]<think>\n</think><end_of_turn></s><start_of_turn>")
    assert markers(template) == ["<start_of_turn>", "[INST]", "[/INST]", "<think>", "</think>", "<end_of_turn>",
                                 "</s>"]
