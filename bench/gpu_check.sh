#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (H200: python3 3.12, torch 2.11 cu130, nvcc 13.0, no network): builds
# the extension for the GPU (sm_90a), runs the tests (the ~1650 CUDA ones; the CPU ones alongside, in the
# background), compute-sanitizer on the native harness and on a small CUDA test subset (also alongside), the
# benchmarks, and writes a Markdown + JSON report.
#
#   bash bench/gpu_check.sh --commit SHA [--only build,tests,sanitizer,bench,train] [--budget SECONDS] [--out DIR]
#
# The device session has 15 minutes in all (the machine's start included) and 10 per command, so run it as two
# calls (bench/README.md):
#   1. --only build,tests,sanitizer --budget 300     (device tool: timeout_s 360)
#   2. --only bench,train --budget B                 (at once, while the machine is warm: call 1's build and
#                                                      smoke-test verdict are reused; B = 330, or less: what
#                                                      status's budget_left_s leaves after 60 s; timeout_s B + 60)
# --budget is the wall time of the whole script: each part runs under min(its own limit, what is left of the
# budget less 30 s for stopping and the report); a part with under 10 s left is skipped. A part stopped at its
# limit gets SIGINT first (pytest then writes its junit results, the benchmarks their JSON), SIGKILL 20 s later.
# The report is written in every case, also after a failed build.
#
# Parts: build (run when another part needs it; reused when the sources, arch list and torch are those of the
# last successful build on this machine; installed from .prebuilt/ when bench/prebuild_gpu_extension.sh built
# it elsewhere for the same inputs), wgmma_smoke (the Hopper kernels alone, first; on failure
# wgmma_diagnose prints how they are wrong and the rest runs with QLORA_DISABLE_WGMMA=1; the verdict is reused
# with the build), tests (tests_cuda; tests_cpu in the background), sanitizer (in the background beside
# tests_cuda: memcheck_pytest and racecheck_linear, the fused GEMMs, dropout and optimizers; then
# harness_build, memcheck/racecheck of the native harness), bench (ceilings, bench_linear, bench_optim, then after
# train: bench_quantize, harness_bench), train (bench_train_gpu, the paper-claims study item 5 on 7B/65B shapes).
# Results go to $OUT (the device tool's output folder) or --out, default bench/out/: gpu_check.md,
# gpu_check.json, gpu_check.log and the benchmarks' JSON (7 files; the device tool brings back 8 at most).
# Wheels of the peers (bitsandbytes, peft) are installed from .whl/ into /tmp/site for the tests (the
# bitsandbytes takeover and PEFT-format tests), bench and train parts: see bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

commit="unknown"; only="build,tests,sanitizer,bench,train"; out="${OUT:-$ROOT/bench/out}"; budget=300
while [ $# -gt 0 ]; do
  case "$1" in
    --commit) commit="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
for p in ${only//,/ }; do
  case "$p" in
    build|tests|sanitizer|bench|train) ;;
    *) echo "--only: unknown part '$p' (build, tests, sanitizer, bench, train)"; exit 2 ;;
  esac
done
case "$budget" in ''|*[!0-9]*) echo "--budget must be a number of seconds, got '$budget'"; exit 2 ;; esac
mkdir -p "$out"
log="$out/gpu_check.log"; : > "$log"
# Scratch (not $OUT, which brings back 8 files at most): env.txt, junit_*.xml, ceilings.json, study/,
# status/<part> = "rc seconds limit" (or "skipped 0 limit", "running").
scratch=$(mktemp -d); status="$scratch/status"; mkdir -p "$status"
deadline=$((SECONDS + budget))
RESERVE=${GPU_CHECK_RESERVE:-30}  # seconds kept for SIGKILL's grace period and the report
GRACE=${GPU_CHECK_GRACE:-20}      # seconds between a part's SIGINT/SIGTERM and its SIGKILL
want() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
ok() { [ -f "$status/$1" ] && [ "$(cut -d' ' -f1 "$status/$1")" = 0 ]; }
# part NAME LIMIT COMMAND...: runs a part under min(LIMIT, the budget left), records "rc seconds limit".
# PART_LOG (default the main log) and PART_SIGNAL (default INT) may be set for one call.
part() {
  local name=$1 limit=$2; shift 2
  local plog=${PART_LOG:-$log} sig=${PART_SIGNAL:-INT}
  local left=$((deadline - SECONDS - RESERVE))
  if [ "$left" -lt 10 ]; then
    echo "skipped 0 $limit" > "$status/$name"
    echo "=== $name: skipped, the time budget is spent" | tee -a "$log"
    return 125
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "running 0 $limit" > "$status/$name"
  echo "=== $name ($(date -u +%H:%M:%S), limit $limit s)" | tee -a "$plog"
  local t0=$SECONDS
  timeout -s "$sig" -k "$GRACE" "$limit" "$@" >>"$plog" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0)) $limit" > "$status/$name"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$plog"
  return $rc
}
# bg NAME COMMAND...: runs COMMAND (part itself, or a function of parts) in the background with its own log,
# appended to the main log by bg_wait NAME. Its parts are stopped with SIGTERM, not SIGINT: background jobs of
# a script ignore SIGINT; tests/conftest.py turns SIGTERM into KeyboardInterrupt when
# QLORA_SIGTERM_INTERRUPTS=1, so pytest still writes its junit.
declare -A bg_pid
bg() {
  local name=$1; shift
  PART_LOG="$scratch/$name.log" PART_SIGNAL=TERM "$@" >/dev/null &
  bg_pid[$name]=$!
}
bg_wait() {
  local name=$1 rc
  [ -n "${bg_pid[$name]:-}" ] || return 1
  wait "${bg_pid[$name]}"; rc=$?
  [ -f "$scratch/$name.log" ] && cat "$scratch/$name.log" >> "$log"
  unset "bg_pid[$name]"
  return $rc
}
# The compute-sanitizer parts, one after the other (in the background, beside the CUDA tests): the pytest ones
# first (the fused GEMMs, dropout, the optimizers), then the native harness (quantize only).
sanitizer_parts() {
  # one pytest process (torch's start under the sanitizer is paid once): quantize, dropout, both optimizers,
  # the small-M and large-M fused GEMMs
  part memcheck_pytest 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -p no:cacheprovider --basetemp="$scratch/pytest_memcheck" \
      "tests/test_quantize.py::test_cuda_matches_cpu_bit_for_bit[4097-torch.bfloat16-nf4]" \
      "tests/test_quantize.py::test_cuda_matches_cpu_bit_for_bit[255255-torch.bfloat16-nf4]" \
      "tests/test_quantize.py::test_cuda_unaligned_view_and_current_stream" \
      "tests/test_dropout.py::test_bit_exact_against_reference[4097-dtype0-cuda]" \
      "tests/test_dropout.py::test_bit_exact_against_reference[4097-dtype3-cuda]" \
      "tests/test_dropout.py::test_backward_applies_the_forward_mask[dtype1-cuda]" \
      "tests/test_optim.py::test_cuda_unaligned_params_take_the_scalar_path" \
      "tests/test_optim.py::test_cuda_page_out_then_step_matches_resident[PagedAdamW]" \
      "tests/test_optim.py::test_cuda_page_out_then_step_matches_resident[PagedAdamW8bit]" \
      "tests/test_optim.py::test_cuda_matches_cpu_bit_for_bit[True-torch.bfloat16]" \
      "tests/test_optim_8bit.py::test_cuda_unaligned_params_take_the_scalar_path" \
      "tests/test_optim_8bit.py::test_cuda_quantize_ops_match_cpu[True]" \
      "tests/test_optim_8bit.py::test_cuda_matches_cpu_bit_for_bit[True-torch.bfloat16]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-65-128-17-torch.bfloat16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-97-4160-1-torch.bfloat16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[False-97-4160-64-torch.float16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-65-128-257-torch.bfloat16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[False-97-4160-65-torch.float16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[1-65-72-128-True-fp4-256-fused]" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[1-65-72-128-True-fp4-128-fused_mma]" \
      "tests/test_linear_4bit.py::test_cuda_small_m_split_modes[63-4160-3-torch.bfloat16-auto-fused]" \
      "tests/test_linear_4bit.py::test_cuda_small_m_split_modes[97-8192-33-torch.bfloat16-grid-fused]" \
      "tests/test_linear_4bit.py::test_cuda_large_m_split_k[97-8256-65-auto-0-fused]" \
      "tests/test_linear_4bit.py::test_cuda_large_m_split_k[8257-192-128-auto-0-fused_mma]"
  # the shared memory of the small-M kernels' in-CTA reduction (up to 16 warps per tile) and of the large-M
  # kernels' pipelines (cp.async stages, decoded weight tiles, barriers; "fused": wgmma on the H200,
  # "fused_mma": mma.sync)
  part racecheck_linear 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 -m pytest -q -p no:cacheprovider --basetemp="$scratch/pytest_racecheck" \
      "tests/test_linear_4bit.py::test_cuda_small_m_split_modes[97-8192-1-torch.bfloat16-cta-fused]" \
      "tests/test_linear_4bit.py::test_cuda_small_m_split_modes[4097-640-17-torch.bfloat16-auto-fused]" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[0-257-200-4096-False-int4-256-fused]" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[1-65-72-128-True-fp4-128-fused]" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[0-257-200-4096-False-int4-128-fused_mma]"
  part harness_build 150 bash -c "cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build/cmake"
  if ok harness_build; then
    part memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 build/cmake/quantize_harness 257 4161 64 --no-bench
    part racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 build/cmake/quantize_harness 65 4161 64 --no-bench
  fi
}

export PYTHONUNBUFFERED=1 QLORA_CUDA=1 QLORA_CUDA_ARCHS="${QLORA_CUDA_ARCHS:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
export QLORA_SIGTERM_INTERRUPTS=1
if (want tests || want bench || want train) && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "commit: $commit"; date -u +"date: %Y-%m-%dT%H:%M:%SZ"; echo "only: $only"; echo "budget: $budget"
  nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -n 1 | sed 's/^/gpu: /'
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -n 1 | sed 's/^/driver: /'
  nvidia-smi --query-gpu=memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1 | sed 's/^/gpu_memory: /'
  python3 -c "import torch,sys; print('python:', sys.version.split()[0]); print('torch:', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2 | head -n 1 | sed 's/^/nvcc: /'
  command -v compute-sanitizer >/dev/null || echo "sanitizer: compute-sanitizer is not on this machine"
} > "$scratch/env.txt" 2>&1
tee -a "$log" < "$scratch/env.txt"

# The build is reused when the sources and arch list are those of the last successful build here (call 2 of a
# session runs on call 1's machine, whose copy of the tree may carry fresh file times that would make ninja
# recompile everything: about a minute of the 15), or installed from .prebuilt/ when
# bench/prebuild_gpu_extension.sh made it for the same inputs on another machine (bench/build_inputs_hash.sh).
install_prebuilt() {
  [ -f .prebuilt/build_inputs ] && [ "$(cat .prebuilt/build_inputs)" = "$inputs" ] &&
    ls .prebuilt/_C*.so.xz >/dev/null 2>&1 || return 1
  for xz in .prebuilt/_C*.so.xz; do
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      "$xz" "qlora_ext/$(basename "$xz" .xz)" || return 1
  done
  if python3 -c "import torch, qlora_ext; assert qlora_ext.build_info()['cuda']" >>"$log" 2>&1; then
    return 0
  fi
  rm -f qlora_ext/_C*.so; return 1
}
stamp="$ROOT/build/gpu_check_build.stamp"
if want build || want tests || want bench || want train || want sanitizer; then
  inputs=$(bash bench/build_inputs_hash.sh) || inputs="unknown-$$-$RANDOM"   # never equal to a stamp
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && ls qlora_ext/_C*.so >/dev/null 2>&1 &&
     python3 -c "import qlora_ext" >/dev/null 2>&1; then
    echo "0 0 0" > "$status/build"
    echo "=== build: reused (same sources, arch list and torch as the last build on this machine)" | tee -a "$log"
  elif install_prebuilt; then
    echo "0 0 0" > "$status/build"
    mkdir -p "$(dirname "$stamp")" && echo "$inputs" > "$stamp"
    echo "=== build: installed from .prebuilt/ (the same inputs; $(tr '\n' ' ' < .prebuilt/INFO))" | tee -a "$log"
  elif part build 240 python3 setup.py build_ext --inplace; then
    mkdir -p "$(dirname "$stamp")" && echo "$inputs" > "$stamp"
  else
    rm -f "$stamp"; echo "build failed: nothing else can run" | tee -a "$log"
  fi
fi
# The wgmma kernels first, alone, in their own process: they are the newest CUDA code, and a device fault is
# sticky for a process, so a broken one would fail every later CUDA test of the run. If this smoke test fails,
# the rest runs with QLORA_DISABLE_WGMMA=1 ("fused" then takes the mma.sync kernels; the report shows the part).
# The smoke verdict is reused when the build and what else decides it (the tests, the Python package) are
# unchanged: "<key> <smoke rc>".
smoke_stamp="$ROOT/build/gpu_check_smoke.stamp"
smoke_key="${inputs:-none}-$(cat tests/test_linear_4bit.py qlora_ext/*.py 2>/dev/null | sha256sum | cut -c1-16)"
if (want tests || want bench || want train || want sanitizer) && ok build; then
  if [ -f "$smoke_stamp" ] && [ "$(cut -d' ' -f1 "$smoke_stamp")" = "$smoke_key" ]; then
    smoke_rc=$(cut -d' ' -f2 "$smoke_stamp")
    echo "$smoke_rc 0 0" > "$status/wgmma_smoke"
    echo "=== wgmma_smoke: rc=$smoke_rc, reused from the last run on this build" | tee -a "$log"
  else
    part wgmma_smoke "${GPU_CHECK_SMOKE_LIMIT:-90}" \
      python3 -m pytest -q -p no:cacheprovider -m cuda --basetemp="$scratch/pytest_smoke" \
      --junitxml="$scratch/junit_wgmma_smoke.xml" \
      "tests/test_linear_4bit.py::test_cuda_hopper_runs_the_wgmma_kernels" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[0-65-72-128-True-nf4-128-fused]" \
      "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[1-257-200-4096-False-int4-256-fused]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-11008-256-4097-torch.bfloat16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[False-97-4160-257-torch.float16-fused]" \
      "tests/test_linear_4bit.py::test_cuda_large_m_split_k[97-8256-65-auto-0-fused]"
    smoke_rc=$(cut -d' ' -f1 "$status/wgmma_smoke")
    # a verdict: passed, failed, or stopped at its limit (six small GEMMs do not take 90 s: a hang); not
    # "skipped" (125) for want of budget
    case "$smoke_rc" in 0|1|124|137) echo "$smoke_key $smoke_rc" > "$smoke_stamp" ;; esac
    case "$smoke_rc" in
      0) ;;
      124|137) echo "wgmma smoke test stopped at its limit (a hang?): no diagnosis, it would hang too" |
                 tee -a "$log" ;;
      *) part wgmma_diagnose 60 python3 bench/diagnose_fused_cuda.py --backend fused ;;  # how it is wrong
    esac
  fi
  if [ "$smoke_rc" != 0 ]; then
    export QLORA_DISABLE_WGMMA=1
    echo "wgmma smoke test failed: the rest of the check runs with QLORA_DISABLE_WGMMA=1" | tee -a "$log"
  fi
fi
# Beside the CUDA tests, in the background: the CPU tests (CPU only) and the sanitizer parts (other processes
# on the GPU; the sanitizer's slowdown is theirs alone).
if want tests && ok build; then
  OMP_NUM_THREADS=4 bg tests_cpu part tests_cpu 240 python3 -m pytest tests -q -rs -p no:cacheprovider -m "not cuda" \
    --basetemp="$scratch/pytest_cpu" --junitxml="$scratch/junit_tests_cpu.xml"
fi
if want sanitizer && ok build && command -v compute-sanitizer >/dev/null; then
  bg sanitizer sanitizer_parts
elif want sanitizer; then
  echo "compute-sanitizer: not run (no successful build, or not on this machine)" | tee -a "$log"
fi
if want tests && ok build; then
  part tests_cuda 240 python3 -m pytest tests -q -rs -p no:cacheprovider -m cuda --basetemp="$scratch/pytest_cuda" \
    --junitxml="$scratch/junit_tests_cuda.xml"
fi
bg_wait sanitizer
bg_wait tests_cpu
# In order of priority (the open issues' goals first: the fused GEMMs, the paged optimizer, the trainer; then
# the quantize kernels, whose issue is closed): what the budget cannot reach is skipped.
if want bench && ok build; then
  part ceilings 60 python3 bench/ceilings_cuda.py --json "$scratch/ceilings.json"
  part bench_linear 150 python3 bench/bench_linear_cuda.py --json "$out/bench_linear_cuda.json"
  part bench_optim 150 python3 bench/bench_optim.py --device cuda --json "$out/bench_optim.json"
fi
if want train && ok build; then
  # ours with "auto", the peer, then (information) ours with "tune": last, so that a slow one cannot cost the goals
  part bench_train_gpu 200 python3 bench/bench_train_gpu.py --only qlora_ext,peft_bnb,qlora_ext_tune \
    --json "$out/bench_train_gpu.json"
  part train_study_gpu 200 python3 -m qlora_ext.train study --items 5 --out "$scratch/study" --no-progress
fi
if want bench && ok build; then
  part bench_quantize 90 python3 bench/bench_quantize_cuda.py --json "$out/bench_quantize_cuda.json"
  [ -x build/cmake/quantize_harness ] && part harness_bench 60 build/cmake/quantize_harness
fi
# anything still in the background has had its time limit; wait for it before the report
for name in "${!bg_pid[@]}"; do bg_wait "$name"; done

python3 bench/gpu_report.py --out "$out" --scratch "$scratch" --commit "$commit" || {
  echo "gpu_report.py failed; the raw status:" | tee -a "$log"; cat "$status"/* "$scratch/env.txt" | tee -a "$log"; }
# The device tool brings back files of up to 16 MiB: keep a huge log's head and tail.
if [ "$(wc -c < "$log")" -gt $((12 << 20)) ]; then
  { head -c $((4 << 20)) "$log"; printf '\n\n[... gpu_check.sh cut the middle of this log to fit 16 MiB ...]\n\n'
    tail -c $((6 << 20)) "$log"; } > "$log.cut" && mv "$log.cut" "$log"
fi
rm -rf "$scratch"
