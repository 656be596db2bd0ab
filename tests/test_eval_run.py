"""`qlora-train eval` (qlora_ext/train/eval_run.py) and qlora_ext.adapters_disabled: the run's held-out loss
computed again equals the report's last eval, the base alone its first (the adapters start at zero), another
file's loss is the mean of its examples' losses computed one by one, and bad flags give clear errors."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import qlora_ext  # noqa: E402
from qlora_ext.train import ConfigError, train  # noqa: E402
from qlora_ext.train.cli import main as cli_main  # noqa: E402
from qlora_ext.train.data import IGNORE  # noqa: E402
from qlora_ext.train.eval_run import evaluate_run  # noqa: E402
from tests.test_packing import _examples_file  # noqa: E402
from tests.test_train import _cfg, tiny  # noqa: F401  (the tiny llama and its BPE tokenizer, a fixture)


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
