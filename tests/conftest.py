"""Shared fixtures: the devices to test (CUDA tests are skipped without a GPU and run in
bench/gpu_check.sh), fresh random inputs, and a poisoned CUDA allocator."""
import os
import signal
import zlib

import numpy as np
import pytest
import torch

import qlora_ext

HAS_CUDA = torch.cuda.is_available() and qlora_ext.build_info()["cuda"]


def _sigterm_interrupts(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: time limit")


if os.environ.get("QLORA_SIGTERM_INTERRUPTS") == "1":
    # bench/gpu_check.sh stops a background pytest at its time limit with SIGTERM (background jobs ignore
    # SIGINT): as KeyboardInterrupt, pytest still writes the junit results of the tests that ran.
    signal.signal(signal.SIGTERM, _sigterm_interrupts)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")]),
]



def cuda_only(test):
    """A test that needs a CUDA GPU: marked `cuda` (bench/gpu_check.sh runs those), skipped elsewhere."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")(test))


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test id so a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def poison_cuda_cache(nbytes=64 << 20):
    """Fill freed blocks of the caching allocator with NaN bytes, so an output element that a kernel
    forgets to write shows up as NaN instead of a lucky zero."""
    if HAS_CUDA:
        # one large block (large pool) and many small ones (the < 1 MB pool)
        blocks = [torch.empty(nbytes, dtype=torch.uint8, device="cuda")]
        blocks += [torch.empty(s, dtype=torch.uint8, device="cuda") for s in (512, 4096, 65536, 1 << 19) * 8]
        for b in blocks:
            b.fill_(0xFF)
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _poison(request):
    if "cuda" in request.node.name:
        poison_cuda_cache()
    yield
