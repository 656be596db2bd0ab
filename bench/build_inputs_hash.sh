#!/usr/bin/env bash
# The hash of what decides the CUDA extension's build: the arch list ($QLORA_CUDA_ARCHS), the Python and torch
# versions of $PYTHON (default python3), setup.py and every file under csrc/. gpu_check.sh reuses a build (its
# own from an earlier call, or one made by prebuild_gpu_extension.sh on another machine) only when this matches.
#   PYTHON=python3 QLORA_CUDA_ARCHS=9.0a bash bench/build_inputs_hash.sh      # run in the repository root
set -u   # (a missing setup.py or csrc in a test tree hashes as missing, not as an error)
{ echo "${QLORA_CUDA_ARCHS:-}"
  "${PYTHON:-python3}" -c "import sys, torch; print(sys.version_info[:2], torch.__version__)"
  find csrc setup.py -type f -print0 2>/dev/null | sort -z | xargs -0 -r sha256sum; } | sha256sum | cut -d' ' -f1
