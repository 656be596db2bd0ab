#!/usr/bin/env bash
# Builds the CUDA extension on this (GPU-less) machine for the lent GPU machine (its python 3.12 and torch 2.11
# cu130; sm_90a, as gpu_check.sh builds it), so that gpu_check.sh installs it instead of compiling there: a
# build is about a minute of a device session's 15, paid again on a fresh machine.
#
#   bash bench/prebuild_gpu_extension.sh PYTHON
#
# PYTHON: the interpreter of a virtual environment with the GPU machine's versions, e.g.
#   ~/.pyenv/versions/3.12.1/bin/python3 -m venv /tmp/v312
#   /tmp/v312/bin/pip install torch==2.11.0 numpy ninja pybind11 setuptools
#   bash bench/prebuild_gpu_extension.sh /tmp/v312/bin/python3
# The working tree (tracked and untracked files that git does not ignore) is built in a temporary copy. Output:
# .prebuilt/ (git-ignored; the device tool's carry names it beside .whl): the extension, xz-compressed, and
# build_inputs, the hash (bench/build_inputs_hash.sh) gpu_check.sh compares with its own: other sources, torch,
# python or arch list, and it builds there as before.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${1:?usage: bash bench/prebuild_gpu_extension.sh PYTHON}
export QLORA_CUDA=1 QLORA_CUDA_ARCHS="${QLORA_CUDA_ARCHS:-9.0a}" MAX_JOBS="${MAX_JOBS:-2}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
(cd "$work" && "$PYTHON" setup.py -q build_ext --inplace >"$work/build.log" 2>&1) || {
  tail -n 40 "$work/build.log"; echo "prebuild: the build failed"; exit 1; }
inputs=$(cd "$work" && PYTHON="$PYTHON" bash bench/build_inputs_hash.sh)
rm -rf .prebuilt && mkdir -p .prebuilt
for so in "$work"/qlora_ext/_C*.so; do
  "$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), lzma.open(sys.argv[2], 'wb', preset=6))" \
    "$so" ".prebuilt/$(basename "$so").xz"
done
echo "$inputs" > .prebuilt/build_inputs
{ echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc setup.py || echo ' + uncommitted changes')"
  date -u +"built: %Y-%m-%dT%H:%M:%SZ"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  echo "arch list: $QLORA_CUDA_ARCHS"; } > .prebuilt/INFO
cat .prebuilt/INFO; ls -l .prebuilt
