"""Instruction data (JSON Lines) for the trainer: each record's tokens and which of them are trained on (text: all;
prompt/completion: the completion; messages: the assistant turns as the chat template renders them), packing
with labels, and a run on such data whose eval loss is the loss over the trained tokens only."""
import json
import math

import pytest
import torch

from qlora_ext.train.config import ConfigError
from qlora_ext.train.data import IGNORE, pack, tokenize_data
from qlora_ext.train.instructions import tokenize_jsonl, tokenize_record
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
    assert tokenizer.decode(ids) == full   # the pieces add up to the rendered conversation
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
    ('{"prompt": "a"}', r"x.jsonl:2: a record must be .* got the keys \['prompt'\]"),
    ('{"prompt": "a", "completion": 3}', "x.jsonl:2: a record must be"),
    ('{"messages": []}', "must be a non-empty list"),
    ('{"messages": [{"role": "king", "content": "a"}]}', "each message must be"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "without an assistant message"),
])
def test_bad_records_name_their_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        tokenize_jsonl(str(path), tokenizer)


def test_conversations_need_a_prefix_stable_chat_template(tokenizer, tmp_path):
    import copy
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="need a tokenizer with a chat template"):
        tokenize_record(plain, record, "x")
    plain.chat_template = "{{ messages|length }}:" + CHATML   # rewrites its first characters as messages come
    with pytest.raises(ConfigError, match="rewrites earlier text"):
        tokenize_record(plain, record, "x")


def test_pack_labels_and_leaves_out_blocks_without_a_trained_token():
    ids = list(range(100, 140))
    trained = [False] * 16 + [True] * 4 + [False] * 12 + [True] * 8   # blocks of 8: 0, 1 context only; block
    data = pack(ids, 8, 1, ["x"], trained)                             # 3 trains only its first token
    assert data.dropped_blocks == 3 and data.train.shape[0] + data.eval.shape[0] == 2
    blocks = torch.cat([data.train, data.eval])
    labels = torch.cat([data.train_labels, data.eval_labels])
    assert sorted(blocks[:, 0].tolist()) == [116, 132]
    for b, l in zip(blocks, labels):
        assert all((lv == IGNORE) != trained[int(bv) - 100] for bv, lv in zip(b, l))
        assert torch.equal(l[l != IGNORE], b[l != IGNORE])
    assert data.trained_tokens == 12
    assert pack(ids, 8, 1, ["x"]).train_labels is None   # text: every token is trained on


def test_mixed_text_and_jsonl_files(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("the king walks")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "the ghost", "completion": " speaks"}) + "\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    ids, trained = tokenize_data(files, tokenizer)
    text_ids = tokenizer("the king walks", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[:len(text_ids)] == text_ids and all(trained[:len(text_ids)])
    assert _trained_text(tokenizer, ids[len(text_ids):], trained[len(text_ids):]) == " speaks" + tokenizer.eos_token
    assert tokenize_data(files[:1], tokenizer)[1] is None


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
    for ids, labels in zip(t.data.eval, t.data.eval_labels):
        n = int((labels[1:] != IGNORE).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids[None], labels=labels[None]).loss) * n
        count += n
    assert math.isclose(evaluate(t.model, t.data.eval, 4, t.device, t.data.eval_labels), total / count,
                        rel_tol=1e-5)
    r = train(cfg, log=lambda s: None)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"] - 0.2
    assert 0 < r["data"]["trained_tokens"] < r["data"]["tokens"]
