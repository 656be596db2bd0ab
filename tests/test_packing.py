"""bfd packing (qlora_ext/train/packing.py and the trainer's --packing): the bins against a plain quadratic
best-fit-decreasing, the packed blocks' tokens, labels and position ids, the loss of packed examples against
each example run alone, the probe that refuses a model whose attention ignores packed position ids, the BOS
prefix (--add-bos), and runs saved before these flags resuming as they began."""
import json
import math
import random
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from qlora_ext.train import ConfigError, TrainConfig, train  # noqa: E402
from qlora_ext.train.data import IGNORE, pack, resolve_packing, tokenize_data  # noqa: E402
from qlora_ext.train.instructions import special_prefix, tokenize_record  # noqa: E402
from qlora_ext.train.loss import packed_attention_problem  # noqa: E402
from qlora_ext.train.packing import best_fit_decreasing, pack_examples  # noqa: E402
from tests.test_train import _cfg, resume_adapters, rewind, tiny  # noqa: F401  (tiny: a fixture)


def _reference_bfd_loads(lengths, capacity):
    """Best fit decreasing by scanning every bin: the sorted loads of its bins (the same whatever bin a tie
    picks: bins with equal room are interchangeable)."""
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, load in enumerate(loads) if load + n <= capacity]
        if fits:
            best = max(fits, key=lambda i: loads[i])
            loads[best] += n
        else:
            loads.append(n)
    return sorted(loads)


@pytest.mark.parametrize("capacity", [1, 7, 64, 100])
def test_best_fit_decreasing_matches_a_quadratic_reference(capacity):
    rng = random.Random(capacity)
    for trial in range(30):
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 200))]
        if trial % 3 == 0:   # many small items, the case packing is for
            lengths = [rng.randint(1, max(1, capacity // 5)) for _ in range(rng.randint(1, 300))]
        bins = best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert all(load <= capacity for load in loads)
        assert sorted(loads) == _reference_bfd_loads(lengths, capacity)


def test_best_fit_decreasing_refuses_items_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError):
        best_fit_decreasing([0], 8)


def test_pack_examples_keeps_every_token_and_marks_starts_and_padding():
    rng = random.Random(0)
    seq_len, pad = 16, 999
    examples = [[rng.randint(0, 500) for _ in range(rng.randint(1, 40))] for _ in range(60)]
    flags = [[rng.random() < 0.7 for _ in ex] for ex in examples]
    ids = [t for ex in examples for t in ex]
    trained = [f for fl in flags for f in fl]
    starts = [0]
    for ex in examples[:-1]:
        starts.append(starts[-1] + len(ex))
    packed = pack_examples(ids, trained, starts, seq_len, pad)
    assert packed.examples == 60 and packed.split_examples == sum(len(ex) > seq_len for ex in examples)
    pieces = []   # each block's pieces, read back from the position ids
    for row in range(packed.ids.shape[0]):
        pos, tok, lab = packed.positions[row].tolist(), packed.ids[row].tolist(), packed.labels[row].tolist()
        cuts = [i for i in range(seq_len) if pos[i] == 0] + [seq_len]
        assert cuts[0] == 0 and all(pos[i] == pos[i - 1] + 1 for i in range(1, seq_len) if i not in cuts)
        n_pad = int(packed.padding[row])
        assert all(t == pad and lab_ == IGNORE for t, lab_ in zip(tok[seq_len - n_pad:], lab[seq_len - n_pad:]))
        for a, b in zip(cuts, cuts[1:]):
            if a >= seq_len - n_pad:
                break
            assert lab[a] == IGNORE   # the first token of a piece: nothing in its example predicts it
            pieces.append((tok[a:b], lab[a:b]))
    # the pieces are the examples cut at every seq_len tokens, in some order, with their labels
    expected = []
    for ex, fl in zip(examples, flags):
        for s in range(0, len(ex), seq_len):
            labels = [t if f else IGNORE for t, f in zip(ex[s:s + seq_len], fl[s:s + seq_len])]
            expected.append((ex[s:s + seq_len], [IGNORE] + labels[1:]))
    assert sorted(pieces) == sorted(expected)
    used = sum(len(ex) for ex in examples)
    assert int(packed.padding.sum()) == packed.ids.numel() - used


def test_pack_bfd_splits_labels_and_positions_together():
    ids = list(range(100, 160))
    starts = [0, 5, 9, 20, 22, 40, 41]
    data = pack(ids, 16, 1, ["x"], None, starts=starts, packing="bfd", pad_id=0)
    assert data.packing == "bfd" and data.examples == 7 and data.split_examples == 2   # 22..40: 18 tokens, 41..60: 19
    blocks = torch.cat([data.train, data.eval])
    positions = torch.cat([data.train_positions, data.eval_positions])
    labels = torch.cat([data.train_labels, data.eval_labels])
    assert blocks.shape == positions.shape == labels.shape and blocks.shape[1] == 16
    # a token's position is its distance from its example's start (or from its piece's, past 16 tokens)
    bounds = starts + [60]
    for b, p in zip(blocks.flatten().tolist(), positions.flatten().tolist()):
        if b >= 100:
            start = max(s for s in bounds if s <= b - 100)
            assert p == (b - 100 - start) % 16
    assert data.trained_tokens == 60 - 9   # every token but each piece's first (7 examples, two cut in two)
    assert "7 examples packed best fit" in data.describe() and "2 longer than --seq-len" in data.describe()
    with pytest.raises(ValueError, match="packing"):
        pack(ids, 16, 1, ["x"], packing="sorted")


def test_auto_packing_is_bfd_for_instruction_data():
    assert resolve_packing("auto", ["a.txt", "b.JSONL"]) == "bfd"
    assert resolve_packing("auto", ["a.txt"]) == "wrapped"
    assert resolve_packing("wrapped", ["b.jsonl"]) == "wrapped" and resolve_packing("bfd", ["a.txt"]) == "bfd"


def _examples_file(path, n=300, seed=0):
    words = "the king and queen of denmark walk in the garden at night while the ghost speaks".split()
    g = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = g.randint(1, 6), g.randint(1, 9)
        start = g.randint(0, len(words) - 1)
        lines.append(json.dumps({"prompt": " ".join(words[start:start + a]),
                                 "completion": " " + " ".join(words[:b])}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("head", ["fused", "model"])
def test_packed_examples_lose_what_each_loses_alone(tiny, tmp_path, head, monkeypatch):
    """The eval loss of bfd blocks is the token-weighted mean of each example's loss computed alone (one example
    per forward, no padding): the position ids keep attention (and the rotary positions) within each example.
    Both loss paths: the fused head (linear_cross_entropy) and the model's own loss."""
    from transformers import AutoModelForCausalLM
    from qlora_ext.train import loss as loss_module
    from qlora_ext.train.trainer import Trainer, evaluate
    if head == "model":
        monkeypatch.setattr(loss_module, "fused_head", lambda model, tokens=None: None)
    data = _examples_file(tmp_path / "d.jsonl")
    t = Trainer(_cfg(tiny, tmp_path / "run", data=[data], quant_type="none", eval_blocks=6), log=lambda s: None)
    t.setup()
    assert t.packing == "bfd"
    model = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    total = count = 0.0
    examples = 0
    for ids, labels, positions in zip(t.data.eval, t.data.eval_labels, t.data.eval_positions):
        cuts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for a, b in zip(cuts, cuts[1:]):
            n = int((labels[a + 1:b] != IGNORE).sum())
            if n == 0:   # padding, or an example with nothing trained in this block
                continue
            with torch.no_grad():
                total += float(model(input_ids=ids[None, a:b], labels=labels[None, a:b], use_cache=False).loss) * n
            count += n
            examples += 1
    assert examples > 2 * len(t.data.eval)   # several examples per block
    got = evaluate(t.model, t.data.eval, 4, t.device, t.data.eval_labels, t.data.eval_positions)
    assert math.isclose(got, total / count, rel_tol=1e-5)
    # without the position ids the examples see each other: another loss (what the probe detects)
    assert not math.isclose(evaluate(t.model, t.data.eval, 4, t.device, t.data.eval_labels), got, rel_tol=1e-3)


def test_the_probe_refuses_a_model_that_ignores_packed_position_ids(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    class SharedAttention(LlamaForCausalLM):   # as a model with its own attention code might behave
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert packed_attention_problem(model, torch.device("cpu")) is None
    shared = SharedAttention.from_pretrained(tiny[0])
    problem = packed_attention_problem(shared, torch.device("cpu"))
    assert problem is not None and "does not keep packed examples apart" in problem
    assert shared.training is False   # (left as it was)
    # the trainer refuses bfd asked for on such a model, naming the way out; auto packs wrapped, with a note
    from qlora_ext.train import trainer as trainer_module
    monkeypatch.setattr(trainer_module, "packed_attention_problem", lambda *a: problem)
    data = _examples_file(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="--packing bfd: its attention .* use --packing wrapped"):
        trainer_module.Trainer(_cfg(tiny, tmp_path / "run", data=[data], packing="bfd"), log=lambda s: None).setup()
    notes = []
    t = trainer_module.Trainer(_cfg(tiny, tmp_path / "run", data=[data]), log=notes.append)
    t.setup()
    assert t.packing == "wrapped" and t.data.train_positions is None
    assert any("packed wrapped instead" in n for n in notes)


def test_the_probe_sees_rows_packed_differently_and_short_position_tables(tiny):
    """A model that keeps each row's examples apart only where all rows are packed alike is refused; a model
    whose position table is shorter than the probe gets a probe that fits it."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    class FirstRowMasks(LlamaForCausalLM):   # builds every row's mask from row 0's position ids
        def forward(self, *args, position_ids=None, **kwargs):
            if position_ids is not None:
                position_ids = position_ids[:1].expand_as(position_ids)
            return super().forward(*args, position_ids=position_ids, **kwargs)

    problem = packed_attention_problem(FirstRowMasks.from_pretrained(tiny[0]), torch.device("cpu"))
    assert problem is not None and "in two packings" in problem
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert packed_attention_problem(model, torch.device("cpu"), max_length=12) is None
    # bf16 rounding (different shapes alone and packed) is not taken for mixing
    assert packed_attention_problem(model.to(torch.bfloat16), torch.device("cpu"),
                                    torch.autocast("cpu", dtype=torch.bfloat16)) is None
    assert "too few" in packed_attention_problem(model, torch.device("cpu"), max_length=4)


def test_padding_uses_an_id_the_embedding_has(tiny, tmp_path):
    """A pad token added to the tokenizer without resizing the embedding is passed over (the padding is never
    trained on nor attended to, so any id the embedding has will do)."""
    from transformers import AutoTokenizer
    from qlora_ext.train.data import blocks_for, pad_token_id
    tok = AutoTokenizer.from_pretrained(tiny[0])
    vocab = len(tok)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.pad_token_id == vocab
    assert pad_token_id(tok, vocab) == tok.eos_token_id and pad_token_id(tok) == vocab
    data = blocks_for([_examples_file(tmp_path / "d.jsonl")], tok, 32, 2, "bfd", vocab_size=vocab)
    assert data.padding_tokens > 0 and int(torch.cat([data.train, data.eval]).max()) < vocab


def test_a_bfd_run_trains_and_resumes_bit_exactly(tiny, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    data = _examples_file(tmp_path / "d.jsonl", n=400)
    straight = train(_cfg(tiny, out, data=[data], steps=6, save_every=3, eval_every=3, lr=2e-2, dropout=0.0),
                     log=lambda s: None)
    assert straight["data"]["packing"] == "bfd" and straight["data"]["examples"] == 400
    assert 0 <= straight["data"]["padding_tokens"] < straight["data"]["tokens"]
    assert straight["eval_after"]["loss"] < straight["eval_before"]["loss"]
    assert "400 examples packed best fit (bfd)" in (out / "report.md").read_text()
    final = load_file(str(out / "adapter.safetensors"))
    rewind(out, 3)
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    with open(out / "report.json") as f:
        assert json.load(f)["evals"] == straight["evals"]


def test_a_run_saved_before_packing_and_add_bos_resumes_as_it_began(tiny, tmp_path):
    """A config.json without the keys (a run from before them) reads as packing wrapped, add_bos off."""
    data = _examples_file(tmp_path / "d.jsonl", n=400)
    out = tmp_path / "old"
    train(_cfg(tiny, out, data=[data], steps=4, save_every=2, eval_every=2, packing="wrapped", add_bos=False),
          log=lambda s: None)
    with open(out / "config.json") as f:
        saved = json.load(f)
    del saved["packing"], saved["add_bos"]
    with open(out / "config.json", "w") as f:
        json.dump(saved, f)
    cfg = TrainConfig.from_dict(saved)
    assert cfg.packing == "wrapped" and cfg.add_bos is False
    assert TrainConfig.from_dict({}).packing == "wrapped"
    assert TrainConfig().packing == "auto" and TrainConfig().add_bos is True   # new runs
    with open(out / "report.json") as f:
        before = json.load(f)
    rewind(out, 2)
    resume_adapters(out)
    with open(out / "report.json") as f:
        after = json.load(f)
    assert after["data"]["packing"] == "wrapped" and after["evals"] == before["evals"]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A byte-level BPE tokenizer whose post-processor puts <s> first, as Llama's does, with a ChatML template
    that writes no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the king speaks to the ghost of the old king"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}")
    return fast


def test_texts_and_prompts_start_with_the_tokenizers_bos(bos_tokenizer, tmp_path):
    tok = bos_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert special_prefix(tok) == [bos]
    ids, trained = tokenize_record(tok, {"prompt": "the king", "completion": " speaks"}, "x", [bos])
    assert ids == tok("the king speaks")["input_ids"] + [eos]   # what tokenizer(text) gives, and the end
    assert trained[0] is False and tok.decode([t for t, f in zip(ids, trained) if f]) == " speaks</s>"
    ids, trained = tokenize_record(tok, {"text": "the ghost"}, "x", [bos])
    assert ids[0] == bos and not trained[0] and all(trained[1:])
    messages = [{"role": "user", "content": "who"}, {"role": "assistant", "content": "the king"}]
    ids, _ = tokenize_record(tok, {"messages": messages}, "x", [bos])
    assert bos not in ids   # a chat template writes its own special tokens
    (tmp_path / "a.txt").write_text("the old king")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "the ghost"}) + "\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    stream = tokenize_data(files, tok)
    assert [stream.ids[s] for s in stream.starts] == [bos, bos]
    stream = tokenize_data(files, tok, add_bos=False)
    assert bos not in stream.ids
    assert tokenize_data(files[:1], tok).ids[0] == bos   # plain text too, as tokenizer(text) would
    # in a mix of text files and records, a text file's BOS is context, as a record's is
    mixed = tokenize_data(files, tok)
    assert [mixed.trained[s] for s in mixed.starts] == [False, False]


def test_a_text_that_has_its_bos_or_eos_gets_it_once(bos_tokenizer):
    tok = bos_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids, trained = tokenize_record(tok, {"text": "<s>the king</s>"}, "x", [bos])
    assert ids.count(bos) == 1 and ids.count(eos) == 1 and ids[0] == bos and ids[-1] == eos
    assert trained == [False] + [True] * (len(ids) - 1)
    ids, trained = tokenize_record(tok, {"prompt": "<s>the king", "completion": " speaks</s>"}, "x", [bos])
    assert ids.count(bos) == 1 and ids.count(eos) == 1
    assert tok.decode([t for t, f in zip(ids, trained) if f]) == " speaks</s>"
    # runs from before --add-bos (prefix None) keep their framing: no BOS, the end always added
    ids, _ = tokenize_record(tok, {"text": "the king</s>"}, "x", None)
    assert ids.count(eos) == 2 and bos not in ids


def test_a_text_that_is_not_utf8_is_read_as_latin1_with_a_warning(bos_tokenizer, tmp_path):
    tok = bos_tokenizer
    (tmp_path / "u.txt").write_text("the king's caf\u00e9", encoding="utf-8")
    (tmp_path / "l.txt").write_bytes("the king's caf\u00e9".encode("latin-1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        utf8 = tokenize_data([str(tmp_path / "u.txt")], tok).ids
    with pytest.warns(UserWarning, match=r"l\.txt is not UTF-8 \(byte 0xe9 at offset 14\): read as Latin-1"):
        latin1 = tokenize_data([str(tmp_path / "l.txt")], tok).ids
    assert latin1 == utf8   # the same text


def test_special_prefix_tries_another_probe_where_the_vocabulary_cannot_spell_one():
    class Spelling:   # "a" is not in the vocabulary (and there is no unknown token): it tokenizes to nothing
        def __call__(self, text, add_special_tokens=True):
            ids = [] if text == "a" else [5]
            return {"input_ids": ([0] if add_special_tokens else []) + ids}
    assert special_prefix(Spelling()) == [0]
