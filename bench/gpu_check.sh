#!/usr/bin/env bash
# The one-shot GPU check, for a lent GPU machine (H200: python3 3.12, torch 2.11 cu130, nvcc 13.0, no
# network): builds the extension for the GPU, runs every test (CUDA ones included), compute-sanitizer on
# the native harness and a small CUDA test subset, the benchmarks, and writes a Markdown + JSON report.
#
#   bash bench/gpu_check.sh --commit SHA [--only build,tests,sanitizer,bench] [--out DIR]
#
# Parts: build (always run when another part needs it), tests, sanitizer, bench (kernels, optimizer and
# the paper-claims study item 5: one QLoRA step of 7B- and 65B-shaped models). Results go to
# $OUT (the device tool's output folder) or --out, default bench/out/: gpu_check.md, gpu_check.json,
# gpu_check.log and the benchmarks' JSON (7 files; the device tool brings back 8 at most).
# Wheels of the peers (bitsandbytes, peft) are installed from .whl/ when present: see bench/README.md.
# Budget: about 5 minutes with the wheels (the issues allow up to 8); each part has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

commit="unknown"; only="build,tests,sanitizer,bench"; out="${OUT:-$ROOT/bench/out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --commit) commit="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
mkdir -p "$out"
log="$out/gpu_check.log"; : > "$log"
# Scratch (not $OUT, which brings back 8 files at most): env.txt, junit.xml, status/<part> = "rc seconds".
scratch=$(mktemp -d); status="$scratch/status"; mkdir -p "$status"
want() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
part() {  # part NAME TIMEOUT_S COMMAND...: runs a part with a time limit, logs it, records rc and seconds
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0))" > "$status/$name"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
  return $rc
}

export PYTHONUNBUFFERED=1 QLORA_CUDA=1 QLORA_CUDA_ARCHS="${QLORA_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "commit: $commit"; date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  python3 -c "import torch,sys; print('python:', sys.version.split()[0]); print('torch:', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2 | head -n 1 | sed 's/^/nvcc: /'
} > "$scratch/env.txt" 2>&1
tee -a "$log" < "$scratch/env.txt"

if want build || want tests || want bench || want sanitizer; then
  part build 240 python3 setup.py build_ext --inplace || { echo "build failed: nothing else can run"; }
fi
if want tests && [ "$(cut -d' ' -f1 "$status/build")" = 0 ]; then
  part tests 200 python3 -m pytest tests -q -rs -p no:cacheprovider --junitxml="$scratch/junit.xml"
fi
if want sanitizer && [ "$(cut -d' ' -f1 "$status/build")" = 0 ]; then
  if command -v compute-sanitizer >/dev/null; then
    part harness_build 120 bash -c "cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build/cmake"
    part memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 build/cmake/quantize_harness 257 4161 64 --no-bench
    part racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 build/cmake/quantize_harness 65 4161 64 --no-bench
    part memcheck_pytest 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest tests/test_quantize.py -q -p no:cacheprovider -k "cuda_matches_cpu and nf4 and bfloat16"
    part memcheck_dropout 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest tests/test_dropout.py -q -p no:cacheprovider -k "cuda and (bit_exact and 4097 or backward)"
    part memcheck_optim 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest tests/test_optim.py -q -p no:cacheprovider -k "cuda and (unaligned or page_out or bfloat16-True)"
    part memcheck_linear 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider \
        "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-65-128-17-torch.bfloat16-fused]" \
        "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-97-4160-1-torch.bfloat16-fused]" \
        "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[False-97-4160-64-torch.float16-fused]" \
        "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[True-65-128-257-torch.bfloat16-fused]" \
        "tests/test_linear_4bit.py::test_cuda_forward_backward_every_backend[False-97-4160-65-torch.float16-fused]" \
        "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[1-65-72-128-True-fp4-fused]"
    # the large-M kernels' shared-memory pipeline (cp.async stages, decoded weight tile, two barriers per step)
    part racecheck_linear 120 compute-sanitizer --tool racecheck --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider \
        "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[0-257-200-4096-False-int4-fused]" \
        "tests/test_linear_4bit.py::test_cuda_fused_large_m_code_books[1-65-72-128-True-fp4-fused]"
  else
    echo "compute-sanitizer: not on this machine, skipped" | tee -a "$log"
  fi
fi
if want bench && [ "$(cut -d' ' -f1 "$status/build")" = 0 ]; then
  part bench_quantize 120 python3 bench/bench_quantize_cuda.py --json "$out/bench_quantize_cuda.json"
  part bench_linear 150 python3 bench/bench_linear_cuda.py --json "$out/bench_linear_cuda.json"
  part bench_optim 240 python3 bench/bench_optim.py --device cuda --json "$out/bench_optim.json"
  part bench_train_gpu 240 python3 bench/bench_train_gpu.py --json "$out/bench_train_gpu.json"
  part train_study_gpu 300 python3 -m qlora_ext.train study --items 5 --out "$scratch/study" --no-progress
  [ -x build/cmake/quantize_harness ] && part harness_bench 60 build/cmake/quantize_harness
fi

python3 bench/gpu_report.py --out "$out" --scratch "$scratch" --commit "$commit"
rm -rf "$scratch"
