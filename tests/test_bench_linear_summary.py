"""bench/bench_linear_cuda.py's summary, goals and routing, driven with made-up times, and its whole code run on
the CPU ops (its hidden --device cpu): the benchmark proper needs a GPU, and a crash or a wrong verdict in it
would waste a GPU session's measurements."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_linear_cuda as bench  # noqa: E402

N = K = 8192
MS = [1, 16, 128, 4096, 16384]


def times(ratio_auto, ratio_tune=None, bnb=1.0, dequant=1.0):
    """T for the goal shape: cuBLAS 1 s; auto = 1 / ratio_auto s; bnb and dequant as given (seconds)."""
    T = {}
    for d in ("fwd", "bwd"):
        for m in MS:
            T[(N, K, d, m, "cuBLAS bf16")] = 1.0
            T[(N, K, d, m, "ours auto")] = 1.0 / ratio_auto[m]
            T[(N, K, d, m, "bnb")] = bnb
            T[(N, K, d, m, "ours dequant")] = dequant
            if ratio_tune is not None:
                T[(N, K, d, m, "ours tune")] = 1.0 / ratio_tune[m]
    return T


def test_goals_met_and_not_met(capsys):
    auto = {1: 3.4, 16: 2.0, 128: 1.3, 4096: 0.96, 16384: 0.97}
    goals = bench.summarize(times(auto), [(N, K)], MS)
    assert goals["fwd_M1_cublas_over_auto"]["met"] and goals["fwd_M1_cublas_over_auto"]["value"] == 3.4
    assert not goals["fwd_M16_cublas_over_auto"]["met"]  # goal 3.0
    assert abs(goals["fwd_M1_cublas_over_auto"]["fraction_of_ceiling"] - 3.4 / bench.ceiling(N, K, 1)) < 1e-12
    assert goals["bwd_M4096_cublas_over_auto"]["met"] and goals["bwd_M16384_cublas_over_auto"]["met"]
    # "must": bnb and dequant take 1 s, auto 1/3.4 .. 1/0.96 s: the worst is M = 4096 (0.96 < 0.98)
    assert not goals["must_fwd_auto_vs_bnb"]["met"] and abs(goals["must_fwd_auto_vs_bnb"]["value"] - 0.96) < 1e-12
    assert not any(name.endswith("tune") or "_tune_" in name for name in goals)  # tune not measured
    out = capsys.readouterr().out
    assert "GOAL forward  M=1     cuBLAS/auto >= 3.3: 3.40 -> met" in out
    assert "GOAL forward  M=16    cuBLAS/auto >= 3.0: 2.00 -> NOT met" in out


def test_tune_goals_are_reported_beside_auto(capsys):
    auto = {m: 1.0 for m in MS}
    tune = {1: 3.5, 16: 3.1, 128: 1.4, 4096: 1.0, 16384: 1.0}
    goals = bench.summarize(times(auto, tune), [(N, K)], MS)
    assert not goals["fwd_M1_cublas_over_auto"]["met"] and goals["fwd_M1_cublas_over_tune"]["met"]
    assert goals["must_bwd_tune_vs_dequant"]["met"] and goals["must_bwd_auto_vs_dequant"]["met"]
    assert 'The same goals for backend "tune"' in capsys.readouterr().out


def test_missing_methods_and_other_shapes_do_not_crash(capsys):
    T = {(4096, 11008, "fwd", 1, "cuBLAS bf16"): 1.0, (4096, 11008, "fwd", 1, "ours auto"): 0.5}
    goals = bench.summarize(T, [(4096, 11008)], [1])
    assert goals == {}
    out = capsys.readouterr().out
    assert "goals: not evaluated" in out and "4096x11008" in out


def test_routing_suggestion_takes_the_fastest_correct_backend_and_merges_ranges(capsys):
    shapes = [(N, K), (4096, 11008)]
    speed = {  # time relative to dequant per (direction, m, backend); both shapes alike unless said
        ("fwd", 1): {"fused": 0.3}, ("fwd", 16): {"fused": 0.5}, ("fwd", 128): {"fused": 1.2, "fused_mma": 1.5},
        ("fwd", 4096): {"fused": 0.9, "fused_tn128": 0.95, "fused_mma": 1.3},
        ("fwd", 16384): {"fused": 0.97, "fused_tn128": 0.9, "fused_mma": 1.3},
        ("bwd", 1): {"fused": 0.4}, ("bwd", 16): {"fused": 0.6}, ("bwd", 128): {"fused": 0.8, "fused_mma": 0.7},
        ("bwd", 4096): {"fused": 0.9, "fused_mma": 1.2}, ("bwd", 16384): {"fused": 0.95, "fused_mma": 1.2},
    }
    T = {}
    for n, k in shapes:
        for (d, m), rel in speed.items():
            T[(n, k, d, m, "ours dequant")] = 1e-3 * m
            for b, r in rel.items():
                T[(n, k, d, m, f"ours {b}")] = r * 1e-3 * m
    # bwd M=128: mma.sync is fastest but failed its check on one shape, so fused (wgmma) is taken
    failed = {(4096, 11008, "bwd", 128, "fused_mma")}
    rules = bench.suggest_auto_routing(T, shapes, MS, failed)
    got = [(r["direction"], r["max_m"], r["backend"], round(r["speedup_vs_dequant"], 3)) for r in rules]
    assert got == [("fwd", 16, "fused", 2.0), ("fwd", 128, "dequant", 1.0), ("fwd", 4096, "fused", 1.111),
                   ("fwd", 16384, "fused_tn128", 1.111), ("bwd", 16384, "fused", 1.053)]
    out = capsys.readouterr().out
    assert "fwd: M <= 16: fused (2.00x dequant); M <= 128: dequant (1.00x dequant)" in out
    # the same from an unsorted list of M; per M (what routing_from_bench reads) nothing is merged
    assert bench.suggest_auto_routing(T, shapes, MS[::-1], failed) == rules
    by_m = bench.fastest_backend_by_m(T, shapes, MS[::-1], failed)
    assert [(c["direction"], c["m"], c["backend"]) for c in by_m if c["direction"] == "bwd"] == \
        [("bwd", 1, "fused"), ("bwd", 16, "fused"), ("bwd", 128, "fused"), ("bwd", 4096, "fused"),
         ("bwd", 16384, "fused")]
    assert [round(c["speedup_vs_dequant"], 3) for c in by_m if c["direction"] == "bwd"] == [2.5, 1.667, 1.25, 1.111,
                                                                                            1.053]


def test_routing_suggestion_without_measurements_is_empty(capsys):
    assert bench.suggest_auto_routing({}, [(N, K)], MS) == []
    assert "Routing" not in capsys.readouterr().out


SMALL = ["--device", "cpu", "--shapes", "192x128", "--ms", "1,65", "--reps", "2", "--warmup", "1"]


def test_cpu_debug_run_writes_the_json(tmp_path, capsys):
    """The benchmark's own code end to end on the CPU ops (hidden --device cpu; wall-clock times)."""
    out = tmp_path / "bench.json"
    assert bench.main(SMALL + ["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["checks"]["ok"] and data["aborted"] is None and not data["interrupted"]
    # fwd and bwd at M = 1 (auto, fused, dequant, tune, fused_grid) and M = 65 (the same but fused_mma for
    # fused_grid)
    assert len(data["checks"]["results"]) == 2 * 5 + 2 * 5
    assert {r["backend"] for r in data["checks"]["results"] if r["m"] == 1} == \
        {"auto", "fused", "dequant", "tune", "fused_grid"}
    assert {r["backend"] for r in data["checks"]["results"] if r["m"] == 65} == \
        {"auto", "fused", "dequant", "tune", "fused_mma"}
    methods = {r["method"] for r in data["rows"]}
    assert {"cuBLAS bf16", "ours auto", "ours fused", "ours fused_mma", "ours fused_grid", "ours dequant",
            "ours tune"} <= methods
    assert {r["direction"] for r in data["auto_routing_suggestion"]} == {"fwd", "bwd"}
    assert "checks: all 20 outputs within 2x" in capsys.readouterr().out


def test_cpu_debug_run_stopped_by_a_device_fault_still_reports(tmp_path, monkeypatch):
    """A sticky fault where no try catches it (here: the backward's cuBLAS timing) ends the measuring; what was
    measured before it is summarised and written, with the error, and the exit status says failure."""
    class DyingTimer(bench.HostTimer):
        cublas_calls = 0

        def __call__(self, fn):
            names = fn.__code__.co_names
            if "matmul" in names and not {"matmul_4bit", "dequantize_4bit"} & set(names):
                DyingTimer.cublas_calls += 1
                if DyingTimer.cublas_calls == 2:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().__call__(fn)

    monkeypatch.setattr(bench, "HostTimer", DyingTimer)
    out = tmp_path / "bench.json"
    assert bench.main(SMALL + ["--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["aborted"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert {(r["direction"], r["m"]) for r in data["rows"]} == {("fwd", 1)}
    assert any(f.startswith("aborted: RuntimeError") for f in data["checks"]["failures"])
