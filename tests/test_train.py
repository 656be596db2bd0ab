"""The trainer end to end on a tiny random llama (built with transformers, saved as a local model
directory with its own small BPE tokenizer): loss falls, adapters save and load, resume is bit-exact,
the report files exist and parse, and bad inputs give clear errors. About a minute on two cores."""
import json
import math
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

import qlora_ext  # noqa: E402
from qlora_ext.peft_io import load_peft_adapter  # noqa: E402
from qlora_ext.train import ConfigError, TrainConfig, load_adapters, train  # noqa: E402
from qlora_ext.train.cli import main as cli_main  # noqa: E402
from qlora_ext.train.data import batch_indices, pack  # noqa: E402
from qlora_ext.train.trainer import Trainer, lr_at  # noqa: E402

WORDS = ("the king and queen of denmark walk in the garden at night while the ghost of the old king speaks "
         "to his son of murder and revenge and the son swears to remember").split()


def _text(n_lines: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        start = int(torch.randint(0, len(WORDS) - 8, (1,), generator=g))
        lines.append(" ".join(WORDS[start: start + 8]).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, data_dir): a 2-layer llama (hidden 64, vocab ~200, max 64 positions) with a BPE
    tokenizer trained on the data, and a folder of two text files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(_text(300, 1))
    (data / "sub" / "b.txt").write_text(_text(300, 2))
    (data / "ignored.md").write_text("not a .txt file")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([str(data / "a.txt")], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return str(model_dir), str(data)


def _cfg(tiny, out, **kw):
    model_dir, data_dir = tiny
    base = dict(model=model_dir, data=[data_dir], output_dir=str(out), seq_len=32, eval_blocks=4, batch_size=4,
                steps=8, lr=1e-2, warmup_steps=2, r=4, alpha=8, dropout=0.1, eval_every=4, save_every=4,
                device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def rewind(out, step: int) -> None:
    """Pretends the run in `out` stopped after `step`: its later checkpoints gone, `latest` pointing at step."""
    for folder in (out / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (out / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")


def resume_adapters(out) -> dict:
    """Resumes the run in `out` from the command line; returns its final adapters."""
    from safetensors.torch import load_file
    assert cli_main(["--output-dir", str(out), "--resume", "--no-progress"]) == 0
    return load_file(str(out / "adapter.safetensors"))


def test_train_end_to_end_loss_falls_and_report_parses(tiny, tmp_path):
    r = train(_cfg(tiny, tmp_path / "run"), log=lambda s: None, sample_prompt="The king")  # the demo's sample
    assert isinstance(r["sample"], str) and len(r["sample"]) > len("The king")
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"] - 0.1
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]
    assert r["quantized_layers"] == 14 and r["trainable_params"] > 0
    assert 4.1 < r["base_bits_per_param"] < 4.2          # NF4 + double quant, measured from the buffers
    with open(r["report"]["json"]) as f:
        rep = json.load(f)
    assert rep["steps"] == 8 and len(rep["history"]) == 8 and [e["step"] for e in rep["evals"]] == [0, 4, 8]
    assert math.isclose(rep["eval_after"]["ppl"], math.exp(rep["eval_after"]["loss"]))
    assert "eval perplexity, after 8 steps" in open(r["report"]["markdown"]).read()
    if r["report"]["plot"] is not None:   # matplotlib is optional
        with open(r["report"]["plot"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(tmp_path / "run", "config.json")) as f:
        assert TrainConfig.from_dict(json.load(f)) == _cfg(tiny, tmp_path / "run")

    # The saved adapters, loaded into a freshly prepared model, reproduce the trained model's eval loss.
    t = Trainer(_cfg(tiny, tmp_path / "run2", dropout=0.0), log=lambda s: None)
    t.setup()
    load_adapters(t.model, r["adapter"])
    from qlora_ext.train.trainer import evaluate
    assert math.isclose(evaluate(t.model, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-6)
    # So do the PEFT-format ones the run also wrote (tests/test_peft_io.py checks that PEFT reads them).
    t2 = Trainer(_cfg(tiny, tmp_path / "run3", dropout=0.0), log=lambda s: None)
    t2.setup()
    load_peft_adapter(t2.model, r["peft_adapter"])
    assert math.isclose(evaluate(t2.model, t2.data.eval, 4, t2.device), r["eval_after"]["loss"], rel_tol=1e-6)
    assert f"PEFT adapter folder (`peft.PeftModel.from_pretrained(base, folder)`): `{r['peft_adapter']}`" in \
        open(r["report"]["markdown"]).read()
    # Every file the run wrote has the mode a file open() creates (safetensors >= 0.8 alone makes its files 0600)
    mask = os.umask(0)
    os.umask(mask)
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "run") for f in files]
    assert any(f.endswith(".safetensors") for f in written)
    assert {f: os.stat(f).st_mode & 0o777 for f in written} == {f: 0o666 & ~mask for f in written}


def test_load_in_4bit_trains_the_run_that_loading_dense_trains(tiny, tmp_path):
    """--load-in-4bit on quantizes as the checkpoint is read: the same base, so the same run, bit for bit (the
    dense load only adds its dense eval loss); auto stays dense on the CPU."""
    from safetensors.torch import load_file
    runs = {mode: train(_cfg(tiny, tmp_path / mode, steps=4, eval_every=2, load_in_4bit=mode), log=lambda s: None)
            for mode in ("on", "auto")}
    on, dense = runs["on"], runs["auto"]
    assert on["base_quantized_while_loading"] and not dense["base_quantized_while_loading"]
    assert on["dense_eval_loss"] is None and dense["dense_eval_loss"] is not None
    assert on["evals"] == dense["evals"]   # steps, losses, perplexities
    assert [h["loss"] for h in on["history"]] == [h["loss"] for h in dense["history"]]
    a, b = load_file(on["adapter"]), load_file(dense["adapter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantized as the checkpoint was read" in open(on["report"]["markdown"]).read()


def test_load_in_4bit_auto_falls_back_to_the_dense_load(tiny, tmp_path, monkeypatch):
    """A checkpoint load_4bit cannot read (here: a tensor missing, which from_pretrained initializes) loads dense
    under auto, as before; on is an error naming the problem."""
    from safetensors.torch import load_file, save_file
    from qlora_ext.train import trainer as trainer_module
    model_dir, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(broken / "model.safetensors"))
    monkeypatch.setattr(trainer_module, "resolve_load_in_4bit", lambda cfg, dev, path: True)  # as on a GPU
    logs = []
    t = Trainer(_cfg(tiny, tmp_path / "auto", model=str(broken), load_in_4bit="auto"), log=logs.append)
    t.setup()
    assert not t.loaded_4bit and any("loading the dense model instead" in m and "lacks 1 tensor" in m for m in logs)
    with pytest.raises(ConfigError, match="--load-in-4bit: .* lacks 1 tensor"):
        Trainer(_cfg(tiny, tmp_path / "on", model=str(broken), load_in_4bit="on"), log=lambda s: None).setup()


def test_rebuilt_run_quantizes_as_it_loads_unless_the_run_said_off(tiny, tmp_path):
    """merge and generate rebuild a run's model with load_4bit (no dense model in memory): the same model as the
    dense load, which a run with --load-in-4bit off keeps."""
    from qlora_ext.train.rebuild import rebuild_run
    out = tmp_path / "run"
    train(_cfg(tiny, out, steps=2, eval_every=2, save_every=2), log=lambda s: None)
    quantized = rebuild_run(str(out), log=lambda s: None)
    off = tmp_path / "off"
    shutil.copytree(out, off)
    config = json.loads((off / "config.json").read_text())
    (off / "config.json").write_text(json.dumps(dict(config, load_in_4bit="off")))
    dense = rebuild_run(str(off), log=lambda s: None)
    assert quantized.quantized_while_loading and not dense.quantized_while_loading
    a, b = quantized.model.state_dict(), dense.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loftq_adapters_only_load_into_a_loftq_model(tiny, tmp_path):
    r = train(_cfg(tiny, tmp_path / "loftq", steps=2, init_lora_weights="loftq"), log=lambda s: None)
    t = Trainer(_cfg(tiny, tmp_path / "plain", steps=2), log=lambda s: None)
    t.setup()
    with pytest.raises(ConfigError, match="was trained with --init-lora-weights loftq, the model is prepared with "
                                          "default"):
        load_adapters(t.model, r["adapter"])
    t = Trainer(_cfg(tiny, tmp_path / "again", steps=2, init_lora_weights="loftq"), log=lambda s: None)
    t.setup()
    load_adapters(t.model, r["adapter"])
    from qlora_ext.train.trainer import evaluate
    assert math.isclose(evaluate(t.model, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-6)


def test_init_adapter_continues_from_a_peft_folder(tiny, tmp_path, capsys):
    """A second run started from the first run's PEFT folder (--init-adapter, from the command line) begins where
    the first ended: its eval loss before training is the first run's after."""
    first = train(_cfg(tiny, tmp_path / "a", steps=4, dropout=0.0), log=lambda s: None)
    model_dir, data_dir = tiny
    argv = ["--model", model_dir, "--data", data_dir, "--output-dir", str(tmp_path / "b"), "--seq-len", "32",
            "--eval-blocks", "4", "--batch-size", "4", "--steps", "2", "--r", "4", "--alpha", "8", "--device", "cpu",
            "--no-progress", "--seed", "3", "--init-adapter", first["peft_adapter"]]
    assert cli_main(argv) == 0
    with open(tmp_path / "b" / "report.json") as f:
        second = json.load(f)
    assert second["config"]["init_adapter"] == first["peft_adapter"]
    assert math.isclose(second["eval_before"]["loss"], first["eval_after"]["loss"], rel_tol=1e-6)
    capsys.readouterr()
    # another rank does not fit: a clear error, no traceback
    assert cli_main(argv[:-2] + ["--r", "8", "--init-adapter", first["peft_adapter"], "--overwrite-output-dir"]) == 2
    err = capsys.readouterr().err
    assert "--init-adapter:" in err and "has r=8" in err
    assert "the adapter has r=4, lora_alpha=8.0, use_rslora=False, use_dora=False for layer" in err
    # a resumed run takes its checkpoint's adapters: the folder it started from may be gone
    shutil.rmtree(first["peft_adapter"])
    assert cli_main(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0


def test_init_adapter_takes_the_folder_s_adapter_settings_the_command_line_leaves_out(tiny, tmp_path, capsys):
    """Without --r, --alpha, ... the run takes them from the folder (as PEFT's from_pretrained would): a folder of
    rank 8 with patterns, rsLoRA and a head trained whole starts a run that needs no adapter flags."""
    first = train(_cfg(tiny, tmp_path / "a", steps=2, dropout=0.0, r=8, alpha=4.0, use_rslora=True,
                       rank_pattern={"q_proj": 2}, modules_to_save=["lm_head"], target_modules=["q_proj", "v_proj"]),
                  log=lambda s: None)
    model_dir, data_dir = tiny
    argv = ["--model", model_dir, "--data", data_dir, "--output-dir", str(tmp_path / "b"), "--seq-len", "32",
            "--eval-blocks", "4", "--steps", "1", "--device", "cpu", "--no-progress", "--seed", "3",
            "--init-adapter", first["peft_adapter"]]
    capsys.readouterr()
    assert cli_main(argv + ["--alpha", "4"]) == 0
    out = capsys.readouterr().out
    # (the folder says r 2 with v_proj at 8: as many layers of each rank, the first layer's is the default; the
    # layers come from its tensors, as full paths)
    layers = ",".join(f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv")
    assert (f"--init-adapter: --modules-to-save lm_head --r 2 --rank-pattern '{{\"v_proj\": 8}}' --target-modules "
            f"{layers} --use-rslora from the folder") in out
    second = json.loads((tmp_path / "b" / "report.json").read_text())
    assert math.isclose(second["eval_before"]["loss"], first["eval_after"]["loss"], rel_tol=1e-6)
    assert cli_main(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress", "--steps", "2"]) == 2   # same
    assert "--steps (saved 1, given 2)" in capsys.readouterr().err   # (the taken flags are the saved run's)


def test_init_adapter_takes_the_layers_of_a_peft_folder_however_it_selected_them(tiny, tmp_path, capsys):
    """A PEFT folder whose target_modules are dotted suffixes, limited by layers_to_transform, and whose
    modules_to_save "norm" (PEFT 0.21 matches it by characters: every *_layernorm too): the run takes the layers its
    tensors name, and the folder loads into its model."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    model_dir, data_dir = tiny
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["self_attn.q_proj", "mlp.down_proj"],
                             layers_to_transform=[1], modules_to_save=["norm"])
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    theirs.save_pretrained(str(tmp_path / "peft"))
    argv = ["--model", model_dir, "--data", data_dir, "--output-dir", str(tmp_path / "run"), "--seq-len", "32",
            "--eval-blocks", "4", "--steps", "1", "--device", "cpu", "--no-progress", "--quant-type", "none",
            "--dropout", "0", "--r", "4", "--alpha", "8", "--init-adapter", str(tmp_path / "peft")]
    assert cli_main(argv) == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "report.json").read_text())["config"]
    assert run["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    # what this PEFT version trains whole for "norm" (0.21: every *_layernorm too; later versions: model.norm)
    peft_whole = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if type(m).__name__ == "ModulesToSaveWrapper")
    assert "model.norm" in peft_whole and run["modules_to_save"] == peft_whole


@pytest.mark.parametrize("init", ["default", "loftq"])
def test_merge_writes_a_dense_model_that_computes_the_trained_one(tiny, tmp_path, capsys, init):
    """`qlora-train merge`: plain transformers loads the folder and computes the run's final eval loss."""
    from transformers import AutoModelForCausalLM
    from qlora_ext.train.trainer import evaluate

    out, merged = tmp_path / "run", tmp_path / "merged"
    r = train(_cfg(tiny, out, init_lora_weights=init), log=lambda s: None)
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(merged)]) == 0
    dense = AutoModelForCausalLM.from_pretrained(merged)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in dense.modules())
    assert dense.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert "Merged by qlora_ext" in (merged / "MERGED_FROM.txt").read_text()
    t = Trainer(_cfg(tiny, tmp_path / "data-only"), log=lambda s: None)
    t.setup()
    assert math.isclose(evaluate(dense, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-5)
    capsys.readouterr()
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(merged)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    # `qlora-train generate` continues a prompt with the run's model: greedily, as the merged model does in plain
    # transformers; sampled, the same text for the same seed
    greedy = ["generate", "--output-dir", str(out), "--prompt", "The king", "--max-new-tokens", "12",
              "--temperature", "0"]
    assert cli_main(greedy) == 0
    text = capsys.readouterr().out.strip()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer("The king", return_tensors="pt").input_ids
    expected = dense.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True) and expected.shape[1] > ids.shape[1]
    sampled = ["generate", "--output-dir", str(out), "--prompt", "The king", "--max-new-tokens", "12", "--seed", "5"]
    assert cli_main(sampled) == 0
    first = capsys.readouterr().out
    assert cli_main(sampled) == 0
    assert capsys.readouterr().out == first and first.strip()
    if init == "default":
        assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
        half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        assert cli_main(["merge", "--output-dir", str(tmp_path / "none"), "--to", str(tmp_path / "x")]) == 2
        assert "holds no run" in capsys.readouterr().err


def test_rslora_run_scales_by_alpha_over_sqrt_r_everywhere(tiny, tmp_path, capsys):
    """--use-rslora: the run's adapters scale by alpha / sqrt(r); its PEFT folder says so (PEFT's use_rslora), its
    merged model computes its eval loss, and neither its adapters nor a resume fit a model prepared without it."""
    from transformers import AutoModelForCausalLM
    from qlora_ext.train.trainer import evaluate

    out = tmp_path / "run"
    r = train(_cfg(tiny, out, steps=4, use_rslora=True), log=lambda s: None)
    assert json.loads(open(os.path.join(r["peft_adapter"], "adapter_config.json")).read())["use_rslora"] is True
    assert "alpha=8 (rsLoRA: alpha / sqrt(r))" in open(r["report"]["markdown"]).read()
    t = Trainer(_cfg(tiny, tmp_path / "check", dropout=0.0, use_rslora=True), log=lambda s: None)
    t.setup()
    scalings = {m.scaling for m in t.model.modules() if isinstance(m, qlora_ext.LoRALinear)}
    assert scalings == {4.0}   # 8 / sqrt(4), not 8 / 4
    load_adapters(t.model, r["adapter"])
    assert math.isclose(evaluate(t.model, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-6)
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "merged")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert math.isclose(evaluate(dense, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-5)
    plain = Trainer(_cfg(tiny, tmp_path / "plain"), log=lambda s: None)
    plain.setup()
    with pytest.raises(ConfigError, match="trained with --use-rslora, the model is prepared without it"):
        load_adapters(plain.model, r["adapter"])
    capsys.readouterr()
    assert cli_main(["--output-dir", str(out), "--resume", "--no-use-rslora", "--no-progress"]) == 2
    assert "--use-rslora (saved True, given False)" in capsys.readouterr().err


def test_dora_run_trains_resumes_merges_and_exports(tiny, tmp_path, capsys):
    """--use-dora: the magnitudes train with the adapters, a resume is bit-exact, the merged model computes the
    run's eval loss, the PEFT folder holds PEFT's DoRA (use_dora, lora_magnitude_vector), and its adapter file does
    not fit a plain LoRA model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from qlora_ext.train.trainer import evaluate

    out = tmp_path / "run"
    r = train(_cfg(tiny, out, steps=6, save_every=3, use_dora=True), log=lambda s: None)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    final = load_file(str(out / "adapter.safetensors"))
    magnitudes = [k for k in final if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 14
    peft_tensors = load_file(os.path.join(r["peft_adapter"], "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in peft_tensors) == 14
    assert json.loads(open(os.path.join(r["peft_adapter"], "adapter_config.json")).read())["use_dora"] is True
    assert "| DoRA | r=4" in open(r["report"]["markdown"]).read()
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "merged")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    t = Trainer(_cfg(tiny, tmp_path / "data-only"), log=lambda s: None)
    t.setup()
    assert math.isclose(evaluate(dense, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-5)
    with pytest.raises(ConfigError, match="trained with --use-dora, the model is prepared without it"):
        load_adapters(t.model, r["adapter"])
    rewind(out, 3)
    os.remove(out / "adapter.safetensors")
    resumed = resume_adapters(out)
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    capsys.readouterr()
    assert cli_main(["--output-dir", str(out), "--resume", "--no-use-dora", "--no-progress"]) == 2
    assert "--use-dora (saved True, given False)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="loftq cannot start DoRA layers"):
        _cfg(tiny, out, use_dora=True, init_lora_weights="loftq").validate()


def test_a_4bit_checkpoint_trains_the_run_that_quantizing_the_dense_one_trains(tiny, tmp_path, capsys):
    """`qlora-train quantize` writes a 4-bit copy (save_4bit); a run on it reads the 4-bit layers as saved and is
    the run that quantizes the dense checkpoint with the same settings, bit for bit (minus the dense eval); its
    merged model too. Settings that need dense weights are refused."""
    from safetensors.torch import load_file
    model_dir, _ = tiny
    q = tmp_path / "q"
    assert cli_main(["quantize", "--model", model_dir, "--to", str(q)]) == 0
    assert "4-bit model:" in capsys.readouterr().out
    assert cli_main(["quantize", "--model", model_dir, "--to", str(q)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    logs = []
    runs = {name: train(_cfg(tiny, tmp_path / name, steps=4, eval_every=2, save_every=2, model=m),
                        log=logs.append if name == "4bit" else lambda s: None)
            for name, m in (("4bit", str(q)), ("dense", model_dir))}
    four, dense = runs["4bit"], runs["dense"]
    assert four["base_from_4bit_checkpoint"] and not four["base_quantized_while_loading"]
    assert not dense["base_from_4bit_checkpoint"]
    assert four["dense_eval_loss"] is None and dense["dense_eval_loss"] is not None
    assert four["evals"] == dense["evals"] and four["quantized_layers"] == dense["quantized_layers"] == 14
    assert [h["loss"] for h in four["history"]] == [h["loss"] for h in dense["history"]]
    a, b = load_file(four["adapter"]), load_file(dense["adapter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("a 4-bit checkpoint (save_4bit)" in m for m in logs)
    assert any("eval before training" in m and "(a 4-bit checkpoint: no dense base)" in m for m in logs)
    assert "a 4-bit checkpoint (`qlora-train quantize`" in open(four["report"]["markdown"]).read()
    for name in ("4bit", "dense"):
        assert cli_main(["merge", "--output-dir", str(tmp_path / name), "--to", str(tmp_path / f"m-{name}")]) == 0
    m4, md = load_file(str(tmp_path / "m-4bit" / "model.safetensors")), load_file(str(tmp_path / "m-dense" /
                                                                                     "model.safetensors"))
    assert m4.keys() == md.keys() and all(torch.equal(m4[k], md[k]) for k in m4)
    assert "as saved 4-bit by qlora_ext.save_4bit" in (tmp_path / "m-4bit" / "MERGED_FROM.txt").read_text()
    peft_config = json.loads((tmp_path / "4bit" / "peft_adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == os.path.abspath(model_dir)   # the dense base, not q
    assert cli_main(["quantize", "--model", str(q), "--to", str(tmp_path / "qq")]) == 2
    assert "already a 4-bit checkpoint" in capsys.readouterr().err
    for change, message in ((dict(load_in_4bit="off"), "--load-in-4bit off needs dense weights"),
                            (dict(quant_type="none"), "--quant-type none .* needs dense weights"),
                            (dict(init_lora_weights="loftq"), "--init-lora-weights loftq needs dense weights")):
        with pytest.raises(ConfigError, match=message):
            Trainer(_cfg(tiny, tmp_path / "refused", model=str(q), **change), log=lambda s: None).setup()


def test_a_4bit_checkpoint_in_another_format_and_dtype_says_so(tiny, tmp_path, capsys):
    """The checkpoint's layers keep their format whatever the run's flags: the report shows the formats they
    hold, and the log says where flags or load dtype differ from the checkpoint's."""
    model_dir, _ = tiny
    q = tmp_path / "q"
    assert cli_main(["quantize", "--model", model_dir, "--to", str(q), "--quant-type", "fp4", "--no-double-quant",
                     "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    logs = []
    r = train(_cfg(tiny, tmp_path / "run", steps=2, eval_every=2, save_every=2, model=str(q)), log=logs.append)
    assert r["base_formats"] == ["14 x fp4, blocksize 64"] and 4.49 < r["base_bits_per_param"] < 4.51
    assert "| base | 14 x fp4, blocksize 64 (as the 4-bit checkpoint holds them) |" in \
        open(r["report"]["markdown"]).read()
    assert any("keep their format (fp4 blocksize 64)" in m for m in logs)
    assert any("quantized from bfloat16 weights and this run loads in float32" in m for m in logs)


def test_trains_a_prequantized_bitsandbytes_model(tiny, tmp_path):
    """A model directory saved by transformers with BitsAndBytesConfig (nf4, bitsandbytes' double quant) trains:
    its 4-bit layers are taken over exactly (tests/test_bnb_io.py), with their absmax in float32 (4.5 bits/param),
    and --resume still continues bit-exactly."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir, _ = tiny
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    prequantized = tmp_path / "bnb-model"
    AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config).save_pretrained(prequantized)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(prequantized)
    assert json.load(open(prequantized / "config.json"))["quantization_config"]["quant_method"] == "bitsandbytes"
    r = train(_cfg(tiny, tmp_path / "run", model=str(prequantized)), log=lambda s: None)
    assert r["quantized_layers"] == 14 and r["base_bits_per_param"] == pytest.approx(4.5, abs=1e-3)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"] - 0.1
    assert r["dense_eval_loss"] is None   # there is no dense base to evaluate
    # bitsandbytes itself computes the same eval loss before training (B = 0: the model is the base)
    from qlora_ext.train.trainer import evaluate
    t = Trainer(_cfg(tiny, tmp_path / "again", model=str(prequantized)), log=lambda s: None)
    t.setup()
    assert math.isclose(evaluate(t.model, t.data.eval, 4, t.device), r["eval_before"]["loss"], rel_tol=1e-6)
    peer = AutoModelForCausalLM.from_pretrained(prequantized)
    for m in peer.modules():           # its CPU inference repacking rounds absmax to bfloat16 (the trainer
        if hasattr(m, "support_avx512bf16_for_cpu"):   # turns it off too)
            m.support_avx512bf16_for_cpu = False
    assert math.isclose(evaluate(peer, t.data.eval, 4, t.device), r["eval_before"]["loss"], rel_tol=1e-6)
    # resumed from the middle of the run, it ends with the same adapters
    from safetensors.torch import load_file
    out = tmp_path / "run"
    final = load_file(str(out / "adapter.safetensors"))
    rewind(out, 4)
    resumed = resume_adapters(out)
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    # merged, it is a dense model: no quantization config left for transformers to apply
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "merged")]) == 0
    assert "quantization_config" not in json.load(open(tmp_path / "merged" / "config.json"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert math.isclose(evaluate(dense, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-5)


@pytest.mark.parametrize("optimizer,init", [("adamw", "default"), ("paged_adamw", "default"),
                                            ("paged_adamw8bit", "default"), ("paged_adamw", "loftq"),
                                            ("adamw", "loftq-randomized")])
def test_resume_is_bit_exact(tiny, tmp_path, optimizer, init, monkeypatch):
    """Also with LoftQ's start, which --resume computes again from the model (its SVD, exact or randomized with
    its seeded start, is deterministic)."""
    init, _, svd = init.partition("-")
    if optimizer == "paged_adamw8bit":  # the tiny model's adapters are below the default 4096-element threshold
        from qlora_ext.optim import PagedAdamW8bit
        monkeypatch.setitem(PagedAdamW8bit.__init__.__kwdefaults__, "min_8bit_size", 256)
    out = tmp_path / "run"
    cfg = _cfg(tiny, out, steps=6, save_every=3, eval_every=3, grad_accum=2, schedule="cosine", optimizer=optimizer,
               init_lora_weights=init, loftq_svd=svd or "exact")
    straight = train(cfg, log=lambda s: None)
    if optimizer == "paged_adamw8bit":
        saved = torch.load(out / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
        kinds = {("state1" in s) for s in saved["optimizer"]["state"].values()}
        assert kinds == {True, False}  # 8-bit states for the large adapters, float32 for the small ones
    from safetensors.torch import load_file
    final = load_file(str(out / "adapter.safetensors"))
    # Pretend the run stopped after step 3: drop the later checkpoint, then resume from the command line.
    rewind(out, 3)
    os.remove(out / "adapter.safetensors")
    resumed_adapters = resume_adapters(out)
    assert resumed_adapters.keys() == final.keys()
    assert all(torch.equal(resumed_adapters[k], final[k]) for k in final)
    with open(out / "report.json") as f:
        resumed = json.load(f)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["evals"] == straight["evals"]


def _log_lines(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _tensorboard_scalars(folder) -> dict:
    """tag -> [(step, value)] of the event files in folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_live_log_and_tensorboard_follow_the_run_and_a_resume_rewrites_them(tiny, tmp_path, capsys):
    """train_log.jsonl holds each step and each eval once, as the report's history; --report-to tensorboard writes
    the same scalars; a run resumed from an earlier checkpoint rewrites both from it (nothing twice, nothing lost),
    and --report-to may change on --resume."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    r = train(_cfg(tiny, out, steps=6, save_every=3, eval_every=3, report_to="tensorboard"), log=lambda s: None)
    lines = _log_lines(out)
    assert [x for x in lines if "loss" in x] == r["history"] and len(r["history"]) == 6
    assert [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x] == [(e["step"], e["loss"])
                                                                               for e in r["evals"]]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 3, 4, 5, 6, 6]   # a step's eval after its training
    assert all(x["peak_memory_bytes"] > 0 and x["tokens_per_s"] > 0 for x in r["history"])
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in r["history"]]
    assert [s for s, _ in scalars["eval/loss"]] == [0, 3, 6]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/ppl"} <= set(scalars)

    rewind(out, 3)   # as if the run died after step 4 had been logged: the log goes back to the checkpoint
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    capsys.readouterr()
    assert cli_main(["--output-dir", str(out), "--resume", "--no-progress", "--report-to", "none"]) == 0
    assert not (out / "tensorboard").exists()   # the dead process's events, beyond the checkpoint: gone
    again = _log_lines(out)
    assert [x["step"] for x in again] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    assert again[:5] == lines[:5] and [x["loss"] for x in again if "loss" in x][3:] == [
        h["loss"] for h in r["history"]][3:]   # the same steps trained again (bit-exact resume)
    assert cli_main(["--output-dir", str(out), "--resume", "--no-progress", "--report-to", "tensorboard"]) == 0
    assert [s for s, _ in _tensorboard_scalars(out / "tensorboard")["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_neftune_noise_is_bounded_and_only_in_training():
    from qlora_ext.train.neftune import neftune
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 50, (3, 25))
    emb.requires_grad_(False)   # frozen, as in a run
    clean = emb(ids)
    with neftune(model, 5.0):
        emb.train()
        noise = emb(ids) - clean
        bound = 5.0 / math.sqrt(25 * 32)
        assert noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound
        assert abs(float(noise.mean())) < 0.05 * bound and not torch.equal(emb(ids) - clean, noise)   # fresh
        emb.eval()
        assert torch.equal(emb(ids), clean)
    emb.train()
    assert torch.equal(emb(ids), clean)   # gone after the block
    with pytest.raises(ValueError, match="has none"), neftune(torch.nn.Linear(2, 2), 5.0):
        pass

    class NoEmbeddings(transformers.LlamaForCausalLM):   # transformers raises NotImplementedError for these
        def get_input_embeddings(self):
            raise NotImplementedError
    with pytest.raises(ValueError, match="NoEmbeddings has none"), neftune(NoEmbeddings(model.config), 5.0):
        pass


def test_neftune_run_trains_with_noise_evaluates_without_and_resumes_bit_exactly(tiny, tmp_path):
    """--neftune-noise-alpha: the first step's loss is another than without it (the noise is on), the eval before
    training is the same (no noise in eval mode), the report says so, and a resume draws the same noise."""
    from safetensors.torch import load_file
    plain = train(_cfg(tiny, tmp_path / "plain", steps=2, eval_every=2), log=lambda s: None)
    out = tmp_path / "run"
    noisy = train(_cfg(tiny, out, steps=6, save_every=3, eval_every=3, neftune_noise_alpha=5.0), log=lambda s: None)
    assert noisy["eval_before"] == plain["eval_before"]
    assert noisy["history"][0]["loss"] != plain["history"][0]["loss"]
    final = load_file(str(out / "adapter.safetensors"))
    rewind(out, 3)
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    with pytest.raises(ConfigError, match="--neftune-noise-alpha must be >= 0, got -1"):
        _cfg(tiny, out, neftune_noise_alpha=-1.0).validate()
    with pytest.raises(ConfigError, match="--neftune-noise-alpha must be finite, got inf"):
        _cfg(tiny, out, neftune_noise_alpha=math.inf).validate()


def test_a_gradient_that_is_not_finite_stops_the_run_before_its_step(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(math.inf))
    with pytest.raises(FloatingPointError, match="the gradient's norm is inf at step 1; lower --lr"):
        train(_cfg(tiny, out, save_every=1), log=lambda s: None)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    lines = _log_lines(out)   # the eval before training, and no step
    assert [x["step"] for x in lines] == [0] and "eval_loss" in lines[0]


def test_log_lines_are_strict_json(tmp_path):
    from qlora_ext.train.run_log import RunLog
    log = RunLog(str(tmp_path), "none", [{"step": 1, "loss": 2.0, "grad_norm": math.nan}],
                 [{"step": 0, "loss": 1e6}])
    log.step({"step": 2, "loss": 1.0, "grad_norm": math.inf})
    log.close()
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x, parse_constant=lambda c: pytest.fail(c)) for x in lines] == [
        {"step": 0, "eval_loss": 1e6, "eval_ppl": None}, {"step": 1, "loss": 2.0, "grad_norm": None},
        {"step": 2, "loss": 1.0, "grad_norm": None}]


def test_report_to_tensorboard_without_the_package_fails_before_the_model_loads(tiny, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="--report-to tensorboard needs the tensorboard package"):
        Trainer(_cfg(tiny, tmp_path / "run", report_to="tensorboard", model="/not/loaded"), log=lambda s: None).setup()
    with pytest.raises(ConfigError, match="--report-to must be one of \\('none', 'tensorboard'\\), got 'wandb'"):
        _cfg(tiny, tmp_path / "run", report_to="wandb").validate()


def test_rank_and_alpha_patterns_run_from_the_command_line_to_peft_and_merge(tiny, tmp_path, capsys):
    """--rank-pattern / --alpha-pattern (JSON): each layer trains at its own r and alpha, the PEFT folder holds
    the patterns, the merged model computes the run's eval loss, a resume must keep them, and the adapter file
    does not fit a model prepared with other alphas (same shapes: only the recorded alphas tell)."""
    from transformers import AutoModelForCausalLM
    from qlora_ext.train.trainer import evaluate

    model_dir, data_dir = tiny
    out = tmp_path / "run"
    argv = ["--model", model_dir, "--data", data_dir, "--output-dir", str(out), "--seq-len", "32", "--eval-blocks",
            "4", "--steps", "2", "--r", "4", "--alpha", "8", "--device", "cpu", "--no-progress", "--dropout", "0",
            "--rank-pattern", '{"q_proj": 8, "layers\\\\.1\\\\.mlp\\\\.(up|down)_proj": 2}',
            "--alpha-pattern", '{"v_proj": 2.5}']
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["rank_pattern"] == {"q_proj": 8, "layers\\.1\\.mlp\\.(up|down)_proj": 2}
    assert ('rank_pattern {"q_proj": 8, "layers\\\\.1\\\\.mlp\\\\.(up\\|down)_proj": 2}; alpha_pattern '  # "|": a cell
            '{"v_proj": 2.5}') in (
        out / "report.md").read_text()
    peft_config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["rank_pattern"], peft_config["alpha_pattern"]) == (
        4, {"layers\\.1\\.mlp\\.up_proj": 2, "layers\\.1\\.mlp\\.down_proj": 2, "q_proj": 8}, {"v_proj": 2.5})
    t = Trainer(_cfg(tiny, tmp_path / "check", dropout=0.0, rank_pattern=report["config"]["rank_pattern"]),
                log=lambda s: None)
    t.setup()
    ranks = {n: m.r for n, m in t.model.named_modules() if isinstance(m, qlora_ext.LoRALinear)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.1.mlp.up_proj"] == 2
    assert ranks["model.layers.0.mlp.up_proj"] == 4
    with pytest.raises(ConfigError, match="another alpha for 2 layer\\(s\\): model.layers.0.self_attn.v_proj "
                                          "\\(file 2.5, model 8.0\\)"):
        load_adapters(t.model, str(out / "adapter.safetensors"))
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "merged")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert math.isclose(evaluate(dense, t.data.eval, 4, t.device), report["eval_after"]["loss"], rel_tol=1e-5)
    capsys.readouterr()
    assert cli_main(["--output-dir", str(out), "--resume", "--rank-pattern", '{"q_proj": 4}', "--no-progress"]) == 2
    assert "--rank-pattern (saved {'q_proj': 8" in capsys.readouterr().err
    reordered = '{"layers\\\\.1\\\\.mlp\\\\.(up|down)_proj": 2, "q_proj": 8}'   # the first match wins: another run
    assert cli_main(["--output-dir", str(out), "--resume", "--rank-pattern", reordered, "--no-progress"]) == 2
    assert "--rank-pattern (saved" in capsys.readouterr().err
    for bad, message in (("q_proj=8", "argument --rank-pattern: not JSON"),   # argparse's usage error
                         ('["q_proj"]', "argument --rank-pattern: must be a JSON object")):
        with pytest.raises(SystemExit) as e:
            cli_main(argv[:-4] + ["--rank-pattern", bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert cli_main(argv[:-4] + ["--rank-pattern", '{"q_proj": 0.5}']) == 2
    assert "--rank-pattern['q_proj'] must be a positive integer, got 0.5" in capsys.readouterr().err


def test_an_adapter_file_from_before_layer_alphas_is_checked_against_its_run_s_alpha(tmp_path):
    from safetensors.torch import load_file, save_file
    from qlora_ext.train.checkpoint import save_adapters

    def model(alpha, r=4):
        torch.manual_seed(0)
        return qlora_ext.prepare_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)),
            r=r, alpha=alpha, quant_type="none")
    path = str(tmp_path / "adapter.safetensors")
    save_adapters(path, model(8.0), {"alpha": 8.0, "r": 4})
    save_file(load_file(path), path, metadata={"format": "qlora_ext-lora", "config": json.dumps({"alpha": 8.0})})
    load_adapters(model(8.0), path)
    with pytest.raises(ConfigError, match="another alpha for 7 layer"):
        load_adapters(model(16.0), path)
    with pytest.raises(ConfigError, match="another rank: prepare the model with the run's --r and --rank-pattern"):
        load_adapters(model(8.0, r=2), path)


def merged_evaluates_and_resume_is_exact(tiny, tmp_path, out, r, final):
    """`qlora-train merge` of the run in out gives a dense model computing the run's last eval loss, and a resume
    from its step-3 checkpoint ends with the same adapters (final); returns the dense model."""
    from transformers import AutoModelForCausalLM
    from qlora_ext.train.trainer import evaluate
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "merged")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    t = Trainer(_cfg(tiny, tmp_path / "data-only"), log=lambda s: None)
    t.setup()
    assert math.isclose(evaluate(dense, t.data.eval, 4, t.device), r["eval_after"]["loss"], rel_tol=1e-5)
    rewind(out, 3)
    os.remove(out / "adapter.safetensors")
    resumed = resume_adapters(out)
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    return dense


def test_modules_to_save_run_trains_the_head_resumes_merges_and_exports(tiny, tmp_path):
    """--modules-to-save lm_head: the head's copy trains with the adapters (in the adapter file and the PEFT folder,
    under PEFT's name), a resume is bit-exact, and the merged model computes the run's eval loss."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    r = train(_cfg(tiny, out, steps=6, save_every=3, eval_every=3, modules_to_save=["lm_head"]), log=lambda s: None)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    final = load_file(str(out / "adapter.safetensors"))
    assert "lm_head.trained_module.weight" in final and len(final) == 2 * 14 + 1
    assert "trained whole: lm_head" in open(r["report"]["markdown"]).read()
    peft_dir = out / "peft_adapter"
    assert json.loads((peft_dir / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    assert torch.equal(load_file(str(peft_dir / "adapter_model.safetensors"))["base_model.model.lm_head.weight"],
                       final["lm_head.trained_module.weight"])
    merged_evaluates_and_resume_is_exact(tiny, tmp_path, out, r, final)


def test_paged_adamw8bit_keeps_float32_states_for_a_trained_embedding(tiny, tmp_path, monkeypatch):
    """As Hugging Face's Trainer does with bitsandbytes' 8-bit optimizers: a token embedding trained whole
    (--modules-to-save embed_tokens) keeps float32 states, the large adapters get 8-bit ones."""
    from qlora_ext.optim import PagedAdamW8bit
    monkeypatch.setitem(PagedAdamW8bit.__init__.__kwdefaults__, "min_8bit_size", 256)
    t = Trainer(_cfg(tiny, tmp_path / "run", optimizer="paged_adamw8bit", modules_to_save=["embed_tokens"]),
                log=lambda s: None)
    t.setup()
    embedding = t.model.get_input_embeddings().trained_module.weight
    assert embedding.requires_grad and embedding.numel() >= 256
    assert not t.optimizer.is_8bit(embedding)
    assert any(t.optimizer.is_8bit(p) for p in t.params if p is not embedding)


def test_chat_template_lets_a_base_model_train_on_conversations(tiny, tmp_path, capsys):
    """--chat-template chatml on a model whose tokenizer has none: the conversations train, the config keeps the
    template's text, a resume given the same name continues (another template is refused), and the merged
    model's tokenizer renders with it."""
    from transformers import AutoTokenizer
    from qlora_ext.train.chat_template import CHATML

    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"the king {i}?"},
                                             {"role": "assistant", "content": _text(2, i)}]}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="need a tokenizer with a chat template"):
        train(_cfg(tiny, out, data=[str(chats)], steps=2), log=lambda s: None)
    notes = []
    r = train(_cfg(tiny, out, data=[str(chats)], steps=4, chat_template="chatml", save_every=2, eval_every=2),
              log=notes.append)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    assert any("<|im_start|>, <|im_end|> are not a token" in n for n in notes)   # the tiny BPE spells them out
    assert json.loads((out / "config.json").read_text())["chat_template"] == CHATML
    rewind(out, 2)
    capsys.readouterr()
    assert cli_main(["--output-dir", str(out), "--resume", "--no-progress", "--chat-template", "chatml"]) == 0
    assert cli_main(["--output-dir", str(out), "--resume", "--no-progress", "--chat-template",
                     "{% for m in messages %}{{ m['content'] }}{% endfor %}"]) == 2
    err = capsys.readouterr().err
    # long texts shown from where they differ
    assert "--chat-template (196 and 53 characters, differing from character 8" in err and len(err) < 600
    assert cli_main(["merge", "--output-dir", str(out), "--to", str(tmp_path / "merged")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML


def test_observe_eval_keeps_the_best_and_counts_evals_without_improvement():
    from qlora_ext.train.best_eval import observe_eval
    state = {}
    seen = [observe_eval(state, step, loss, patience=2, threshold=0.1)
            for step, loss in ((2, 3.0), (4, 2.95), (6, float("nan")), (8, 2.5), (10, 2.6), (12, 2.9))]
    # 2.95 is a new best but not a drop of more than 0.1: it counts toward the patience, as in transformers
    assert seen == [(True, False), (True, False), (False, True), (True, False), (False, False), (False, True)]
    assert state["best"] == {"step": 8, "loss": 2.5} and state["evals_without_improvement"] == 2
    assert observe_eval({}, 2, 1.0, patience=0, threshold=0.0) == (True, False)
    assert observe_eval({}, 2, float("nan"), patience=1, threshold=0.0) == (False, True)   # it counts too
    from qlora_ext.train.config import _token_indices_setting   # (a PEFT folder's setting for --init-adapter)
    assert _token_indices_setting({"embed_tokens": [5, 7], "lm_head": [5, 7]}) == ["5", "7"]
    assert _token_indices_setting({"embed_tokens": [5, 7], "lm_head": [5]}) is None
    assert _token_indices_setting([3]) == ["3"]


def test_load_best_model_at_end_and_early_stopping(tiny, tmp_path, monkeypatch):
    """Evals made to rise after step 4 (a scripted offset on the real eval loss): the run stops after two evals
    without a lower loss, ends with step 4's adapters (those of its checkpoint), reports both, and a resume
    from before the stop stops at the same step with the same adapters."""
    from safetensors.torch import load_file
    real_evaluate = Trainer.evaluate

    def evaluate(self):   # the eval loss, 10 lower at step 4 and 5 higher after it
        states = list(self.optimizer.state.values()) if hasattr(self, "optimizer") else []   # (dense base: none)
        step = int(states[0]["step"]) if states else 0
        return real_evaluate(self) + (-10.0 if step == 4 else 5.0 if step > 4 else 0.0)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    cfg = _cfg(tiny, out, steps=12, eval_every=2, save_every=2, load_best_model_at_end=True,
               early_stopping_patience=2)
    r = train(cfg, log=lambda s: None)
    assert r["steps"] == 8 and r["stopped_early_at"] == 8
    assert r["best_eval"]["step"] == 4 and r["eval_after"] == r["best_eval"] | {"ppl": r["eval_after"]["ppl"]}
    assert [e["step"] for e in r["evals"]] == [0, 2, 4, 6, 8]
    final = load_file(str(out / "adapter.safetensors"))
    at_best = load_file(str(out / "checkpoints" / "step-000004" / "adapter.safetensors"))
    at_stop = load_file(str(out / "checkpoints" / "step-000008" / "adapter.safetensors"))
    assert final.keys() == at_best.keys() and all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], at_stop[k]) for k in final)
    md = open(r["report"]["markdown"]).read()
    assert "| stopped early | at step 8 of 12" in md and "the best eval's (step 4;" in md
    # resumed from step 6: one more eval without improvement, the same stop and the same adapters
    rewind(out, 6)
    os.remove(out / "adapter.safetensors")
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_early_at"] == 8 and report["best_eval"]["step"] == 4
    with pytest.raises(ConfigError, match="--early-stopping-patience must be >= 0"):
        _cfg(tiny, out, early_stopping_patience=-1).validate()


def test_trainable_token_indices_run_trains_those_rows_resumes_merges_and_exports(tiny, tmp_path, capsys):
    """--trainable-token-indices (ids or tokens): those input-embedding rows train with the adapters (in the adapter
    file and, as PEFT's trainable_token_indices, the PEFT folder), a resume is bit-exact, the merged model computes
    the run's eval loss, and --init-adapter takes the rows from the folder."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny[0]).eos_token_id
    out = tmp_path / "run"
    r = train(_cfg(tiny, out, steps=6, save_every=3, eval_every=3, trainable_token_indices=["</s>", "5"]),
              log=lambda s: None)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    final = load_file(str(out / "adapter.safetensors"))
    rows = final["model.embed_tokens.trainable_tokens_delta"]
    assert rows.shape == (2, 64) and len(final) == 2 * 14 + 1
    assert "trained embedding rows: </s>,5".replace("|", "\\|") in open(r["report"]["markdown"]).read()
    peft_dir = out / "peft_adapter"
    assert json.loads((peft_dir / "adapter_config.json").read_text())["trainable_token_indices"] == [eos, 5]
    dense = merged_evaluates_and_resume_is_exact(tiny, tmp_path, out, r, final)
    assert torch.equal(dense.model.embed_tokens.weight[[eos, 5]], rows)
    model_dir, data_dir = tiny
    argv = ["--model", model_dir, "--data", data_dir, "--output-dir", str(tmp_path / "b"), "--seq-len", "32",
            "--eval-blocks", "4", "--batch-size", "4", "--steps", "1", "--device", "cpu", "--no-progress",
            "--init-adapter", str(peft_dir)]
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert f"--trainable-token-indices {eos},5" in capsys.readouterr().out
    assert cli_main(argv[:-2] + ["--trainable-token-indices", "<|im_start|>", "--overwrite-output-dir"]) == 2
    assert "['<|im_start|>'] are neither token ids nor tokens" in capsys.readouterr().err


def test_best_adapters_resume_from_their_checkpoint_when_later_evals_differ(tiny, tmp_path, monkeypatch):
    """A resumed run whose evals after its checkpoint come out otherwise than the first time (another device)
    still ends with the adapters its own best eval names: each checkpoint holds a copy of the best it knows."""
    from safetensors.torch import load_file
    real_evaluate = Trainer.evaluate
    lower_at = {"step": 6}

    def evaluate(self):   # step 6 is the best the first time; not after the resume
        states = list(self.optimizer.state.values()) if hasattr(self, "optimizer") else []
        step = int(states[0]["step"]) if states else 0
        return real_evaluate(self) + (-10.0 if step == lower_at["step"] else -5.0 if step == 4 else 0.0)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    train(_cfg(tiny, out, steps=8, eval_every=2, save_every=4, load_best_model_at_end=True), log=lambda s: None)
    at_4 = load_file(str(out / "checkpoints" / "step-000004" / "adapter.safetensors"))
    assert sorted(p.name for p in (out / "checkpoints").glob("best*")) == ["best-step-000006.safetensors"]
    rewind(out, 4)
    os.remove(out / "adapter.safetensors")
    lower_at["step"] = -1
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], at_4[k]) for k in at_4)
    assert json.loads((out / "report.json").read_text())["best_eval"]["step"] == 4


def test_save_total_limit_keeps_the_newest_checkpoints_and_resumes(tiny, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, out, steps=5, save_every=1, eval_every=5, save_total_limit=2), log=lambda s: None)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000004", "step-000005"]
    rewind(out, 4)
    assert cli_main(["--output-dir", str(out), "--resume", "--no-progress", "--save-total-limit", "1"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000005"]
    with pytest.raises(ConfigError, match="--save-total-limit must be >= 0"):
        _cfg(tiny, out, save_total_limit=-1).validate()


def test_resume_refuses_changed_flags(tiny, tmp_path, capsys):
    train(_cfg(tiny, tmp_path / "run", steps=2, save_every=2), log=lambda s: None)
    assert cli_main(["--output-dir", str(tmp_path / "run"), "--resume", "--lr", "0.5"]) == 2
    assert "--lr (saved 0.01, given 0.5)" in capsys.readouterr().err
    assert cli_main(["--output-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (dict(data=["/no/such/path"]), "does not exist"),
    (dict(data=["EMPTY"]), "hold no text"),
    (dict(seq_len=128), "longer than the model allows (max_position_embeddings = 64)"),
    (dict(target_modules=["q_proj", "qkv"]), "['qkv'] match no nn.Linear"),
    (dict(eval_blocks=100000), "--eval-blocks 100000 plus at least one training block"),
    (dict(quant_type="nf5"), "--quant-type must be one of"),
    (dict(linear_backend="fast"), "--linear-backend must be one of"),
    (dict(init_lora_weights="pissa"), "--init-lora-weights must be one of ('default', 'loftq')"),
    (dict(init_lora_weights="loftq", quant_type="none"), "--init-lora-weights loftq needs a quantized base"),
    (dict(loftq_iters=0), "--loftq-iters must be positive"),
    (dict(loftq_svd="fast"), "--loftq-svd must be one of ('exact', 'randomized'), got 'fast'"),
    (dict(init_adapter="/no/such/folder"), "--init-adapter /no/such/folder is not a folder"),
    (dict(model="/no/such/model"), "is not a directory"),
    (dict(load_in_4bit="yes"), "--load-in-4bit must be one of ('auto', 'on', 'off'), got 'yes'"),
    (dict(load_in_4bit="on", quant_type="none"), "--load-in-4bit on needs a quantized base"),
    (dict(load_in_4bit="on", init_lora_weights="loftq"), "--load-in-4bit on cannot start LoftQ"),
    (dict(load_in_4bit="on", target_modules=["q_proj", "qkv"]), "--load-in-4bit: target_modules ['qkv'] match no"),
])
def test_bad_inputs_give_clear_errors(tiny, tmp_path, change, message):
    if change.get("data") == ["EMPTY"]:
        (tmp_path / "empty.txt").write_text("  \n\n")
        change = dict(data=[str(tmp_path / "empty.txt")])
    with pytest.raises(ConfigError) as e:
        Trainer(_cfg(tiny, tmp_path / "run", **change), log=lambda s: None).setup()
    assert message in str(e.value)


def test_cli_prints_errors_without_traceback(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    assert cli_main(["--model", model_dir, "--data", str(tmp_path / "missing"), "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert "qlora-train: error: --data path" in err and "Traceback" not in err


def test_paged_adamw_missing_is_a_clear_error(tiny, tmp_path, monkeypatch):
    import sys
    import qlora_ext
    monkeypatch.setitem(sys.modules, "qlora_ext.optim", None)   # as in a build without the optimizer
    monkeypatch.delattr(qlora_ext, "optim", raising=False)      # else `from .. import optim` finds the attribute
    with pytest.raises(ConfigError, match="--optimizer paged_adamw needs qlora_ext.optim.PagedAdamW"):
        Trainer(_cfg(tiny, tmp_path / "run", optimizer="paged_adamw"), log=lambda s: None).setup()


def test_schedule_and_batch_order():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=14, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.03
    assert lr_at(10, TrainConfig(lr=1.0, warmup_steps=4, schedule="constant")) == 1.0
    linear = [lr_at(s, TrainConfig(lr=1.0, warmup_steps=4, steps=14, schedule="linear")) for s in range(14)]
    assert linear[:4] == [0.25, 0.5, 0.75, 1.0]
    assert linear[4:] == pytest.approx([1.0 - k / 10 for k in range(10)])   # transformers' linear schedule
    # Each epoch visits every block once; the order is a pure function of (seed, micro-step).
    seen = torch.cat([batch_indices(10, 3, 7, k) for k in range(10)])   # 30 draws = 3 epochs of 10
    for e in range(3):
        assert sorted(seen[10 * e: 10 * e + 10].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 3, 7, 5), seen[15:18])
    blocks = pack(list(range(100)), 10, 3, ["x"])
    assert blocks.train.shape == (7, 10) and blocks.eval.shape == (3, 10)
    assert sorted(torch.cat([blocks.train, blocks.eval]).flatten().tolist()) == list(range(100))


def test_study_nf4_table_and_memory_table():
    from qlora_ext.train import study
    assert study.item0_nf4_table(lambda s: None)["max_abs_deviation"] < 1e-6
    rows = {r["shape"]: r for r in study.item4_memory(None, lambda s: None)["rows"]}
    assert 6.5e9 < rows["7B"]["params"] < 6.9e9 and 64e9 < rows["65B"]["params"] < 66e9
    # 4.127 bits per linear weight + bf16 embeddings: 65B's 4-bit model is about 34.5 GB
    assert 33e9 < rows["65B"]["model_4bit"] < 36e9
    assert rows["65B"]["full_16bit_finetune"] > 780e9


def test_study_item3_reports_the_gap_along_the_way(tiny, tmp_path):
    """Item 3 on the tiny llama: four runs with one seed; the NF4+DQ gap to 16-bit LoRA at each evaluation
    (every quarter of the steps, step 0 = zero-shot), the last one being the headline number."""
    import types

    from qlora_ext.train import study
    model_dir, data_dir = tiny
    args = types.SimpleNamespace(model=model_dir, data=[data_dir], out=str(tmp_path), r=4, seq_len=32, eval_blocks=4,
                                 batch_size=4, steps=8, lr=1e-2, seed=3, device="cpu", progress=False)
    lines = []
    r = study.item3_finetune(args, lines.append)
    dense, nf4 = r["rows"][0], r["rows"][1]
    assert sorted(dense["eval_loss_by_step"]) == sorted(nf4["eval_loss_by_step"]) == [0, 2, 4, 6, 8]
    by_step = r["nf4_dq_vs_16bit_by_step"]
    assert by_step[8] == pytest.approx(r["nf4_dq_vs_16bit"])
    assert by_step[0] == pytest.approx(nf4["eval_loss_before"] / dense["eval_loss_before"] - 1)
    assert dense["eval_loss_after"] < dense["eval_loss_before"]
    assert any(line.startswith("    NF4+DQ vs 16-bit LoRA by step: 0: ") for line in lines), lines
    # the LoftQ run beside it (information): it starts closer to the dense model than the zero-start NF4 run
    loftq = r["rows"][3]
    assert loftq["init_lora_weights"] == "loftq" and loftq["quant_type"] == "nf4"
    assert abs(r["nf4_dq_loftq_vs_16bit_by_step"][0]) < abs(by_step[0])
    assert r["nf4_dq_loftq_vs_16bit"] == pytest.approx(loftq["eval_loss_after"] / dense["eval_loss_after"] - 1)


def test_study_gpu_step_code_path_on_a_tiny_shape():
    """Item 5's builder (meta device, one layer materialized and quantized at a time) and its training
    step, on the CPU with a tiny llama shape."""
    from qlora_ext.train import study
    shape = study.LlamaShape("tiny", hidden=128, ffn=256, layers=2, heads=4, vocab=256)
    model = study.build_quantized_llama(shape, "cpu", r=4)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    s = qlora_ext.model_summary(model)
    assert s.quantized_layers == 14 and s.trainable_params == shape.lora_params(4)
    step = study.one_step(model, "cpu", seq=32, optimizer="adamw")
    assert math.isfinite(step["loss"]) and abs(step["loss"] - math.log(256)) < 0.5


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]),
                    reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("linear_backend", ["auto", "fused"])
def test_train_on_cuda_bf16_autocast(tiny, tmp_path, linear_backend):
    """The same tiny run on the GPU (bf16 base and autocast, fp32 adapters), with the paged optimizer when
    this build has it; then resumed bit-exactly on the GPU. "fused": the fused 4-bit GEMMs in training."""
    try:
        import qlora_ext.optim  # noqa: F401
        optimizer = "paged_adamw"
    except ImportError:
        optimizer = "adamw"
    out = tmp_path / "run"
    try:
        _train_resume_on_cuda(tiny, out, optimizer, linear_backend)
    finally:
        qlora_ext.set_linear_backend("auto")


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]),
                    reason="needs a CUDA GPU and a CUDA build")
def test_train_on_cuda_with_a_head_trained_whole_and_neftune(tiny, tmp_path):
    """--modules-to-save lm_head (a bf16 copy trained beside fp32 adapters) and NEFTune's noise on the GPU: the loss
    falls, the copy is bf16 as the model is, and a resume is bit-exact (the CUDA generator's state is in the
    checkpoint)."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = train(_cfg(tiny, out, device="cuda", steps=6, save_every=3, eval_every=3, modules_to_save=["lm_head"],
                   neftune_noise_alpha=5.0), log=lambda s: None)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    final = load_file(str(out / "adapter.safetensors"))
    assert final["lm_head.trained_module.weight"].dtype == torch.bfloat16
    rewind(out, 3)
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def _train_resume_on_cuda(tiny, out, optimizer, linear_backend):
    r = train(_cfg(tiny, out, device="cuda", optimizer=optimizer, steps=6, save_every=3, eval_every=3,
                   linear_backend=linear_backend), log=lambda s: None)
    assert qlora_ext.linear_backend() == linear_backend
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    assert r["memory"]["cuda_max_allocated"] > 0 and r["memory"]["peak"] >= r["memory"]["cuda_max_allocated"]
    from safetensors.torch import load_file
    final = load_file(str(out / "adapter.safetensors"))
    rewind(out, 3)
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_epochs_set_the_steps(tiny, tmp_path, capsys):
    import math as _math
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = train(_cfg(tiny, out, epochs=1.5, eval_every=100, save_every=3), log=lambda s: None)
    per_step = 4   # batch 4 x accum 1
    assert r["steps"] == _math.ceil(1.5 * r["data"]["train_blocks"] / per_step) == len(r["history"])
    assert r["config"]["steps"] == r["steps"] and r["config"]["epochs"] == 1.5
    with open(out / "config.json") as f:
        assert json.load(f)["steps"] == r["steps"]   # (a resumed run computes the same)
    final = load_file(str(out / "adapter.safetensors"))
    rewind(out, 3)
    resumed = resume_adapters(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    assert cli_main(["--output-dir", str(tmp_path / "x"), "--steps", "5", "--epochs", "1"]) == 2
    assert "give --steps or --epochs, not both" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--epochs must be >= 0"):
        TrainConfig(epochs=-1).validate()


def test_resume_extends_a_constant_schedule_run_to_more_steps(tiny, tmp_path, capsys):
    """--steps may grow on --resume where the learning rate is constant: the extended run ends with the adapters
    of a run given the larger --steps from the start; a decaying schedule refuses (it decays over --steps)."""
    from safetensors.torch import load_file
    model_dir, data_dir = tiny
    common = ["--model", model_dir, "--data", data_dir, "--seq-len", "32", "--eval-blocks", "4", "--batch-size", "4",
              "--r", "4", "--alpha", "8", "--device", "cpu", "--no-progress", "--seed", "3", "--save-every", "4",
              "--eval-every", "4", "--warmup-steps", "2"]
    for out, steps in (("long", "8"), ("short", "4")):
        assert cli_main(common + ["--output-dir", str(tmp_path / out), "--steps", steps,
                                  "--schedule", "constant"]) == 0
    assert cli_main(["--output-dir", str(tmp_path / "short"), "--resume", "--steps", "8", "--no-progress"]) == 0
    a, b = (load_file(str(tmp_path / out / "adapter.safetensors")) for out in ("long", "short"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["steps"] == 8
    assert cli_main(["--output-dir", str(tmp_path / "short"), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "--steps 2 is below the checkpoint's step 8" in capsys.readouterr().err
    assert cli_main(common + ["--output-dir", str(tmp_path / "cosine"), "--steps", "2"]) == 0
    assert cli_main(["--output-dir", str(tmp_path / "cosine"), "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "can change only under --schedule constant" in capsys.readouterr().err


def test_resume_may_checkpoint_and_evaluate_at_other_steps(tiny, tmp_path, capsys):
    """--save-every and --eval-every may change on --resume (recorded in config.json from there on): the run
    trains the same adapters, bit for bit, with the evals and checkpoints where the new flags put them. Where the
    evals decide the best model or an early stop, --eval-every stays."""
    from safetensors.torch import load_file
    straight = train(_cfg(tiny, tmp_path / "straight", steps=8), log=lambda s: None)
    train(_cfg(tiny, tmp_path / "run", steps=8), log=lambda s: None)
    rewind(tmp_path / "run", 4)
    assert cli_main(["--output-dir", str(tmp_path / "run"), "--resume", "--no-progress", "--save_every", "1",
                     "--eval-steps", "3"]) == 0
    a, b = (load_file(str(tmp_path / out / "adapter.safetensors")) for out in ("straight", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [e["step"] for e in report["evals"]] == [0, 4, 6, 8]
    assert [e["loss"] for e in report["evals"] if e["step"] in (0, 4, 8)] == \
        [e["loss"] for e in straight["evals"]]   # the same model at the same steps: the same evals
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == \
        [f"step-{s:06d}" for s in (4, 5, 6, 7, 8)]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["save_every"], saved["eval_every"]) == (1, 3)
    # decisions rest on the evals: --eval-every stays (--save-every may still change)
    train(_cfg(tiny, tmp_path / "best", steps=8, load_best_model_at_end=True), log=lambda s: None)
    rewind(tmp_path / "best", 4)
    assert cli_main(["--output-dir", str(tmp_path / "best"), "--resume", "--eval-every", "2"]) == 2
    assert "--eval-every (saved 4, given 2) cannot change in a run whose evals decide the best model" in \
        capsys.readouterr().err
    assert cli_main(["--output-dir", str(tmp_path / "best"), "--resume", "--no-progress", "--save-every", "2"]) == 0


def test_a_refused_resume_leaves_the_runs_settings_as_they_were(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny[1], data)
    train(_cfg(tiny, tmp_path / "run", data=[str(data)], steps=4), log=lambda s: None)
    saved = (tmp_path / "run" / "config.json").read_text()
    (data / "a.txt").write_text((data / "a.txt").read_text() + " and more")
    assert cli_main(["--output-dir", str(tmp_path / "run"), "--resume", "--no-progress", "--eval-every", "1",
                     "--save-every", "2"]) == 2
    assert "no longer packs into the blocks the run began with" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").read_text() == saved
