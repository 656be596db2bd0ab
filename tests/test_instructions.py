"""Instruction data (JSON Lines) for the trainer: each record's tokens and which of them are trained on (text: all;
prompt/completion: the completion; messages: the assistant turns as the chat template renders them), packing
with labels, and a run on such data whose eval loss is the loss over the trained tokens only."""
import json
import math
import os

import pytest
import torch

from qlora_ext.train.config import ConfigError
from qlora_ext.train.data import IGNORE, find_text_files, pack, tokenize_data
from qlora_ext.train.instructions import tokenize_record
from qlora_ext.train.record_workers import tokenize_record_file
from tests.conftest import cuda_only
from tests.test_train import _cfg, tiny  # noqa: F401  (the tiny llama and its BPE tokenizer, a fixture)

pytest.importorskip("transformers")

# ChatML, as SmolLM2 and Qwen render conversations
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (every text encodes, decoding gives it back) with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the king and queen walk in the garden while the ghost speaks"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["</s>", "<|im_start|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = CHATML
    return fast


def _trained_text(tok, ids, trained):
    return tok.decode([i for i, t in zip(ids, trained) if t])


def _context_text(tok, ids, trained):
    return tok.decode([i for i, t in zip(ids, trained) if not t])


def test_text_and_prompt_completion_records(tokenizer):
    ids, trained = tokenize_record(tokenizer, {"text": "the king speaks"}, "x")
    assert ids[-1] == tokenizer.eos_token_id and all(trained)
    assert tokenizer.decode(ids[:-1]) == "the king speaks"
    ids, trained = tokenize_record(tokenizer, {"prompt": "the ghost of", "completion": " the old king"}, "x")
    assert _context_text(tokenizer, ids, trained) == "the ghost of"
    assert _trained_text(tokenizer, ids, trained) == " the old king" + tokenizer.eos_token
    assert trained == sorted(trained)   # the context first, then the trained tokens


def test_conversations_train_on_the_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who walks"},
                {"role": "assistant", "content": "the king"}, {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "the queen"}]
    ids, trained = tokenize_record(tokenizer, {"messages": messages}, "x")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == full   # the pieces add up to the rendered conversation,
    assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]   # tokenized whole
    assert _trained_text(tokenizer, ids, trained) == "the king<|im_end|>\nthe queen<|im_end|>\n"
    context = _context_text(tokenizer, ids, trained)
    assert "who walks" in context and "<|im_start|>assistant\n" in context and "the king" not in context


def test_a_conversation_that_starts_with_the_assistant(tokenizer):
    # what the template puts before the first message (here the assistant header) is context
    ids, trained = tokenize_record(tokenizer, {"messages": [{"role": "assistant", "content": "the king"},
                                                            {"role": "user", "content": "who"}]}, "x")
    assert _context_text(tokenizer, ids, trained) == "<|im_start|>assistant\n<|im_start|>user\nwho<|im_end|>\n"
    assert _trained_text(tokenizer, ids, trained) == "the king<|im_end|>\n"


@pytest.mark.parametrize("line,message", [
    ('{"text": "a"', "x.jsonl:2: not valid JSON"),
    ('[1, 2]', "x.jsonl:2: a record must be a JSON object"),
    ('{"prompt": "a"}', r"x.jsonl:2: a record must hold exactly one of .* got the keys \['prompt'\]"),
    ('{"text": "a", "messages": []}', r"x.jsonl:2: a record must hold exactly one of"),
    ('{"prompt": "a", "completion": 3}', "x.jsonl:2: \"completion\" must be a string"),
    ('{"text": "\\ud800"}', "x.jsonl:2: TypeError"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "RAISE"}]}',
     "x.jsonl:2: TemplateError: roles must alternate"),
    ('{"messages": []}', "must be a non-empty list"),
    ('{"messages": [{"role": "king", "content": "a"}]}', "each message must be"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}',
     'x.jsonl:2: the tokenizer\'s chat template does not render "tool_calls" '
     '\\(message 1; the record has no "tools"\\)'),
    ('{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}',
     'x.jsonl:2: a message\'s "content" must be a string \\(it may be null or missing only beside "tool_calls"\\), '
     'got null or missing'),
    ('{"messages": [{"role": "user", "content": "a", "tool_calls": [{"function": {}}]}, '
     '{"role": "assistant", "content": "b"}]}', '"tool_calls" must be a list of objects'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "[{"}',
     '"tools" is a string but not JSON'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [1]}',
     '"tools" must be a list of function definitions'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [{}]}',
     'the tokenizer\'s chat template leaves "tools" out of the text'),
    ('{"prompt": "a", "completion": "b", "tools": [{}]}', '"tools" go with conversations'),
    ('{"messages": [{"role": "user", "content": "a"}]}', "without an assistant message"),
])
def test_bad_records_name_their_line(tokenizer, tmp_path, line, message):
    import copy
    tok = copy.deepcopy(tokenizer)   # a template that raises, as Mistral's does when roles do not alternate
    tok.chat_template = "{% if messages[-1]['content'] == 'RAISE' %}{{ raise_exception('roles must alternate') }}" \
        "{% endif %}" + CHATML
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        tokenize_record_file(str(path), tok)


def test_bytes_that_are_not_utf8_name_their_line(tokenizer, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a BOM is fine"}\n{"text": "\xff"}\n')
    with pytest.raises(ConfigError, match="x.jsonl:2: not UTF-8"):
        tokenize_record_file(str(path), tokenizer)


def test_extra_keys_and_conversational_prompt_completion(tokenizer):
    ids, trained = tokenize_record(tokenizer, {"id": 7, "prompt": "the ghost of", "completion": " the king"}, "x")
    assert _trained_text(tokenizer, ids, trained) == " the king" + tokenizer.eos_token
    record = {"prompt": [{"role": "user", "content": "who"}, {"role": "assistant", "content": "the king"},
                         {"role": "user", "content": "and"}],
              "completion": [{"role": "assistant", "content": "the queen"}]}
    ids, trained = tokenize_record(tokenizer, record, "x")
    assert _trained_text(tokenizer, ids, trained) == "the queen<|im_end|>\n"   # the prompt's turn is context


def test_conversations_need_a_prefix_stable_chat_template(tokenizer, tmp_path):
    import copy
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="need a tokenizer with a chat template"):
        tokenize_record(plain, record, "x")
    plain.chat_template = "{{ messages[-1]['content']|length }}:" + CHATML   # a content that changes other text
    with pytest.raises(ConfigError, match="cannot be located in the conversation"):
        tokenize_record(plain, record, "x")


@pytest.mark.parametrize("template", [
    # no add_generation_prompt branch: the assistant header is still context
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    # a generation prompt unlike the header of a rendered assistant message
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\nthinking:{% endif %}",
    # the last assistant turn rendered differently (as Qwen3 adds an empty think block to it)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}<t></t>"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}",
])
def test_templates_of_other_shapes(tokenizer, template):
    import copy
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    messages = [{"role": "user", "content": "who walks"}, {"role": "assistant", "content": "the king"},
                {"role": "user", "content": "and then"}, {"role": "assistant", "content": "the queen"}]
    ids, trained = tokenize_record(tok, {"messages": messages}, "x")
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert _trained_text(tok, ids, trained) == "the king<|im_end|>\nthe queen<|im_end|>\n"


# ChatML with function calling, shaped as Qwen2.5's: the tools' definitions in the system turn, each call in
# <tool_call> tags after the assistant's content (a newline before each, content only where there is one), the
# results as user turns in <tool_response> tags
TOOLS_CHATML = (   # (a newline right after a block tag goes in {{ }}: apply_chat_template trims it otherwise)
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n"
    "{% endif %}Tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>{{ m['content'] }}</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant"
    "{% if m['content'] %}{{ '\\n' + m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}{{ '\\n' }}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LOOK = {"type": "function", "function": {"name": "look", "description": "where someone walks",
                                         "parameters": {"type": "object", "properties": {"who": {"type": "string"}}}}}


def _call(arguments):
    return {"type": "function", "function": {"name": "look", "arguments": arguments}}


@pytest.fixture()
def tools_tokenizer(tokenizer):
    import copy
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_CHATML
    return tok


@pytest.mark.parametrize("tools_as_string", [False, True])
def test_function_calling_trains_the_calls_and_replies_not_the_tools_or_results(tools_tokenizer, tools_as_string):
    tok = tools_tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who walks"},
                {"role": "assistant", "content": None, "tool_calls": [_call({"who": "king"})]},
                {"role": "tool", "content": "the garden"},
                {"role": "assistant", "content": "the king, and then", "tool_calls": [_call('{"who": "queen"}')]},
                {"role": "tool", "content": "the hall"},
                {"role": "assistant", "content": "the queen walks"}]
    record = {"messages": messages, "tools": json.dumps([LOOK]) if tools_as_string else [LOOK]}
    ids, trained = tokenize_record(tok, record, "x")
    full = tok.apply_chat_template([dict(m, content=m["content"] or "") for m in messages], tools=[LOOK],
                                   tokenize=False)
    assert tok.decode(ids) == full and ids == tok(full, add_special_tokens=False)["input_ids"]
    assert _trained_text(tok, ids, trained) == (
        '<tool_call>{"name": "look", "arguments": {"who": "king"}}</tool_call><|im_end|>\n'
        'the king, and then\n<tool_call>{"name": "look", "arguments": "{\\"who\\": \\"queen\\"}"}</tool_call>'
        '<|im_end|>\nthe queen walks<|im_end|>\n')
    context = _context_text(tok, ids, trained)
    assert '"description": "where someone walks"' in context and "<tool_response>the garden</tool_response>" in context
    assert context.count("<|im_start|>assistant") == 3   # the headers are context


def test_function_calling_in_a_conversational_prompt_completion_and_a_parquet_file(tools_tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from qlora_ext.train.records import read_records
    tok = tools_tokenizer
    prompt = [{"role": "user", "content": "who walks"},
              {"role": "assistant", "content": None, "tool_calls": [_call('{"who": "king"}')]},
              {"role": "tool", "content": "the garden"}]
    completion = [{"role": "assistant", "content": "the king walks"}]
    record = {"prompt": prompt, "completion": completion, "tools": json.dumps([LOOK])}
    ids, trained = tokenize_record(tok, record, "x")
    assert _trained_text(tok, ids, trained) == "the king walks<|im_end|>\n"   # the prompt's call is context
    # datasets writes a table of such rows: struct fields a message does not use read as null (dropped)
    rows = [{"messages": prompt + completion, "tools": json.dumps([LOOK])},
            {"messages": [{"role": "user", "content": "who"}, {"role": "assistant", "content": "the king"}],
             "tools": None}]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "calls.parquet"))
    records = [r for _, r in read_records(str(tmp_path / "calls.parquet"))]
    first, _ = tokenize_record(tok, records[0], "row 1")
    want, _ = tokenize_record(tok, rows[0], "row 1")
    assert first == want
    assert "tools" not in records[1] and tokenize_record(tok, records[1], "row 2")[0]


# Qwen3's shape: the last assistant turn gets an empty think block, and a newline separates the calls from a content
QWEN3_LIKE = TOOLS_CHATML.replace(
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant"
    "{% if m['content'] %}{{ '\\n' + m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}{{ '\\n' }}",
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant{{ '\\n' }}"
    "{% if loop.last %}<think>{{ '\\n\\n' }}</think>{{ '\\n\\n' }}{% endif %}{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{% if not loop.first or m['content'] %}{{ '\\n' }}{% endif %}")
# a template that drops the content beside calls and has no generation prompt: a call-only turn's start is unknown
NO_START = TOOLS_CHATML.replace("{% if m['content'] %}", "{% if m['content'] and not m.get('tool_calls') %}") \
    .replace("{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "")
assert "<think>" in QWEN3_LIKE and "add_generation_prompt" not in NO_START and "not m.get" in NO_START
CALL_ONLY = [{"role": "user", "content": "who walks"}, {"role": "assistant", "tool_calls": [_call({"who": "king"})]},
             {"role": "tool", "content": "the garden"}]
KING_CALL = '<tool_call>{"name": "look", "arguments": {"who": "king"}}</tool_call><|im_end|>\n'


@pytest.mark.parametrize("template,messages,want", [
    # Qwen3's shape, the call-only turn in the middle and last: the think block is context, as for content turns
    (QWEN3_LIKE, CALL_ONLY + [{"role": "assistant", "content": "the king"}], [KING_CALL, "the king<|im_end|>\n"]),
    (QWEN3_LIKE, CALL_ONLY[:2], [KING_CALL]),
    # a call-only first message: the template's preamble (the tools) and the header are context
    (TOOLS_CHATML, CALL_ONLY[1:] + [{"role": "assistant", "content": "the king"}],
     [KING_CALL, "the king<|im_end|>\n"]),
    # no generation-prompt branch: the header is still context
    (TOOLS_CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ""), CALL_ONLY[:2],
     [KING_CALL]),
    # an empty "tool_calls" is no calls; results as JSON; Llama 3.1's ipython role for a result
    (TOOLS_CHATML, [{"role": "user", "content": "who walks", "tool_calls": []}, CALL_ONLY[1],
                    {"role": "tool", "content": {"where": "garden"}}, {"role": "ipython", "content": "garden"},
                    {"role": "assistant", "content": "the king"}], [KING_CALL, "the king<|im_end|>\n"]),
])
def test_call_only_turns_of_other_template_shapes(tools_tokenizer, template, messages, want):
    import copy
    tok = copy.deepcopy(tools_tokenizer)
    tok.chat_template = template
    ids, trained = tokenize_record(tok, {"messages": messages, "tools": [LOOK]}, "x")
    runs, run = [], []
    for i, t in zip(ids, trained):
        if t:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    assert runs + ([tok.decode(run)] if run else []) == want
    context = _context_text(tok, ids, trained)
    assert "Tools:" in context and context.count("<|im_start|>assistant") == sum(m["role"] == "assistant"
                                                                              for m in messages)


@pytest.mark.parametrize("template,record,message", [
    (NO_START, {"messages": CALL_ONLY + [{"role": "assistant", "content": "the king"}], "tools": [LOOK]},
     "renders message 1 \\(the assistant's tool calls\\) in a way that cannot be located"),
    # calls before the content: they would be context
    (TOOLS_CHATML.replace("{% if m['content'] %}{{ '\\n' + m['content'] }}{% endif %}", "")
     .replace("</tool_call>{% endfor %}", "</tool_call>{% endfor %}{% if m['content'] %}{{ '\\n' + m['content'] }}"
                                          "{% endif %}"),
     {"messages": CALL_ONLY[:1] + [dict(CALL_ONLY[1], content="let me look")], "tools": [LOOK]},
     "puts the tool calls of message 1 outside the turn's text"),
    # calls in a conversational prompt, by a template without function calling: refused, not dropped
    (CHATML, {"prompt": CALL_ONLY, "completion": [{"role": "assistant", "content": "the king"}]},
     'does not render "tool_calls" \\(message 1; the record has no "tools"\\)'),
])
def test_calls_that_would_not_be_trained_as_written_are_refused(tools_tokenizer, template, record, message):
    import copy
    assert template != TOOLS_CHATML
    tok = copy.deepcopy(tools_tokenizer)
    tok.chat_template = template
    with pytest.raises(ConfigError, match="x: .*" + message):
        tokenize_record(tok, record, "x")


def test_pack_labels_and_leaves_out_blocks_without_a_trained_token():
    ids = list(range(100, 140))
    # blocks of 8: 0 and 1 context only; 3 trains only its first token, which no block predicts
    trained = [False] * 16 + [True] * 4 + [False] * 4 + [True] + [False] * 7 + [True] * 8
    data = pack(ids, 8, 1, ["x"], trained)
    assert data.dropped_blocks == 3 and data.train.shape[0] + data.eval.shape[0] == 2
    blocks = torch.cat([data.train, data.eval])
    labels = torch.cat([data.train_labels, data.eval_labels])
    assert sorted(blocks[:, 0].tolist()) == [116, 132]
    for b, l in zip(blocks, labels):
        assert all((lv == IGNORE) != trained[int(bv) - 100] for bv, lv in zip(b, l))
        assert torch.equal(l[l != IGNORE], b[l != IGNORE])
    assert data.trained_tokens == 3 + 7   # the labelled tokens the loss sees (not a block's first)
    assert pack(ids, 8, 1, ["x"]).train_labels is None   # text: every token is trained on


def test_mixed_text_and_jsonl_files(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("the king walks")
    (tmp_path / "blank.txt").write_text("\n")   # skipped, as in a folder of text only
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "the ghost", "completion": " speaks"}) + "\n")
    (tmp_path / "C.JSONL").write_text(json.dumps({"prompt": "the queen", "completion": " walks"}) + "\n")
    assert [os.path.basename(f) for f in find_text_files([str(tmp_path)])] == ["C.JSONL", "a.txt", "b.jsonl",
                                                                              "blank.txt"]
    files = [str(tmp_path / "a.txt"), str(tmp_path / "blank.txt"), str(tmp_path / "b.jsonl")]
    stream = tokenize_data(files, tokenizer)
    ids, trained = stream.ids, stream.trained
    text_ids = tokenizer("the king walks", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[:len(text_ids)] == text_ids and all(trained[:len(text_ids)])
    assert _trained_text(tokenizer, ids[len(text_ids):], trained[len(text_ids):]) == " speaks" + tokenizer.eos_token
    assert stream.starts == [0, len(text_ids)]   # each file and record an example of its own
    assert tokenize_data(files[:2], tokenizer).trained is None
    stream = tokenize_data([str(tmp_path / "C.JSONL")], tokenizer)   # the extension in any case
    assert _trained_text(tokenizer, stream.ids, stream.trained) == " walks" + tokenizer.eos_token


def test_training_on_instruction_data(tiny, tmp_path):
    """A run on prompt/completion records: the eval loss is the mean over the completions' tokens only (what
    transformers computes with those labels), and training lowers it."""
    from transformers import AutoModelForCausalLM
    from qlora_ext.train.trainer import Trainer, evaluate, train
    words = "the king and queen of denmark walk in the garden at night while the ghost speaks".split()
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        start = int(torch.randint(0, len(words) - 6, (1,), generator=g))
        lines.append(json.dumps({"prompt": " ".join(words[start:start + 3]),
                                 "completion": " " + " ".join(words[start + 3:start + 6])}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tiny, tmp_path / "run", data=[str(tmp_path / "data")], steps=12, lr=2e-2, dropout=0.0,
               quant_type="none")
    t = Trainer(cfg, log=lambda s: None)
    t.setup()
    assert t.data.train_labels is not None and (t.data.eval_labels == IGNORE).any()
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    total = count = 0.0
    assert t.packing == "bfd" and t.data.eval_positions is not None   # (auto: .jsonl data)
    for ids, labels, positions in zip(t.data.eval, t.data.eval_labels, t.data.eval_positions):
        n = int((labels[1:] != IGNORE).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids[None], labels=labels[None], position_ids=positions[None],
                                 use_cache=False).loss) * n
        count += n
    assert math.isclose(evaluate(t.model, t.data.eval, 4, t.device, t.data.eval_labels, t.data.eval_positions),
                        total / count, rel_tol=1e-5)
    r = train(cfg, log=lambda s: None)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"] - 0.2
    assert 0 < r["data"]["trained_tokens"] < r["data"]["tokens"]


def test_grad_accumulation_weights_micro_batches_by_their_trained_tokens(tiny, tmp_path):
    """With labels, batch 4 x accum 1 and batch 2 x accum 2 take the same step (the mean over all trained tokens
    of the step), as they do on text."""
    from safetensors.torch import load_file
    from qlora_ext.train.trainer import train
    g = torch.Generator().manual_seed(1)
    words = "the king and queen of denmark walk in the garden at night".split()
    lines = []
    for _ in range(300):   # prompts and completions of different lengths: micro-batches differ in trained tokens
        n, m = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        lines.append(json.dumps({"prompt": " ".join(words[:n]), "completion": " " + " ".join(words[-m:])}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    runs = [train(_cfg(tiny, tmp_path / f"r{accum}", data=[str(tmp_path / "d.jsonl")], steps=2, eval_every=2,
                       save_every=2, batch_size=4 // accum, grad_accum=accum, dropout=0.0, max_grad_norm=0.0,
                       optimizer="adamw"), log=lambda s: None) for accum in (1, 2)]
    a, b = (load_file(r["adapter"]) for r in runs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)   # (Adam magnifies rounding)
    for step in range(2):   # a mean of the micro-batches' means would differ in the 4th digit
        assert math.isclose(runs[0]["history"][step]["loss"], runs[1]["history"][step]["loss"], rel_tol=1e-5)


@cuda_only
def test_training_on_instruction_data_on_cuda(tiny, tmp_path):
    # the labels go to the GPU with the blocks; bf16 autocast; the loss over the completions falls
    from qlora_ext.train.trainer import train
    lines = [json.dumps({"prompt": "the king and", "completion": " the queen walk"}) for _ in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    r = train(_cfg(tiny, tmp_path / "run", data=[str(tmp_path / "d.jsonl")], device="cuda", steps=8,
                   grad_accum=2), log=lambda s: None)
    assert all(math.isfinite(h["loss"]) for h in r["history"])
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"] - 0.2


def _byte_level_tokenizer(template, special=("</s>",)):
    """A byte-level BPE tokenizer (EOS </s>; ChatML's marks are tokens only where `special` names them), with
    chat template `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the king speaks"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(special)))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>",
                                  additional_special_tokens=[t for t in special if t != "</s>"])
    tok.chat_template = template
    return tok


class _Scripted(torch.nn.Module):
    """A stand-in model whose generate() appends the tokens of a fixed text to the prompt."""

    def __init__(self, tokenizer, text):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.more = tokenizer(text, add_special_tokens=False).input_ids
        self.kwargs = None

    def generate(self, ids, **kwargs):
        self.kwargs = kwargs
        return torch.cat([ids, torch.tensor([self.more])], dim=1)


def test_generate_chat_reply_ends_at_the_end_of_turn_mark():
    """A reply ends where the template ends an assistant turn: generation is told to stop at the mark, and a mark
    spelled out of several tokens (ChatML on this tokenizer) is cut from the text with what follows it."""
    import copy
    from qlora_ext.train.generate import end_of_turn, generate_text
    tok = _byte_level_tokenizer(CHATML)
    assert len(tok("<|im_end|>", add_special_tokens=False).input_ids) > 1
    assert end_of_turn(tok) == "<|im_end|>"
    llama3 = copy.deepcopy(tok)
    llama3.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                            "{{ m['content'] }}<|eot_id|>{% endfor %}")
    assert end_of_turn(llama3) == "<|eot_id|>"
    bare = copy.deepcopy(tok)
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert end_of_turn(bare) == ""
    glued = copy.deepcopy(tok)   # a mark with the EOS right after it: the mark
    glued.chat_template = "{% for m in messages %}{{ m['content'] }}<|eot|></s>{% endfor %}"
    assert end_of_turn(glued) == "<|eot|>"

    model = _Scripted(tok, "the king speaks<|im_end|>\n<|im_start|>user\nmore")   # a reply, its mark, a next turn
    assert generate_text(model, tok, "who?", 20, temperature=0, chat=True) == "the king speaks"
    (stop,) = model.kwargs["stopping_criteria"]
    reply = tok("the king<|im_e", add_special_tokens=False).input_ids
    start = stop.start
    prompt = [0] * start
    assert not stop(torch.tensor([prompt + reply]), None).item()
    assert stop(torch.tensor([prompt + reply + tok("nd|>", add_special_tokens=False).input_ids]), None).item()


def test_generate_chat_stops_at_a_mark_of_several_words_or_at_the_next_turn():
    """A template ending turns with text of several words stops at all of it (not at its first word, which the
    reply may hold); one ending them with whitespace alone stops where the model starts the next user turn."""
    from qlora_ext.train.generate import end_of_turn, generate_text
    words = _byte_level_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n### End of turn\n"
                                  "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_of_turn(words) == "### End of turn"
    model = _Scripted(words, "the ### king speaks\n### End of turn\nuser: more")
    assert generate_text(model, words, "who?", 20, temperature=0, chat=True) == "the ### king speaks"
    blank = _byte_level_tokenizer("{% for m in messages %}{{ m['role'].capitalize() }}: {{ m['content'] }}\n\n"
                                  "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
    assert end_of_turn(blank) == "User:"
    model = _Scripted(blank, " the king speaks\n\nUser: and then?")
    assert generate_text(model, blank, "who?", 20, temperature=0, chat=True) == " the king speaks"
    (stop,) = model.kwargs["stopping_criteria"]
    start = stop.start
    assert not stop(torch.tensor([[0] * start + blank(" the king\n\nUse", add_special_tokens=False).input_ids]))
    assert stop(torch.tensor([[0] * start + blank(" the king\n\nUser:", add_special_tokens=False).input_ids]))
    eos_after = _byte_level_tokenizer("{% for m in messages %}{{ m['content'] }}\n</s>{% endfor %}")
    assert end_of_turn(eos_after) == "</s>"   # the EOS itself, a token of the tokenizer's
    no_header = _byte_level_tokenizer("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert end_of_turn(no_header) == ""       # nothing tells a reply's end from a next turn


def test_a_merged_chat_run_stops_generating_at_the_templates_end_of_turn_token():
    """TRL's setup_chat_format makes <|im_end|> the end token; merge adds the template's end-of-turn token to the
    generation config's EOS ids where it is one token, and leaves a mark spelled out of several alone."""
    from transformers import GenerationConfig
    from qlora_ext.train.merge import stop_at_end_of_turn

    class Stand(torch.nn.Module):
        generation_config = None

    tok = _byte_level_tokenizer(CHATML, special=("</s>", "<|im_end|>"))
    model = Stand()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    notes = []
    stop_at_end_of_turn(model, tok, notes.append)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [tok.eos_token_id, im_end] and "'<|im_end|>'" in notes[0]
    stop_at_end_of_turn(model, tok, notes.append)   # (once)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, im_end] and len(notes) == 1
    spelled = _byte_level_tokenizer(CHATML)
    model.generation_config = GenerationConfig(eos_token_id=spelled.eos_token_id)
    stop_at_end_of_turn(model, spelled, notes.append)
    assert model.generation_config.eos_token_id == spelled.eos_token_id


def test_generate_chat_answers_a_user_message(tiny):
    """`qlora-train generate --chat`: the prompt goes in as a user message with the assistant's generation prompt,
    and the reply alone comes back (the tokens after the prompt)."""
    import copy
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qlora_ext.train.generate import generate_text
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    tok = AutoTokenizer.from_pretrained(tiny[0])
    with pytest.raises(ConfigError, match="--chat needs a tokenizer with a chat template"):
        generate_text(model, tok, "the king", 4, temperature=0, chat=True)
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML
    reply = generate_text(model, tok, "the king", 6, temperature=0, chat=True)
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "the king"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False,
                 return_tensors="pt").input_ids
    assert prompt.shape[1] > len(tok("the king").input_ids)   # the template's tokens are there
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > prompt.shape[1] and reply == tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert not reply.startswith("<|im_start|>")
