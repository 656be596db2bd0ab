"""Builds qlora_ext._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit is usable.

Build switches (environment variables):
  QLORA_CUDA=1|0          force the CUDA build on or off (default: on when torch is a CUDA build and nvcc is found)
  QLORA_CUDA_ARCHS="..."  the CUDA arch list, in TORCH_CUDA_ARCH_LIST syntax (default "8.0+PTX;9.0a": SASS for
                          sm_80 and for Hopper with its sm_90a features (the wgmma kernels), PTX for newer GPUs)
  CUDA_HOME               the CUDA toolkit root (default: found from nvcc, following wrapper scripts)
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

# 9.0a, not 9.0: Hopper's wgmma exists only in sm_90a images (their SASS runs on sm_90 GPUs alone, hence
# the PTX of 8.0 for anything newer). A list with 9.0 instead still works: the wgmma kernels then report
# themselves unavailable (qlora_ext.fused_large_kernel()) and mma.sync serves Hopper.
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"
ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root. nvcc on PATH may be a wrapper script, so ask nvcc itself (--dryrun names TOP)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                candidates.append(os.path.normpath(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def want_cuda(cuda_home):
    import torch

    switch = os.environ.get("QLORA_CUDA")
    if switch is not None and switch.strip() not in ("", "auto"):
        on = switch.strip().lower() in ("1", "on", "true", "yes")
        if on and (torch.version.cuda is None or cuda_home is None):
            sys.exit(
                f"QLORA_CUDA={switch} but torch {torch.__version__} is "
                f"{'a CPU build' if torch.version.cuda is None else 'a CUDA build'} and nvcc was "
                f"{'not found' if cuda_home is None else 'found at ' + cuda_home}: install a CUDA build of torch "
                "and the CUDA toolkit, or set QLORA_CUDA=0"
            )
        return on
    return torch.version.cuda is not None and cuda_home is not None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it at import

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = want_cuda(cuda_home)

# Layout: csrc/kernels/*.cpp are torch-free CPU kernels, csrc/kernels/*.cu torch-free CUDA kernels;
# csrc/torch_bindings/*_cuda_ops.cpp are the CUDA op implementations and *_cuda.cpp their CUDA-only helpers;
# every other binding file is device-independent or CPU (schemas are declared with TORCH_LIBRARY_FRAGMENT next
# to their ops).
kernel_cpu_sources = sorted(glob.glob("csrc/kernels/*.cpp"))
cuda_binding_sources = sorted(glob.glob("csrc/torch_bindings/*_cuda_ops.cpp") +
                              glob.glob("csrc/torch_bindings/*_cuda.cpp"))
binding_cpu_sources = sorted(set(glob.glob("csrc/torch_bindings/*.cpp")) - set(cuda_binding_sources))
cuda_sources = sorted(glob.glob("csrc/kernels/*.cu")) + cuda_binding_sources

# -ffp-contract=off: the CPU kernels must round every product and sum on its own, like the CUDA kernels.
cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
nvcc_flags = ["-O3", "-lineinfo"]
include_dirs = []

if WITH_CUDA:
    archs = os.environ.get("QLORA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).strip()
    # torch reads the arch list from here (and needs it when no GPU is visible). No user flag may contain
    # "arch": torch then silently drops the list.
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    arch_token = re.sub(r"[^0-9A-Za-z.]+", "_", archs)  # a pp-number token; registration.cpp decodes it
    cxx_flags += ["-DQLORA_WITH_CUDA", f"-DQLORA_CUDA_ARCHS={arch_token}"]
    nvcc_flags += ["-DQLORA_WITH_CUDA"]
    # ATen's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers, which pip ships in nvidia/cu13/include.
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    print(f"qlora_ext: building the CUDA extension (CUDA_HOME={cuda_home}, archs {archs})", flush=True)
    ext = CUDAExtension(
        "qlora_ext._C",
        kernel_cpu_sources + binding_cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    print("qlora_ext: building the CPU-only extension (no CUDA build of torch with nvcc found, or QLORA_CUDA=0)",
          flush=True)
    ext = CppExtension(
        "qlora_ext._C",
        kernel_cpu_sources + binding_cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    packages=find_packages(include=["qlora_ext", "qlora_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
