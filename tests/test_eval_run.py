"""`qlora-train eval` (qlora_ext/train/eval_run.py) and qlora_ext.adapters_disabled: the run's held-out loss
computed again equals the report's last eval, the base alone its first (the adapters start at zero), another
file's loss is the mean of its examples' losses computed one by one, and bad flags give clear errors."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import qlora_ext  # noqa: E402
from qlora_ext.train import ConfigError, TrainConfig, train  # noqa: E402
from qlora_ext.train.cli import main as cli_main  # noqa: E402
from qlora_ext.train.data import IGNORE  # noqa: E402
from qlora_ext.train.eval_run import evaluate_run  # noqa: E402
from tests.test_packing import _examples_file  # noqa: E402
from tests.test_train import _cfg, resume_adapters, rewind, tiny  # noqa: F401  (tiny: a fixture)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("eval") / "run"
    return str(out), train(_cfg(tiny, out, steps=4, eval_every=4, save_every=4, lr=2e-2), log=lambda s: None)


def test_eval_gives_the_reports_held_out_losses_again(run, capsys):
    out, report = run
    after = evaluate_run(out)
    assert math.isclose(after["loss"], report["eval_after"]["loss"], rel_tol=1e-6)
    assert after["blocks"] == report["data"]["eval_blocks"] and after["packing"] == "wrapped"
    base = evaluate_run(out, base=True)   # B starts at zero: the base alone is the model before training
    assert math.isclose(base["loss"], report["eval_before"]["loss"], rel_tol=1e-6)
    assert base["loss"] > after["loss"]
    assert cli_main(["eval", "--output-dir", out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert math.isclose(printed["ppl"], report["eval_after"]["ppl"], rel_tol=1e-6)
    assert cli_main(["eval", "--output-dir", out]) == 0
    assert "run on the run's held-out blocks: loss" in capsys.readouterr().out


def test_eval_on_other_data_is_the_mean_over_its_examples(run, tiny, tmp_path):  # noqa: F811
    from qlora_ext.train.data import blocks_for
    from qlora_ext.train.rebuild import rebuild_run
    out, _ = run
    data = _examples_file(tmp_path / "other.jsonl", n=60, seed=5)
    bfd = evaluate_run(out, data=[data], seq_len=32)
    assert bfd["packing"] == "bfd"   # the run's --packing auto, for instruction data
    wrapped = evaluate_run(out, data=[data], packing="wrapped", seq_len=32)
    assert wrapped["packing"] == "wrapped" and wrapped["loss"] != bfd["loss"]
    # bfd: every example is evaluated on its own; its trained tokens are the completions less their first token
    rebuilt = rebuild_run(out, log=lambda s: None)
    model = rebuilt.model
    every = blocks_for([data], rebuilt.tokenizer, 32, 0, "bfd")
    total = count = 0.0
    for ids, labels, positions in zip(every.train, every.train_labels, every.train_positions):
        cuts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for a, b in zip(cuts, cuts[1:]):
            n = int((labels[a + 1:b] != IGNORE).sum())
            if n:
                with torch.no_grad():
                    total += float(model(input_ids=ids[None, a:b], labels=labels[None, a:b], use_cache=False).loss) * n
                count += n
    assert math.isclose(bfd["loss"], total / count, rel_tol=1e-5) and bfd["predicted_tokens"] == count


def test_adapters_disabled_restores_the_adapters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(5, 64)
    dense = model(x)
    qlora_ext.prepare_model(model, r=4, target_modules=["0", "2"])
    for m in model.modules():
        if isinstance(m, qlora_ext.LoRALinear):
            torch.nn.init.normal_(m.lora_B)
    with torch.no_grad():
        adapted = model(x)
        with qlora_ext.adapters_disabled(model):
            alone = model(x)
        again = model(x)
    assert torch.equal(adapted, again) and not torch.allclose(adapted, alone)
    reference = model[2].base(torch.relu(model[0].base(x)))   # the 4-bit bases alone
    assert torch.equal(alone, reference)
    assert (alone - dense).abs().max() < 0.1   # (the 4-bit base is near the dense model)


def test_eval_refuses_bad_flags(run, tmp_path):
    out, _ = run
    with pytest.raises(ConfigError, match="holds no run"):
        evaluate_run(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="held-out blocks are those of its --seq-len"):
        evaluate_run(out, seq_len=16)
    with pytest.raises(ConfigError, match="longer than the model allows"):
        evaluate_run(out, data=[str(tmp_path)], seq_len=4096)
    assert cli_main(["eval", "--output-dir", out, "--max-tokens", "10"]) == 2
    assert cli_main(["eval", "--output-dir", out, "--seq-len", "0"]) == 2


def test_eval_reads_the_files_and_packing_the_run_recorded(tiny, tmp_path, monkeypatch):  # noqa: F811
    """A run whose --data was relative is evaluated from elsewhere; its packing is the one it trained with even
    where a new probe of the rebuilt model would say otherwise; data edited since the run is an error."""
    from qlora_ext.train import trainer as trainer_module
    (tmp_path / "work").mkdir()
    _examples_file(tmp_path / "work" / "d.jsonl", n=300)
    monkeypatch.chdir(tmp_path / "work")
    report = train(_cfg(tiny, tmp_path / "run", data=["d.jsonl"], steps=2, eval_every=2, save_every=2),
                   log=lambda s: None)
    assert report["data"]["packing"] == "bfd" and report["data"]["file_paths"] == [str(tmp_path / "work" / "d.jsonl")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_module, "packed_attention_problem", lambda *a: "refused")
    got = evaluate_run(str(tmp_path / "run"))
    assert got["packing"] == "bfd" and math.isclose(got["loss"], report["eval_after"]["loss"], rel_tol=1e-6)
    with open(tmp_path / "work" / "d.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "the king", "completion": " walks"}) + "\n")
    with pytest.raises(ConfigError, match="no longer packs into the blocks"):
        evaluate_run(str(tmp_path / "run"))


def test_resume_refuses_data_edited_since_the_run_began(tiny, tmp_path):  # noqa: F811
    data = tmp_path / "d.txt"
    data.write_text(open(tiny[1] + "/a.txt").read())
    out = tmp_path / "run"
    train(_cfg(tiny, out, data=[str(data)], steps=4, eval_every=2, save_every=2), log=lambda s: None)
    rewind(out, 2)
    data.write_text(data.read_text() + "The ghost speaks of murder.\n" * 50)
    with pytest.raises(ConfigError, match="no longer packs into the blocks the run began with"):
        train(TrainConfig.from_dict({**json.load(open(out / "config.json")), "resume": True}), log=lambda s: None)


def test_eval_data_too_short_and_seq_len_one(run, tmp_path):
    out, _ = run
    short = tmp_path / "short.txt"
    short.write_text("the king")
    with pytest.raises(ConfigError, match="no block of --seq-len 32; give more text or lower --seq-len"):
        evaluate_run(out, data=[str(short)])
    assert cli_main(["eval", "--output-dir", out, "--data", str(short), "--seq-len", "1"]) == 2
    with pytest.raises(ConfigError, match="--seq-len must be at least 2"):
        TrainConfig(seq_len=1).validate()


def test_eval_data_holds_out_other_files(tiny, tmp_path):  # noqa: F811
    """--eval-data: every block of --data trains, every block of the eval files is evaluated (and qlora-train eval
    evaluates them again), packed as the train files are."""
    from qlora_ext.train.trainer import Trainer
    held = _examples_file(tmp_path / "held.jsonl", n=80, seed=9)
    cfg = _cfg(tiny, tmp_path / "run", eval_data=[held], steps=2, eval_every=2, save_every=2)
    t = Trainer(cfg, log=lambda s: None)
    t.setup()
    from qlora_ext.train.data import blocks_for, find_text_files
    assert t.packing == "wrapped"   # (auto: the train files', plain text)
    train_side = blocks_for(find_text_files([tiny[1]]), t.tokenizer, 32, 0, "wrapped")
    eval_side = blocks_for([held], t.tokenizer, 32, 0, "wrapped")
    assert torch.equal(t.data.train, train_side.train) and torch.equal(t.data.eval, eval_side.train)
    assert torch.equal(t.data.eval_labels, eval_side.train_labels) and t.data.eval_positions is None
    report = train(cfg, log=lambda s: None)
    assert report["data"]["eval_file_paths"] == [held]
    assert math.isclose(evaluate_run(report["config"]["output_dir"])["loss"], report["eval_after"]["loss"],
                        rel_tol=1e-6)


def test_run_blocks_label_text_beside_records(tiny, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer
    from qlora_ext.train.data import find_text_files, run_blocks
    tok = AutoTokenizer.from_pretrained(tiny[0])
    held = _examples_file(tmp_path / "held.jsonl", n=80, seed=9)
    text = find_text_files([tiny[1]])
    both = run_blocks(text, [held], tok, 32, 4, "wrapped")
    assert torch.equal(both.train_labels, both.train)   # text: every token labelled, as records' trained ones
    assert (both.eval_labels == IGNORE).any() and both.train_positions is None
    assert both.trained_tokens == int((both.train_labels[:, 1:] != IGNORE).sum() +
                                      (both.eval_labels[:, 1:] != IGNORE).sum())
    plain = run_blocks(text, text[:1], tok, 32, 4, "wrapped")
    assert plain.train_labels is None and plain.eval_labels is None


def test_eval_data_overlapping_data_is_refused(tiny, tmp_path):  # noqa: F811
    from qlora_ext.train.trainer import Trainer
    cfg = _cfg(tiny, tmp_path / "run", eval_data=[tiny[1] + "/a.txt"])
    with pytest.raises(ConfigError, match="--eval-data would evaluate on text the run trains on: .*a.txt"):
        Trainer(cfg, log=lambda s: None).setup()
    with pytest.raises(ConfigError, match="--eval-data path .* does not exist"):
        Trainer(_cfg(tiny, tmp_path / "run", eval_data=[str(tmp_path / "nope")]), log=lambda s: None).setup()


def test_resume_keeps_the_packing_the_run_began_with(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The probe is not asked again on --resume (on another device it might answer otherwise)."""
    from safetensors.torch import load_file
    from qlora_ext.train import trainer as trainer_module
    data = _examples_file(tmp_path / "d.jsonl", n=300)
    out = tmp_path / "run"
    train(_cfg(tiny, out, data=[data], steps=4, eval_every=2, save_every=2), log=lambda s: None)
    final = load_file(str(out / "adapter.safetensors"))
    rewind(out, 2)
    monkeypatch.setattr(trainer_module, "packed_attention_problem", lambda *a: "refused")
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    assert evaluate_run(str(out), packing="auto")["packing"] == "bfd"
