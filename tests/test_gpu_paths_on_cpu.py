"""Code that otherwise runs only on a GPU, exercised here on the CPU with stand-ins (a CPU "managed arena",
fake CUDA queries) or on synthetic inputs: the paged optimizers' arena checkpoints, the GPU check's report
and shell script, the CUDA benchmarks' argument parsing and the study's GPU item. The GPU session is short;
each test here pins a bug that would otherwise have been found there."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_ext import PagedAdamW, PagedAdamW8bit
from tests.test_optim import groups_of, make_grads, make_params
from tests.test_optim_8bit import _CpuArenaC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arena_mode(monkeypatch, cls):
    """Makes cls allocate its states in a CPU stand-in for the managed arena (the CUDA code path)."""
    import qlora_ext.optim as optim_module

    monkeypatch.setattr(optim_module, "_C", _CpuArenaC(optim_module._C))
    monkeypatch.setattr(cls, "_uses_arena", lambda self, device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = g
        opt.step()


# ---- paged optimizers: checkpoints of arena states ----------------------------------------------------
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_arena_state_dict_saves_with_torch_save_and_resumes(cls, monkeypatch):
    """On CUDA the states are views of one managed uint8 arena; PagedAdamW8bit's hold uint8 codes and float32
    absmax, and torch.save refuses tensors of two dtypes viewing one storage ("Cannot save multiple tensors
    or storages that view the same data as different types"): the trainer's first checkpoint with
    --optimizer paged_adamw8bit would have failed on the GPU."""
    shapes = [(4096,), (300, 70), (97,)]
    _arena_mode(monkeypatch, cls)
    params = make_params(shapes, torch.bfloat16, "cpu")
    opt = cls(groups_of(params))
    _run(opt, params, 3)
    assert len(opt._arenas) == 1
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # resume into a fresh optimizer (arena too) and continue: bit for bit the same as the original
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(groups_of(params2))
    opt2.load_state_dict(sd)
    _run(opt, params, 2, start=3)
    _run(opt2, params2, 2, start=3)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k


def test_8bit_arena_state_dict_copies_do_not_alias_the_arena(monkeypatch):
    _arena_mode(monkeypatch, PagedAdamW8bit)
    params = make_params([(4096,), (97,)], torch.float32, "cpu")
    opt = PagedAdamW8bit(params)
    _run(opt, params, 1)
    sd = opt.state_dict()
    (arena,) = opt._arenas
    for s in sd["state"].values():
        for n, v in s.items():
            if n != "step":
                assert v.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr(), n
    assert sd["state"][0]["state1"].stride() == params[0].stride()
    dense = opt.dense_state_dict()  # goes through state_dict() as well
    assert dense["state"][0]["exp_avg"].dtype == torch.float32


# ---- the CUDA benchmarks without a GPU -----------------------------------------------------------------
BENCH_SCRIPTS = ["bench_quantize_cuda.py", "bench_linear_cuda.py", "bench_optim.py", "bench_train_gpu.py"]


def _bench(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_bench_scripts_parse_their_arguments(script):
    p = _bench(os.path.join("bench", script), "--help")
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
@pytest.mark.parametrize("script", ["bench_quantize_cuda.py", "bench_linear_cuda.py", "bench_train_gpu.py"])
def test_cuda_benchmarks_exit_2_with_one_line_without_a_gpu(script):
    p = _bench(os.path.join("bench", script))
    assert p.returncode == 2 and "no CUDA device" in p.stderr, p.stdout + p.stderr


def test_bench_optim_cuda_goals_from_rows():
    """bench_optim.py wrote no "goals" into its JSON, so the GPU report showed none of issue 4's goals."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_optim
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))

    def row(name, ms, gbps=None):
        return {"name": name, "step_ms": ms, **({"GB_per_s": gbps} if gbps else {})}

    results = {"copy_GB_per_s": 4000.0,
               "a_lora_7b_r64": [row("PagedAdamW bf16 (paged, resident)", 1.0, 3600.0), row("PagedAdamW fp32", 2.0),
                                 row("torch AdamW fused fp32", 2.5),
                                 row("bitsandbytes PagedAdamW bf16 (32-bit states)", 1.5),
                                 row("PagedAdamW8bit bf16 (paged, resident)", 0.5, 3000.0)],
               "b_one_1b": [row("PagedAdamW bf16 (paged, resident)", 8.0, 3000.0)],
               "errors": {"b_one_1b: torch AdamW fused fp32": "RuntimeError: x"}}
    g = bench_optim.cuda_goals(results)
    assert g["a_lora_7b_r64_resident_bf16_pct_of_copy"] == {"goal": 85.0, "value": 90.0, "met": True}
    assert g["a_lora_7b_r64_fp32_vs_torch_fused"]["value"] == 1.25 and g["a_lora_7b_r64_fp32_vs_torch_fused"]["met"]
    assert g["a_lora_7b_r64_bf16_vs_bnb_paged_adamw"] == {"goal": 2.0, "value": 1.5, "met": False}
    assert g["b_one_1b_resident_bf16_pct_of_copy"]["met"] is False
    assert g["b_one_1b_fp32_vs_torch_fused"] == {"goal": 1.0, "value": None, "met": False}
    assert g["b_one_1b_bf16_vs_bnb_paged_adamw"]["goal"] == 1.0


def test_bench_train_gpu_debug_run_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "t.json"
    p = _bench("bench/bench_train_gpu.py", "--device", "cpu", "--layers", "1", "--hidden", "128", "--ffn", "256",
               "--heads", "4", "--vocab", "256", "--seq-len", "16", "--warmup", "1", "--steps", "1",
               "--only", "qlora_ext", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["results"][0]["name"] == "qlora_ext" and data["goals"]["tokens_per_s_vs_peft_bnb"]["met"] is None


# ---- study item 5 (one QLoRA step of 7B/65B shapes on the GPU), its glue on the CPU -------------------
def test_study_item5_glue_with_cuda_faked(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from qlora_ext.train import study, trainer

    tiny = {n: study.LlamaShape(n, hidden=128, ffn=256, layers=1, heads=4, vocab=256) for n in ("7B", "65B")}
    monkeypatch.setattr(study, "LLAMA_SHAPES", list(tiny.values()))
    real_build, real_step = study.build_quantized_llama, study.one_step
    monkeypatch.setattr(study, "build_quantized_llama", lambda s, dev: real_build(s, "cpu", r=4))
    monkeypatch.setattr(study, "one_step", lambda model, dev, optimizer: real_step(model, "cpu", seq=16,
                                                                                     optimizer=optimizer))
    for name, value in {"is_available": lambda: True, "empty_cache": lambda: None, "synchronize": lambda *a: None,
                        "reset_peak_memory_stats": lambda *a: None, "memory_allocated": lambda *a: 10 ** 9,
                        "max_memory_allocated": lambda *a: 2 * 10 ** 9,
                        "mem_get_info": lambda *a: (10 ** 9, 141 * 10 ** 9)}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    assert trainer.memory_bytes(torch.device("cuda"))["peak"] == 2 * 10 ** 9
    out = tmp_path / "study"
    assert study.main(["--items", "5", "--out", str(out), "--no-progress"]) == 0  # default: paged_adamw
    res = json.loads((out / "study.json").read_text())["item5"]
    assert [r["shape"] for r in res["rows"]] == ["7B", "65B"] and res["rows"][0]["optimizer"] == "paged_adamw"
    assert res["rows"][1]["peak"] == 2 * 10 ** 9 + res["rows"][1]["optimizer_managed"]
    assert "paper: 65B finetuning in < 48 GB -> measured peak 2.0 GB (below 48 GB)" in (out / "study.md").read_text()
