"""What the compiler made of the CUDA kernels, read from the built extension's SASS (no GPU needed).

The wgmma kernels (csrc/kernels/linear_4bit_hopper_cuda.cu) have a body only in the sm_90a image; in every
other image they are a trap stub, and a build without 9.0a in its arch list quietly falls back to mma.sync on
Hopper. These tests read the fat binary with cuobjdump (from the CUDA toolkit, or the copy that ships with
triton) and check, for whatever arch list the extension was built with:
- every image the arch list names is there;
- the optimizer steps write whole 128-bit and 64-bit vectors;
- in an sm_90a image, each of the twelve Hopper kernel instances issues exactly four HGMMA 64xTNx16 (one per k16
  step of a 64-wide reduction tile; TN = 128 or 256, the instance's tile width) of the instance's input type
  (BF16 or F16), with B transposed (.tnspB, the MN-major weight tile) in the input-gradient instances alone, waits
  for the tensor cores at the two places meant (WARPGROUP.DEPBAR), and contains no local-memory spills; in any
  other image, no HGMMA at all.
The tests skip on a CPU-only build, and when no cuobjdump is found unless QLORA_REQUIRE_SASS_CHECK=1 (CI sets it).
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

import qlora_ext
from qlora_ext import _C

HOPPER_KERNEL = "hopper_gemm_kernel"


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def sass_by_arch():
    if not _C.build_info()["cuda"]:
        pytest.skip("CPU-only build: no CUDA kernels")
    tool = find_cuobjdump()
    if tool is None:
        if os.environ.get("QLORA_REQUIRE_SASS_CHECK") == "1":
            pytest.fail("QLORA_REQUIRE_SASS_CHECK=1 but no cuobjdump was found (CUDA toolkit or triton)")
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the SASS with")
    lib = glob.glob(os.path.join(os.path.dirname(qlora_ext.__file__), "_C*.so"))
    assert len(lib) == 1, lib
    out = subprocess.run([tool, "--dump-sass", lib[0]], capture_output=True, text=True, check=True).stdout
    # cuobjdump prints one "Fatbin elf code" section per image, each starting with "arch = sm_XX"
    sections = re.split(r"\n\s*Fatbin elf code:", out)
    by_arch = {}
    for sec in sections:
        m = re.search(r"arch = (sm_\w+)", sec)
        if m:
            by_arch.setdefault(m.group(1), []).append(sec)
    return {arch: "\n".join(secs) for arch, secs in by_arch.items()}


def functions(sass):
    """{mangled name: body} of the kernels in one image's SASS."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def expected_archs():
    archs = set()
    for entry in _C.build_info()["cuda_arch_list"].replace("+PTX", "").split(";"):
        entry = entry.strip()
        if entry:
            archs.add("sm_" + entry.replace(".", ""))
    return archs


def test_every_listed_arch_has_an_image(sass_by_arch):
    assert expected_archs() <= set(sass_by_arch), (expected_archs(), sorted(sass_by_arch))


def test_hopper_kernels_are_wgmma_in_sm90a_only(sass_by_arch):
    for arch, sass in sass_by_arch.items():
        hopper = {name: body for name, body in functions(sass).items() if HOPPER_KERNEL in name}
        # tile width 128, 256 x bf16/fp16 x forward, grad (vector loads), grad (plain loads)
        assert len(hopper) == 12, (arch, sorted(hopper))
        for name, body in hopper.items():
            # template arguments <kTN, BF16, kGrad, kVecAct>
            tile_n, bf16, grad = re.search(r"hopper_gemm_kernelILi(\d+)ELb([01])ELb([01])E", name).groups()
            hgmma = re.findall(r"HGMMA\.64x(\d+)x16\.F32(\.BF16)?\s+\w+,\s*gdesc\[\w+\](\.tnspB)?", body)
            if arch == "sm_90a":
                assert [h[0] for h in hgmma] == [tile_n] * 4, (name, hgmma)
                # bf16 or fp16 inputs as instantiated; B transposed (MN-major) in the input gradient alone
                assert all(h[1] == (".BF16" if bf16 == "1" else "") for h in hgmma), (name, hgmma)
                assert all(h[2] == (".tnspB" if grad == "1" else "") for h in hgmma), (name, hgmma)
                assert len(re.findall(r"WARPGROUP\.DEPBAR", body)) == 2, name  # wait_group 1 in the loop, 0 after
                assert len(re.findall(r"WARPGROUP\.ARRIVE", body)) == 1, name
                assert not re.search(r"\b(STL|LDL)\b", body), f"{name}: local-memory spills"
            else:
                assert not hgmma and "HGMMA" not in body, (arch, name)


def test_no_kernel_spills_to_local_memory(sass_by_arch):
    for arch, sass in sass_by_arch.items():
        for name, body in functions(sass).items():
            assert not re.search(r"\b(STL|LDL)(\.\w+)*\s", body), f"{arch} {name}: local-memory spills"


def test_optimizer_steps_store_whole_vectors(sass_by_arch):
    """The AdamW kernels' aligned path writes 16-byte (fp32 states, 8-bit params' bf16 x 8) and 8-byte vectors;
    nvcc merged it with the per-element tail into four scalar stores until the stores were written as explicit
    st.global.v* (csrc/kernels/vector_store.cuh)."""
    for arch, sass in sass_by_arch.items():
        steps = {name: body for name, body in functions(sass).items()
                 if "kAdamWMultiTensor" in name or "kAdamW8bitMultiTensor" in name}
        assert len(steps) == 2, (arch, sorted(steps))
        for name, body in steps.items():
            assert re.search(r"\bSTG\.E\.128\b", body), f"{arch} {name}: no 128-bit store"
            assert re.search(r"\bSTG\.E\.64\b", body), f"{arch} {name}: no 64-bit store"
