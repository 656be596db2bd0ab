"""FP8 E4M3 packing of the numeric core against torch.float8_e4m3fn."""
import numpy as np
import pytest
import torch

from qlora_ext import _C
from tests import reference as ref


def all_finite_fp8_values():
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    return codes[torch.isfinite(vals)], vals[torch.isfinite(vals)]


def test_decode_every_code():
    codes, vals = all_finite_fp8_values()
    ours = np.array(_C.fp8_e4m3_decode(codes.tolist()), dtype=np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), vals.numpy().view(np.uint32))  # -0 included


def test_encode_representable_values_and_ties(rng):
    _, vals = all_finite_fp8_values()
    v = np.unique(vals.numpy())
    mids = (v[:-1] + v[1:]) / 2                          # exact ties: round to even
    near = np.concatenate([np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]).astype(np.float32)
    samples = np.concatenate([v, mids, near]).astype(np.float32)
    samples = samples[np.abs(samples) <= 464]            # beyond that torch gives NaN, we saturate
    np.testing.assert_array_equal(np.array(_C.fp8_e4m3_encode(samples.tolist()), dtype=np.uint8),
                                  ref.fp8_e4m3(samples))


def test_encode_random_values(rng):
    x = np.concatenate([rng.standard_normal(20000) * 100, rng.standard_normal(20000) * 1e-3,
                        rng.uniform(-464, 464, 20000), rng.standard_normal(2000) * 1e-8]).astype(np.float32)
    np.testing.assert_array_equal(np.array(_C.fp8_e4m3_encode(x.tolist()), dtype=np.uint8), ref.fp8_e4m3(x))


@pytest.mark.parametrize("x", [464.001, 479.9, 500.0, 1e30, float("inf")])
def test_encode_saturates(x):
    assert _C.fp8_e4m3_encode([x, -x]) == [0x7E, 0xFE]
