"""The "auto" backend's routing table (qlora_ext/routing.py, csrc/torch_bindings/linear_auto_routing.cpp): the
packaged table, the selection by GPU, direction and M, the checks of bad tables, the way from a
bench_linear_cuda.py result to a table entry (bench/routing_from_bench.py), and on CUDA that "auto" computes
exactly what the routed backend does."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

import qlora_ext
from qlora_ext import _C, routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_linear_cuda  # noqa: E402
import routing_from_bench  # noqa: E402

TABLE = {"gpus": {
    "sm_90": {"fwd": [{"max_m": 16, "backend": "fused"}, {"max_m": 64, "backend": "fused_grid"},
                      {"max_m": 4096, "backend": "dequant"}, {"max_m": 16384, "backend": "fused_tn128"}],
              "bwd": [{"max_m": 1, "backend": "fused_mma"}]},
    "sm_80": {"fwd": [{"max_m": 128, "backend": "fused"}]},
    "sm_100": {"bwd": [{"max_m": 64, "backend": "fused_grid"}]},
}}


@pytest.fixture(autouse=True)
def _restore_default_table():
    yield
    routing.set_auto_routing()


def test_the_packaged_table_is_valid_and_installed_by_default(monkeypatch):
    monkeypatch.delenv(routing.ENV_VAR, raising=False)
    qlora_ext.set_auto_routing(TABLE)
    qlora_ext.set_auto_routing()  # what import does
    table = routing.load_table(routing.PACKAGED_TABLE)
    assert _C.auto_routing() == routing.rules_of(table)
    # setup's package data ships it beside the module
    assert "auto_routing.json" in open(os.path.join(ROOT, "pyproject.toml")).read()


@pytest.mark.parametrize("cap,direction,m,expected", [
    (90, "fwd", 1, "fused"), (90, "fwd", 16, "fused"), (90, "fwd", 17, "fused_grid"), (90, "fwd", 64, "fused_grid"),
    (90, "fwd", 65, "dequant"), (90, "fwd", 4096, "dequant"), (90, "fwd", 4097, "fused_tn128"),
    (90, "fwd", 1 << 40, "fused_tn128"),  # above the last rule: the last rule
    (90, "bwd", 1, "fused_mma"), (90, "bwd", 2, "fused_mma"),
    (80, "fwd", 3, "fused"), (80, "bwd", 3, "dequant"),  # a direction without rules
    (89, "fwd", 3, "dequant"), (100, "fwd", 3, "dequant"),  # GPUs or directions without rules
    (100, "bwd", 3, "fused_grid"), (10, "bwd", 3, "dequant"),  # sm_100 is capability 10.0, not 1.0
])
def test_route_by_gpu_direction_and_m(cap, direction, m, expected):
    qlora_ext.set_auto_routing(TABLE)
    assert _C.auto_route(cap, direction, m) == expected


def test_installed_table_reads_back():
    qlora_ext.set_auto_routing(TABLE)
    got = qlora_ext.auto_routing()
    assert got == {k: {d: v[d] for d in ("fwd", "bwd") if d in v} for k, v in TABLE["gpus"].items()}
    assert routing.describe(got["sm_90"]) == ("fwd: M <= 16 fused, M <= 64 fused_grid, M <= 4096 dequant, "
                                              "M <= 16384 fused_tn128; bwd: M <= 1 fused_mma")


@pytest.mark.parametrize("gpus,message", [
    ({"sm90": {}}, "GPU key must look like 'sm_90'"),
    ({"sm_90": {"forward": []}}, "unknown keys ['forward']"),
    ({"sm_90": [1]}, "gpus['sm_90'] must be an object"),
    ({"sm_90": {"fwd": [{"max_m": "16", "backend": "fused"}]}}, "must be {'max_m': int, 'backend': str}"),
    ({"sm_90": {"fwd": [{"max_m": 16, "backend": "marlin"}]}}, "backend must be 'dequant', 'fused'"),
    ({"sm_90": {"fwd": [{"max_m": 0, "backend": "fused"}]}}, "max_m must be at least 1, got 0"),
    ({"sm_90": {"fwd": [{"max_m": 64, "backend": "fused"}, {"max_m": 64, "backend": "dequant"}]}},
     "max_m must increase within a capability and direction, but an earlier rule has max_m 64"),
])
def test_bad_tables_are_refused_and_the_table_is_kept(gpus, message):
    qlora_ext.set_auto_routing(TABLE)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace("{", r"\{")):
        qlora_ext.set_auto_routing({"gpus": gpus})
    assert _C.auto_route(90, "fwd", 1) == "fused"  # the table as it was


def test_bad_direction_and_capability_in_raw_rules():
    with pytest.raises(ValueError, match="direction must be 'fwd' or 'bwd', got 'up'"):
        _C.set_auto_routing([(90, "up", 16, "fused")])
    with pytest.raises(ValueError, match="capability must be a compute capability as major \\* 10 \\+ minor"):
        _C.set_auto_routing([(9, "fwd", 16, "fused")])
    with pytest.raises(ValueError, match="direction must be 'fwd' or 'bwd'"):
        _C.auto_route(90, "sideways", 1)


def test_a_bad_file_is_named(tmp_path):
    bad = tmp_path / "routing.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"routing table {bad}: not valid JSON"):
        routing.load_table(bad)
    bad.write_text(json.dumps({"gpus": {"sm_90": {"fwd": [{"max_m": 16, "backend": "magic"}]}}}))
    with pytest.raises(ValueError, match=f"routing table {bad}: auto routing rule .*backend must be"):
        qlora_ext.set_auto_routing(bad)


def test_an_install_without_the_table_warns_and_routes_nothing(tmp_path, monkeypatch):
    qlora_ext.set_auto_routing(TABLE)
    monkeypatch.delenv(routing.ENV_VAR, raising=False)
    monkeypatch.setattr(routing, "PACKAGED_TABLE", tmp_path / "auto_routing.json")
    with pytest.warns(UserWarning, match="auto_routing.json is missing from this install"):
        qlora_ext.set_auto_routing()
    assert _C.auto_routing() == []


def _env_run(value, code="import qlora_ext; print(qlora_ext.auto_routing())"):
    env = dict(os.environ, QLORA_AUTO_ROUTING=value)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_environment_variable_chooses_the_table(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(TABLE))
    r = _env_run(str(mine))
    assert r.returncode == 0, r.stderr
    assert ast.literal_eval(r.stdout)["sm_80"] == {"fwd": [{"max_m": 128, "backend": "fused"}]}
    r = _env_run("none")
    assert r.returncode == 0 and r.stdout.strip() == "{}", r.stderr
    r = _env_run(str(tmp_path / "missing.json"))
    assert r.returncode != 0 and "missing.json" in r.stderr


def bench_result(by_m, **overrides):
    result = {"benchmark": "bench_linear_cuda", "device": {"name": "NVIDIA H200", "capability": [9, 0]},
              "checks": {"ok": True, "failures": [], "results": [{"ok": True}]}, "interrupted": False,
              "aborted": None, "auto_routing_by_m": by_m, "versions": {"torch": "2.11.0"},
              "shapes": [[8192, 8192]], "fused_large_kernel": "wgmma"}
    result.update(overrides)
    return result


def choice(d, m, b, s):
    return {"direction": d, "m": m, "backend": b, "speedup_vs_dequant": s}


def test_entry_from_a_bench_result_keeps_dequant_where_the_gain_is_below_the_minimum():
    by_m = [choice("fwd", 128, "fused_grid", 1.01), choice("fwd", 1, "fused", 2.5), choice("fwd", 16, "fused", 1.8),
            choice("fwd", 4096, "dequant", 1.0), choice("fwd", 16384, "fused_tn128", 1.04),
            choice("bwd", 16, "fused", 1.02), choice("bwd", 128, "fused", 1.43), choice("bwd", 4096, "fused", 1.01)]
    key, entry = routing.entry_from_bench(bench_result(by_m), min_speedup=1.03, source="x.json")
    assert key == "sm_90"
    # per M, in order of M: 1.01x gives way to dequant and merges with the dequant M after it; a marginal M does
    # not take a neighbouring M's clear gain with it (bwd M = 128)
    assert entry["fwd"] == [{"max_m": 16, "backend": "fused"}, {"max_m": 4096, "backend": "dequant"},
                            {"max_m": 16384, "backend": "fused_tn128"}]
    assert entry["bwd"] == [{"max_m": 16, "backend": "dequant"}, {"max_m": 128, "backend": "fused"},
                            {"max_m": 4096, "backend": "dequant"}]
    assert entry["measured"]["gpu"] == "NVIDIA H200" and entry["measured"]["bench"] == "x.json"
    qlora_ext.set_auto_routing({"gpus": {key: entry}})
    assert _C.auto_route(90, "fwd", 2) == "fused" and _C.auto_route(90, "fwd", 100) == "dequant"


def test_a_run_whose_fused_kernel_was_mma_sync_routes_to_fused_mma():
    """With QLORA_DISABLE_WGMMA=1 (gpu_check.sh after a failed wgmma smoke test) "fused" measured mma.sync above
    M = 64: the table must name what was measured, not the wgmma kernel "fused" would run in another process."""
    by_m = [choice("fwd", 1, "fused", 2.5), choice("fwd", 4096, "fused", 1.1), choice("bwd", 4096, "fused_mma", 1.1)]
    key, entry = routing.entry_from_bench(bench_result(by_m, fused_large_kernel="mma.sync"))
    assert entry["fwd"] == [{"max_m": 4096, "backend": "fused_mma"}]
    assert entry["bwd"] == [{"max_m": 4096, "backend": "fused_mma"}]
    assert entry["measured"]["fused_large_kernel"] == "mma.sync"
    key, entry = routing.entry_from_bench(bench_result(by_m, device={"name": "B200", "capability": [10, 0]}))
    assert key == "sm_100" and entry["fwd"] == [{"max_m": 4096, "backend": "fused"}]


@pytest.mark.parametrize("overrides,message", [
    ({"benchmark": "bench_optim"}, "not a bench_linear_cuda.py result"),
    ({"checks": {"ok": False, "failures": ["8192x8192 fwd M=1 fused: error 0.3"], "results": [{"ok": False}]}},
     "checks did not pass \\(1 failed, first: 8192x8192 fwd M=1 fused"),
    ({"checks": {"ok": True, "failures": [], "results": []}}, "checked no outputs"),
    ({"interrupted": True}, "stopped early"),
    ({"aborted": "RuntimeError: CUDA error"}, "stopped early"),
    ({"auto_routing_by_m": []}, "has no per-M choice"),
    ({"device": {"name": "CPU", "capability": [0, 0]}}, "not a GPU's"),
])
def test_entry_from_a_bench_result_refuses_what_cannot_be_trusted(overrides, message):
    with pytest.raises(ValueError, match=message):
        routing.entry_from_bench(bench_result([choice("fwd", 16, "fused", 2.0)], **overrides))


def test_routing_from_bench_end_to_end(tmp_path, capsys):
    """The benchmark's own code (its CPU debug run) writes a result, routing_from_bench.py turns it into an
    entry of a copy of the packaged table (other GPUs' entries kept, the file replaced whole), and the entry
    installs."""
    out = tmp_path / "bench.json"
    assert bench_linear_cuda.main(["--device", "cpu", "--shapes", "192x128", "--ms", "1,65", "--reps", "2",
                                   "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["auto_routing_in_use"] == qlora_ext.auto_routing()
    result["device"]["capability"] = [9, 0]  # as if measured on an H200
    out.write_text(json.dumps(result))
    table = tmp_path / "auto_routing.json"
    table.write_text(json.dumps({"about": "test", "gpus": {"sm_80": TABLE["gpus"]["sm_80"]}}))
    capsys.readouterr()
    assert routing_from_bench.main([str(out), "--table", str(table), "--min-speedup", "1.0"]) == 0
    assert f"{table}: sm_90 <- fwd: M <= " in capsys.readouterr().out
    written = routing.load_table(table)
    assert written["about"] == "test" and written["gpus"]["sm_80"] == TABLE["gpus"]["sm_80"]
    # with --min-speedup 1.0, "auto" at each measured M is the backend the benchmark found fastest there ("fused"
    # named fused_mma where the run's large-M kernel was not wgmma, as in the CPU debug run)
    qlora_ext.set_auto_routing(table)
    assert result["auto_routing_by_m"]
    for c in result["auto_routing_by_m"]:
        want = "fused_mma" if c["backend"] == "fused" and result["fused_large_kernel"] != "wgmma" else c["backend"]
        assert _C.auto_route(90, c["direction"], c["m"]) == want, c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto_routing.json", "bench.json"]  # no temporaries
    # a run whose checks failed leaves the table as it was
    result["checks"] = {"ok": False, "failures": ["wrong"], "results": [{"ok": False}]}
    out.write_text(json.dumps(result))
    before = table.read_text()
    assert routing_from_bench.main([str(out), "--table", str(table)]) == 1
    assert table.read_text() == before


# --- CUDA: "auto" computes what the backend it is routed to computes (run by bench/gpu_check.sh) ---

def _backend_output(backend, x, dy, q, bias, split="auto", tile=0):
    qlora_ext.set_linear_backend(backend)
    _C.set_fused_split(split)
    _C.set_hopper_tile_n(tile)
    try:
        ops = torch.ops.qlora_ext
        args = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)
        y = ops.linear_4bit(x, *args, bias, q.blocksize, q.quant_type, q.shape[0])
        dx = ops.linear_4bit_grad_input(dy, *args, q.blocksize, q.quant_type, q.shape[1])
        torch.cuda.synchronize()
        return y, dx
    finally:
        qlora_ext.set_linear_backend("auto")
        _C.set_fused_split("auto")
        _C.set_hopper_tile_n(0)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 17, 65, 4097])
@pytest.mark.parametrize("routed", ["dequant", "fused", "fused_tn128", "fused_grid", "fused_mma"])
def test_cuda_auto_computes_what_the_routed_backend_computes(routed, m, rng):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(dev)
    n, k = 200, 4160
    w = torch.randn(n, k, generator=rng, dtype=torch.float32).to(dev)
    q = qlora_ext.quantize(w, quant_type="nf4", blocksize=64, double_quant=True)
    x = torch.randn(m, k, generator=rng, dtype=torch.float32).to(dev, torch.bfloat16)
    dy = torch.randn(m, n, generator=rng, dtype=torch.float32).to(dev, torch.bfloat16)
    bias = torch.randn(n, generator=rng, dtype=torch.float32).to(dev, torch.bfloat16)
    # the fixed backend bench_linear_cuda.py measures under this name
    fixed = {"dequant": ("dequant", "auto", 0), "fused": ("fused", "auto", 0), "fused_tn128": ("fused", "auto", 128),
             "fused_grid": ("fused", "grid", 0), "fused_mma": ("fused_mma", "auto", 0)}[routed]
    if routed == "fused_tn128" and qlora_ext.fused_large_kernel() != "wgmma":
        fixed = ("fused", "auto", 0)  # without the Hopper kernels the 128-column variant is "fused"
    want_y, want_dx = _backend_output(fixed[0], x, dy, q, bias, split=fixed[1], tile=fixed[2])
    cap = f"sm_{p.major}{p.minor}"
    qlora_ext.set_auto_routing({"gpus": {cap: {"fwd": [{"max_m": 1 << 30, "backend": routed}],
                                               "bwd": [{"max_m": 1 << 30, "backend": routed}]}}})
    # the test hooks' settings (split "cta", tile 256) must not leak into what "auto" routes to
    y, dx = _backend_output("auto", x, dy, q, bias, split="cta", tile=256)
    assert torch.equal(y, want_y) and torch.equal(dx, want_dx)
