"""Code that otherwise runs only on a GPU, exercised here on the CPU with stand-ins (a CPU "managed arena",
fake CUDA queries) or on synthetic inputs: the paged optimizers' arena checkpoints, the GPU check's report
and shell script, the CUDA benchmarks' argument parsing and the study's GPU item. The GPU session is short;
each test here pins a bug that would otherwise have been found there."""
import io
import json
import os
import shutil
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


# ---- bench/gpu_check.sh and bench/gpu_report.py, with every GPU tool faked --------------------------------
_FAKE_PYTHON = r'''#!{python}
"""Stands in for the GPU machine's python3: fakes the build, pytest, the benchmarks and the study; runs the
report and `-c` snippets with the real interpreter."""
import json, os, sys, time
REAL = {python!r}
args = sys.argv[1:]
if args[:1] == ["-c"] and "build_info()['cuda']" in args[1]:  # gpu_check's test of a prebuilt extension
    sys.exit(int(os.environ.get("FAKE_PREBUILT_IMPORT_RC", "0")))
if args[:1] == ["-c"] or any(a.endswith("gpu_report.py") for a in args):
    os.execv(REAL, [REAL] + args)
def arg_after(flag):
    return args[args.index(flag) + 1] if flag in args else None
def write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
if "setup.py" in args:
    print("fake build")
    rc = int(os.environ.get("FAKE_BUILD_RC", "0"))
    if rc == 0:
        os.makedirs("qlora_ext", exist_ok=True)
        open("qlora_ext/_C.fake.so", "w").close()
    sys.exit(rc)
if args[:2] == ["-m", "pytest"]:
    junit = [a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")]
    if junit and junit[0].endswith("junit_wgmma_smoke.xml"):  # the wgmma smoke test: FAKE_SMOKE_RC decides
        time.sleep(float(os.environ.get("FAKE_SMOKE_SLEEP", "0")))  # a hang, for the time limit to stop
        rc = int(os.environ.get("FAKE_SMOKE_RC", "0"))
        with open(junit[0], "w") as f:
            f.write('<?xml version="1.0"?><testsuites><testsuite><testcase classname="tests.test_smoke" name="t">'
                    + ('<failure message="wrong rows">trace</failure>' if rc else '') + '</testcase></testsuite>'
                    '</testsuites>')
        print("1 failed" if rc else "1 passed"); sys.exit(rc)
    suite = "cuda" if "cuda" in args[args.index("-m", 2) + 1:][:1] else "cpu"
    print("QLORA_DISABLE_WGMMA=" + os.environ.get("QLORA_DISABLE_WGMMA", "unset"))
    time.sleep(float(os.environ.get("FAKE_PYTEST_SLEEP_" + suite.upper(), "0")))
    if junit:
        with open(junit[0], "w") as f:
            f.write('<?xml version="1.0"?><testsuites><testsuite>'
                    f'<testcase classname="tests.test_{{suite}}" name="test_ok_{{suite}}"/>'
                    f'<testcase classname="tests.test_{{suite}}" name="test_bad_{{suite}}">'
                    '<failure message="assert 1 == 2">trace</failure></testcase>'
                    f'<testcase classname="tests.test_{{suite}}" name="test_skip"><skipped message="s"/></testcase>'
                    '</testsuite></testsuites>')
    print("1 failed, 1 passed, 1 skipped"); sys.exit(1)
script = os.path.basename(args[0]) if args else ""
out = arg_after("--json")
if script == "diagnose_fused_cuda.py":
    print("fwd TN=128 steps=1: 8192/16384 wrong (fake diagnosis)")
elif script == "ceilings_cuda.py":
    write(out, {{"copy_GB_per_s": 4300.0, "bf16_matmul_TFLOP_per_s": 780.0}})
elif script == "bench_quantize_cuda.py":
    write(out, {{"copy_bandwidth_Bps": 4.2e12, "goals": {{"dequantize_pct_of_copy": {{"goal": 90.0, "value": 93.5, "met": True}}}}}})
elif script == "bench_linear_cuda.py":
    write(out, {{"rows": [{{"method": "cuBLAS bf16", "tflops": 701.0}}, {{"method": "ours auto", "tflops": 650.0}}],
                "goals": {{"fwd_M1_cublas_over_auto": {{"goal": 3.3, "value": 2.9, "met": False, "ceiling": 3.88,
                                                     "fraction_of_ceiling": 0.75}},
                          "must_fwd_auto_vs_bnb": {{"goal": 0.98, "value": None, "met": False}}}},
                "auto_routing_suggestion": [{{"direction": "fwd", "max_m": 16, "backend": "fused",
                                             "speedup_vs_dequant": 2.5}},
                                            {{"direction": "fwd", "max_m": 16384, "backend": "dequant",
                                             "speedup_vs_dequant": 1.0}}]}})
elif script == "bench_optim.py":
    write(out, {{"cuda": {{"copy_GB_per_s": 4100.0}}, "goals": {{"a_lora_7b_r64_fp32_vs_torch_fused": {{"goal": 1.0, "value": 1.2, "met": True}}}}}})
elif script == "bench_train_gpu.py":
    write(out, {{"goals": {{"tokens_per_s_vs_peft_bnb": {{"goal": 1.3, "value": None, "met": None, "not_evaluated": "peft missing"}}}}}})
elif args[:3] == ["-m", "qlora_ext.train", "study"]:
    d = arg_after("--out"); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "study.md"), "w").write("65B: measured peak 40.1 GB (below 48 GB)\n")
    write(os.path.join(d, "study.json"), {{"item5": {{"rows": []}}}})
else:
    print("fake python3: unexpected", args); sys.exit(3)
'''

_FAKE_TOOLS = {
    "nvidia-smi": '#!/bin/bash\ncase "$*" in *driver_version*) echo 580.159.04 ;; *memory.total*) echo "143771 MiB, 1980 MHz" ;;'
                  ' *) echo "NVIDIA H200" ;; esac\n',
    "nvcc": '#!/bin/bash\necho "Cuda compilation tools, release 13.0, V13.0.88"\necho "Build cuda_13.0"\n',
    "compute-sanitizer": '#!/bin/bash\necho "========= COMPUTE-SANITIZER"\n'
                         'if [ -n "${FAKE_SANITIZER_ERRORS:-}" ]; then echo "========= Invalid __global__ write of size 4 bytes";'
                         ' echo "========= ERROR SUMMARY: 1 error"; exit 1; fi\necho "========= ERROR SUMMARY: 0 errors"\n',
    "cmake": '#!/bin/bash\nif [ "$1" = --build ]; then mkdir -p build/cmake && printf "#!/bin/bash\\necho harness\\n"'
             ' > build/cmake/quantize_harness && chmod +x build/cmake/quantize_harness; fi\n',
}


def _fake_gpu_machine(tmp_path):
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True, exist_ok=True)
    for name in ("gpu_check.sh", "gpu_report.py", "build_inputs_hash.sh"):
        (root / "bench" / name).write_text(open(os.path.join(ROOT, "bench", name)).read())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = dict(_FAKE_TOOLS, python3=_FAKE_PYTHON.format(python=sys.executable))
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return root, bin_dir


def _gpu_check(tmp_path, *args, timeout=120, **env):
    root, bin_dir = _fake_gpu_machine(tmp_path)
    out = tmp_path / "out"
    e = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), GPU_CHECK_RESERVE="2",
             GPU_CHECK_GRACE="2", **env)
    p = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--commit", "abc1234", *args], env=e,
                       capture_output=True, text=True, timeout=timeout)
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return p, md, report


def test_gpu_check_full_run_report_has_what_the_issues_ask_for(tmp_path):
    p, md, report = _gpu_check(tmp_path, "--budget", "100")
    assert p.returncode == 0, p.stdout + p.stderr
    for want in ("NVIDIA H200", "driver 580.159.04", "abc1234", "torch: 2.", "release 13.0",
                 "tests_cuda: 1 passed, 1 failed, 1 skipped", "FAILED `tests.test_cuda::test_bad_cuda`: assert 1 == 2",
                 "tests_cpu: 1 passed, 1 failed, 1 skipped", "memcheck_pytest: 0 errors", "racecheck_linear: 0 errors",
                 "4300 GB/s (ceilings_cuda.py", "780 TFLOP/s (ceilings_cuda.py", "701 TFLOP/s (bench_linear_cuda",
                 "| quantize_cuda: dequantize_pct_of_copy | 93.5 | 90 | met |",
                 "| linear_cuda: fwd_M1_cublas_over_auto | 2.9 (75% of the ceiling 3.88) | 3.3 | NOT met |",
                 "| linear_cuda: must_fwd_auto_vs_bnb | not measured | 0.98 | not evaluated |",
                 "optim: a_lora_7b_r64_fp32_vs_torch_fused", "not evaluated (peft missing)",
                 "65B: measured peak 40.1 GB", "- fwd: M <= 16: fused (2.5x); M <= 16384: dequant (1x)"):
        assert want in md, want
    states = {k: v["state"] for k, v in report["parts"].items()}
    assert states["build"] == "ok" and states["tests_cuda"] == "FAILED" and states["harness_bench"] == "ok"
    assert list(states)[:1] == ["build"] and "train_study_gpu" in states
    assert sorted(os.listdir(tmp_path / "out")) == ["bench_linear_cuda.json", "bench_optim.json",
                                                     "bench_quantize_cuda.json", "bench_train_gpu.json",
                                                     "gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_gpu_check_failed_wgmma_smoke_diagnoses_and_disables_wgmma(tmp_path):
    p, md, report = _gpu_check(tmp_path, "--only", "build,tests", FAKE_SMOKE_RC="1")
    states = {k: v["state"] for k, v in report["parts"].items()}
    assert list(states)[:3] == ["build", "wgmma_smoke", "wgmma_diagnose"], states
    assert states["wgmma_smoke"] == "FAILED" and states["wgmma_diagnose"] == "ok"
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "8192/16384 wrong (fake diagnosis)" in log
    assert "QLORA_DISABLE_WGMMA=1" in log and "QLORA_DISABLE_WGMMA=unset" not in log  # the later pytest runs
    assert "wgmma_smoke: 0 passed, 1 failed" in md


def test_gpu_check_hanging_wgmma_smoke_is_a_failure_without_diagnosis(tmp_path):
    p, md, report = _gpu_check(tmp_path, "--only", "build,tests", FAKE_SMOKE_SLEEP="60", GPU_CHECK_SMOKE_LIMIT="3")
    states = {k: v["state"] for k, v in report["parts"].items()}
    assert states["wgmma_smoke"] == "TIMED OUT" and "wgmma_diagnose" not in states, states
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "stopped at its limit (a hang?): no diagnosis" in log
    assert "QLORA_DISABLE_WGMMA=1" in log and "QLORA_DISABLE_WGMMA=unset" not in log


def test_gpu_check_passed_wgmma_smoke_keeps_wgmma(tmp_path):
    p, md, report = _gpu_check(tmp_path, "--only", "build,tests")
    assert "wgmma_diagnose" not in report["parts"] and report["parts"]["wgmma_smoke"]["state"] == "ok"
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "QLORA_DISABLE_WGMMA=unset" in log and "QLORA_DISABLE_WGMMA=1" not in log


def test_gpu_check_second_call_reuses_the_build_and_the_smoke_verdict(tmp_path):
    """Call 2 of a session runs on call 1's machine: same sources, so no rebuild and no second smoke test
    (a failed verdict still disables wgmma); a changed source file rebuilds and re-tests."""
    root, _ = _fake_gpu_machine(tmp_path)
    (root / "csrc").mkdir()
    (root / "csrc" / "kernel.cu").write_text("// v1\n")
    log = tmp_path / "out" / "gpu_check.log"
    _gpu_check(tmp_path, "--only", "build,tests", FAKE_SMOKE_RC="1")
    assert "fake build" in log.read_text() and "=== wgmma_smoke (" in log.read_text()
    p, md, report = _gpu_check(tmp_path, "--only", "bench")
    text = log.read_text()
    assert "fake build" not in text and "=== build: reused" in text, text
    assert "=== wgmma_smoke: rc=1, reused" in text and "=== wgmma_smoke (" not in text
    assert "the rest of the check runs with QLORA_DISABLE_WGMMA=1" in text
    assert report["parts"]["build"]["state"] == "ok" and report["parts"]["bench_linear"]["state"] == "ok"
    (root / "csrc" / "kernel.cu").write_text("// v2\n")
    _gpu_check(tmp_path, "--only", "bench")
    text = log.read_text()
    assert "fake build" in text and "=== wgmma_smoke (" in text and "reused" not in text


@pytest.mark.parametrize("case", ["match", "other inputs", "import fails"])
def test_gpu_check_installs_a_prebuilt_extension_only_for_the_same_inputs(tmp_path, case):
    """bench/prebuild_gpu_extension.sh's output (.prebuilt/: the xz-compressed extension and the build-inputs
    hash) is installed instead of a build when the hash is the machine's and it imports with CUDA; else built."""
    import lzma
    root, _ = _fake_gpu_machine(tmp_path)
    (root / "csrc").mkdir()
    (root / "csrc" / "kernel.cu").write_text("// v1\n")
    (root / "qlora_ext").mkdir()
    env = dict(os.environ, QLORA_CUDA_ARCHS="9.0a", PYTHON=sys.executable)   # the fake machine's python3 runs it
    inputs = subprocess.run(["bash", "bench/build_inputs_hash.sh"], cwd=root, env=env, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert len(inputs) == 64
    (root / ".prebuilt").mkdir()
    (root / ".prebuilt" / "build_inputs").write_text(("0" * 64 if case == "other inputs" else inputs) + "\n")
    (root / ".prebuilt" / "INFO").write_text("commit: abc1234\n")
    with lzma.open(root / ".prebuilt" / "_C.prebuilt.so.xz", "wb") as f:
        f.write(b"prebuilt bytes")
    _gpu_check(tmp_path, "--only", "build", QLORA_CUDA_ARCHS="9.0a",   # (CI's environment names other archs)
               FAKE_PREBUILT_IMPORT_RC="1" if case == "import fails" else "0")
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    if case == "match":
        assert "=== build: installed from .prebuilt/" in log and "fake build" not in log, log
        assert (root / "qlora_ext" / "_C.prebuilt.so").read_bytes() == b"prebuilt bytes"
        # and a second call on the same machine reuses it
        _gpu_check(tmp_path, "--only", "build", QLORA_CUDA_ARCHS="9.0a")
        assert "=== build: reused" in (tmp_path / "out" / "gpu_check.log").read_text()
    else:
        assert "installed from .prebuilt" not in log and "fake build" in log, log
        assert not (root / "qlora_ext" / "_C.prebuilt.so").exists()


def test_gpu_check_failed_build_still_reports(tmp_path):
    p, md, report = _gpu_check(tmp_path, "--only", "build,tests,sanitizer", FAKE_BUILD_RC="1")
    assert report["parts"]["build"]["state"] == "FAILED" and list(report["parts"]) == ["build"]
    assert "End of the log of `build` (FAILED)" in md and "fake build" in md
    assert "no junit results: not run" in md and "## Benchmark goals" in md


def test_gpu_check_sanitizer_findings_are_reported(tmp_path):
    p, md, report = _gpu_check(tmp_path, "--only", "sanitizer", FAKE_SANITIZER_ERRORS="1")
    assert "- memcheck: 1 errors" in md and "Invalid __global__ write of size 4 bytes" in md
    assert "tests_cuda" not in report["parts"]


def test_gpu_check_budget_stops_a_part_and_skips_the_rest(tmp_path):
    """tests_cuda runs past the budget: it is stopped at the budget (SIGINT), the background CPU tests too
    (SIGTERM), the sanitizer parts (beside them, quick here) have run, the bench parts after them are
    skipped, and the report is written with what there is."""
    # (the budget leaves room for the check's start: it imports torch a few times, 4 s here and over 12 s on a
    # fresh CI machine's cold disk, where a budget of 16 s was spent before tests_cuda began)
    p, md, report = _gpu_check(tmp_path, "--only", "tests,sanitizer,bench", "--budget", "30",
                               FAKE_PYTEST_SLEEP_CUDA="90", FAKE_PYTEST_SLEEP_CPU="90", timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    parts = report["parts"]
    assert parts["tests_cuda"]["state"] == "TIMED OUT" and parts["tests_cpu"]["state"] == "TIMED OUT"
    assert parts["memcheck_pytest"]["state"] == "ok" and "memcheck_pytest: 0 errors" in md
    assert parts["ceilings"]["state"].startswith("skipped") and parts["bench_linear"]["state"].startswith("skipped")
    assert "| tests_cuda | TIMED OUT | 124 |" in md


def test_gpu_check_sanitizer_selections_name_existing_tests():
    """compute-sanitizer runs a handful of CUDA tests by node id; an id that no longer exists (a renamed test or
    parameter) would make pytest collect nothing, and the sanitizer part would check nothing."""
    import re

    with open(os.path.join(ROOT, "bench", "gpu_check.sh")) as f:
        ids = re.findall(r'"(tests/[\w/.]+::[^"]+)"', f.read())
    assert len(ids) >= 20, ids
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    assert collected == set(ids), set(ids) ^ collected


def test_gpu_report_reads_an_interrupted_junit_and_damaged_inputs(tmp_path):
    """pytest stopped at its time limit writes a nameless <testcase/>; a benchmark killed mid-write leaves
    broken JSON; a status file may be half written: the report says so and is written all the same."""
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    (scratch / "status").mkdir(parents=True)
    out.mkdir()
    (scratch / "status" / "tests_cuda").write_text("124 230 230\n")
    (scratch / "status" / "bench_linear").write_text("")
    (scratch / "junit_tests_cuda.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite><testcase classname="tests.test_a" name="test_x[cuda]"/>'
        '<testcase time="0.000" /></testsuite></testsuites>')
    (scratch / "junit_tests_cpu.xml").write_text("<testsuites><testsuite><testcase")  # cut off
    (out / "bench_linear_cuda.json").write_text('{"goals": {"fwd')
    (out / "bench_optim.json").write_text(json.dumps({"goals": {"x": {"goal": 1.0, "value": True, "met": True}},
                                                      "interrupted": True}))
    (out / "bench_train_gpu.json").write_text(json.dumps({"goals": {"t": {"goal": 1.3, "value": 1.5, "met": None,
                                                                          "info": "what tune reaches"}}}))
    (out / "gpu_check.log").write_text("=== tests_cuda (12:00:00, limit 230 s)\nKeyboardInterrupt\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_report.py"), "--out", str(out),
                    "--scratch", str(scratch), "--commit", "c0ffee"], check=True, capture_output=True)
    md = (out / "gpu_check.md").read_text()
    assert "| tests_cuda | TIMED OUT | 124 | 230 | 230 |" in md
    assert "tests_cuda: 1 passed, 0 failed, 0 skipped, stopped during one more (part TIMED OUT" in md
    assert "tests_cpu: unreadable junit_tests_cpu.xml" in md
    assert "bench_linear_cuda.json: unreadable" in md and "bench_optim.json: the benchmark was interrupted" in md
    assert "| optim: x | True | 1 | met |" in md and "End of the log of `tests_cuda` (TIMED OUT)" in md
    assert "| train_gpu: t | 1.5 | 1.3 | information only: what tune reaches |" in md
    assert "no GPU found" in md  # no env.txt: nvidia-smi never ran


def test_gpu_report_with_nothing_at_all(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "o").mkdir()
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_report.py"), "--out", str(tmp_path / "o"),
                    "--scratch", str(tmp_path / "s")], check=True, capture_output=True)
    md = (tmp_path / "o" / "gpu_check.md").read_text()
    assert "(none ran)" in md and "not measured" in md and "no junit results: not run" in md


# ---- the CUDA benchmarks without a GPU -----------------------------------------------------------------
BENCH_SCRIPTS = ["bench_quantize_cuda.py", "bench_linear_cuda.py", "bench_optim.py", "bench_train_gpu.py",
                 "ceilings_cuda.py", "gpu_report.py"]


def _bench(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_bench_scripts_parse_their_arguments(script):
    p = _bench(os.path.join("bench", script), "--help")
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
@pytest.mark.parametrize("script", ["bench_quantize_cuda.py", "bench_linear_cuda.py", "ceilings_cuda.py",
                                    "bench_train_gpu.py"])
def test_cuda_benchmarks_exit_2_with_one_line_without_a_gpu(script):
    p = _bench(os.path.join("bench", script))
    assert p.returncode == 2 and "no CUDA device" in p.stderr, p.stdout + p.stderr


def test_bench_quantize_cuda_debug_run_on_cpu(tmp_path):
    """The CUDA quantize benchmark's own code on the CPU ops (hidden --device cpu): its checks, goals and JSON."""
    out = tmp_path / "q.json"
    p = _bench("bench/bench_quantize_cuda.py", "--device", "cpu", "--size", "256", "--reps", "2", "--warmup", "1",
               "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert set(data["goals"]) >= {"dequantize_pct_of_copy", "quantize_raw_pct_of_copy"}, data["goals"]
    assert "CUDA vs CPU kernels: codes equal" in p.stdout


def test_bench_optim_cuda_sets_debug_run_on_cpu(capsys):
    """bench_optim's CUDA part (both sets, every optimizer row, the goals) run on the CPU with small sets."""
    from types import SimpleNamespace

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_optim
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    results = {}
    goals = bench_optim.bench_cuda(SimpleNamespace(blocks=1, big=5000, reps=2), results, device="cpu")
    assert "errors" not in results, results["errors"]
    for key in ("a_lora_7b_r64", "b_one_1b"):
        names = {r["name"] for r in results[key]}
        assert {"PagedAdamW bf16 (paged, resident)", "PagedAdamW fp32", "PagedAdamW8bit bf16 (paged, resident)",
                "torch AdamW fused fp32"} <= names, names
        assert results[key][0]["params"] == (5000 if key == "b_one_1b" else sum(
            torch.Size(s).numel() for s in bench_optim.lora_shapes(blocks=1)))
    assert goals["a_lora_7b_r64_fp32_vs_torch_fused"]["value"] is not None
    assert "CPU debug run" in capsys.readouterr().out


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
               "--only", "qlora_ext,qlora_ext_tune", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["qlora_ext", "qlora_ext_tune"]
    assert [r["linear_backend"] for r in data["results"]] == ["auto", "tune"]
    assert all(r["tokens_per_s"] > 0 for r in data["results"])
    assert data["goals"]["tokens_per_s_vs_peft_bnb"]["met"] is None


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
                        "max_memory_allocated": lambda *a: 2 * 10 ** 9, "max_memory_reserved": lambda *a: 3 * 2 ** 30,
                        "mem_get_info": lambda *a: (10 ** 9, 141 * 10 ** 9)}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    assert trainer.memory_bytes(torch.device("cuda"))["peak"] == 2 * 10 ** 9
    out = tmp_path / "study"
    assert study.main(["--items", "5", "--out", str(out), "--no-progress"]) == 0  # default: paged_adamw
    res = json.loads((out / "study.json").read_text())["item5"]
    assert [r["shape"] for r in res["rows"]] == ["7B", "65B"] and res["rows"][0]["optimizer"] == "paged_adamw"
    assert res["rows"][1]["peak"] == 2 * 10 ** 9 + res["rows"][1]["optimizer_managed"]
    managed = res["rows"][1]["optimizer_managed"]
    assert (f"paper: 65B finetuning on a single 48 GB (48 GiB) GPU -> measured peak {(2e9 + managed) / 2**30:.1f} "
            f"GiB allocated + managed ({(2e9 + managed) / 1e9:.1f} GB), {(3 * 2**30 + managed) / 2**30:.1f} GiB "
            f"reserved + managed") in (out / "study.md").read_text()
    assert "below 48 GiB" in (out / "study.md").read_text()

    # a time limit's SIGINT during the 65B step: the 7B row and the log so far are kept, the exit status says so
    def interrupted_step(model, dev, optimizer):
        if model.config.hidden_size == 128 and interrupted_step.calls:
            raise KeyboardInterrupt
        interrupted_step.calls += 1
        return real_step(model, "cpu", seq=16, optimizer=optimizer)
    interrupted_step.calls = 0
    monkeypatch.setattr(study, "one_step", interrupted_step)
    assert study.main(["--items", "5", "--out", str(out), "--no-progress"]) == 130
    res = json.loads((out / "study.json").read_text())
    assert res["item5"]["interrupted"]
    assert any(line.startswith("    7B: model") for line in res["item5"]["log"])
    assert "[5] interrupted after" in (out / "study.md").read_text()


def test_random_llama_has_unit_norms_everywhere():
    """The final norm (model.model.norm, whose parameter is just "weight") is 1 like the layers' norms, not
    N(0, 0.02): that would shrink the logits 50x and pin the loss at ln(vocab)."""
    pytest.importorskip("transformers")
    from qlora_ext.train import study

    model = study.build_quantized_llama(study.LlamaShape("t", hidden=64, ffn=128, layers=2, heads=4, vocab=96),
                                        "cpu", r=4)
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 2 + 1 and all(torch.equal(p, torch.ones_like(p)) for p in norms.values()), norms.keys()
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_cuda_bench_timer_flush_reads_the_whole_buffer():
    """The L2 flush every CUDA benchmark runs before each timed call (its torch call itself, here on the CPU)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from cuda_bench import FLUSH_BYTES, Timer

    timer = Timer(reps=1, warmup=0, pad=False, device="cpu")
    timer.flush.fill_(1.0)
    timer.flush_l2()
    assert timer.flush_sink.item() == FLUSH_BYTES // 4 and timer.flush_sink.dim() == 0


def test_gpu_report_says_what_routing_from_bench_would_write_or_why_not(tmp_path):
    """The report carries the routing entry the run gives (so the session that reads it knows before committing
    the table), or the reason routing_from_bench would refuse the run."""
    def report(bench):
        scratch, out = tmp_path / "s", tmp_path / "o"
        for d in (scratch, out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        (out / "bench_linear_cuda.json").write_text(json.dumps(bench))
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_report.py"), "--out", str(out),
                        "--scratch", str(scratch)], check=True, capture_output=True)
        return (out / "gpu_check.md").read_text()

    bench = {"benchmark": "bench_linear_cuda", "device": {"name": "NVIDIA H200", "capability": [9, 0]},
             "checks": {"ok": True, "failures": [], "results": [{"ok": True}]}, "interrupted": False, "aborted": None,
             "fused_large_kernel": "wgmma", "goals": {},
             "auto_routing_by_m": [{"direction": "fwd", "m": 1, "backend": "fused", "speedup_vs_dequant": 3.0},
                                   {"direction": "fwd", "m": 4096, "backend": "dequant", "speedup_vs_dequant": 1.0}]}
    md = report(bench)
    assert ("`python bench/routing_from_bench.py` on this run's bench_linear_cuda.json would write sm_90: "
            "fwd: M <= 1 fused, M <= 4096 dequant") in md
    bench["checks"] = {"ok": False, "failures": ["8192x8192 fwd M=1 fused: error 0.3"], "results": [{"ok": False}]}
    assert "would refuse it: the benchmark's checks did not pass (1 failed, first: 8192x8192 fwd M=1" in report(bench)
