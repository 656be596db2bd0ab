"""4-bit blockwise quantize/dequantize on CPU and CUDA against the NumPy reference: codes, absmax and
dequantized values bit for bit, on normal, heavy-tailed and adversarial inputs of awkward sizes."""
import numpy as np
import pytest
import torch

import qlora_ext
from qlora_ext import _C
from tests import reference as ref
from tests.conftest import DEVICES, HAS_CUDA

QUANT_TYPES = ["nf4", "fp4", "int4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [(1,), (63,), (64,), (65,), (4097,), (33, 97), (3, 5, 129)]


def make_input(rng, shape, kind, dtype):
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "heavy":      # Student-t, 2 degrees of freedom: a few huge outliers per block
        x = rng.standard_t(2, n) * 10.0 ** rng.uniform(-3, 0 if dtype == torch.float16 else 3)
        if dtype == torch.float16:
            x = np.clip(x, -60000, 60000)
    elif kind == "scaled":     # blocks of wildly different scales, zeros blocks and tiny (subnormal) ones
        lo, hi = (-8, 3) if dtype == torch.float16 else (-40, 30)
        x = rng.standard_normal(n) * np.repeat(10.0 ** rng.integers(lo, hi, -(-n // 64)), 64)[:n]
        x[(np.arange(n) // 64) % 5 == 3] = 0.0
    else:
        raise ValueError(kind)
    t = torch.from_numpy(x.astype(np.float32).reshape(shape)).to(dtype)
    return t


def check_against_reference(x, q, blocksize, quant_type):
    xf = x.detach().float().cpu().numpy()
    codes, absmax = ref.quantize(xf, blocksize, quant_type)
    np.testing.assert_array_equal(q.codes.cpu().numpy(), codes)
    return codes, absmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "heavy", "scaled"])
def test_codes_and_dequant_bit_exact(rng, device, quant_type, dtype, shape, kind):
    x = make_input(rng, shape, kind, dtype).to(device)
    q = qlora_ext.quantize(x, blocksize=64, quant_type=quant_type, double_quant=False)
    codes, absmax = check_against_reference(x, q, 64, quant_type)
    np.testing.assert_array_equal(q.absmax.cpu().numpy(), absmax)
    for out_dtype in DTYPES:
        got = qlora_ext.dequantize(q, out_dtype)
        assert got.shape == x.shape and got.dtype == out_dtype and got.device == x.device
        want = ref.dequantize(codes, absmax, 64, quant_type, shape, out_dtype)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("numel", [1, 255, 256, 257, 4097 * 3])
def test_blocksizes(rng, device, blocksize, numel):
    x = make_input(rng, (numel,), "normal", torch.bfloat16).to(device)
    q = qlora_ext.quantize(x, blocksize=blocksize, double_quant=False)
    codes, absmax = check_against_reference(x, q, blocksize, "nf4")
    assert q.absmax.numel() == -(-numel // blocksize)
    want = ref.dequantize(codes, absmax, blocksize, "nf4", (numel,), torch.bfloat16)
    torch.testing.assert_close(qlora_ext.dequantize(q).cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_values_on_midpoints_take_the_lower_code(device, quant_type):
    """Inputs whose normalised value lands exactly on a midpoint (absmax 1 makes s == x)."""
    t = ref.table(quant_type)
    if quant_type == "fp4":
        mags = np.sort(np.abs(t[:8]))
        mids = (mags[:-1] + mags[1:]) * np.float32(0.5)
        mids = np.concatenate([mids, -mids])
    else:
        used = 15 if quant_type == "int4" else 16
        mids = (t[: used - 1] + t[1:used]) * np.float32(0.5)
    vals = np.concatenate([mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2))])
    vals = vals.astype(np.float32)
    blocks = np.zeros((len(vals), 64), dtype=np.float32)
    blocks[:, 0] = 1.0                 # absmax exactly 1
    blocks[:, 1] = vals
    x = torch.from_numpy(blocks).to(device)
    q = qlora_ext.quantize(x, quant_type=quant_type, double_quant=False)
    codes, _ = check_against_reference(x, q, 64, quant_type)
    got = ref.unpack(codes, blocks.size).reshape(blocks.shape)[:, 1]
    decoded = ref.table(quant_type)[got].astype(np.float64)
    # every value maps to a nearest table value (in float64, up to the float32 rounding of the midpoint);
    # exact midpoints to the lower one (FP4: the smaller magnitude)
    t64 = ref.table(quant_type)[: 15 if quant_type == "int4" else 16].astype(np.float64)
    err = np.abs(decoded - vals)
    best = np.min(np.abs(t64[None, :] - vals[:, None].astype(np.float64)), axis=1)
    assert (err <= best + 1e-7).all()
    on_mid = slice(0, len(mids))
    if quant_type == "fp4":
        assert (np.abs(decoded[on_mid]) < np.abs(vals[on_mid])).all()
    else:
        assert (decoded[on_mid] < vals[on_mid]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_blocks_dequantize_to_exact_zeros(device, quant_type):
    x = torch.zeros(3, 64, device=device)
    x[1] = torch.linspace(-1, 1, 64)
    zero_code = {"nf4": 7, "fp4": 0, "int4": 7}[quant_type]
    for double_quant in (False, True):
        q = qlora_ext.quantize(x, quant_type=quant_type, double_quant=double_quant)
        if not double_quant:  # (double quantization decodes these absmax to ~1e-8, not 0)
            assert q.absmax[0] == 0 and q.absmax[2] == 0
        out = qlora_ext.dequantize(q)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all() and (out[2] == 0).all()
        assert (ref.unpack(q.codes.cpu().numpy(), 192)[:64] == zero_code).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequant_error_bound(rng, device, quant_type):
    """|x - x_hat| <= absmax * (largest half-gap of the table) + one bf16 rounding of the output."""
    x = make_input(rng, (257, 64), "normal", torch.float32).to(device)
    q = qlora_ext.quantize(x, quant_type=quant_type, double_quant=False)
    out = qlora_ext.dequantize(q).cpu()
    t = np.sort(ref.table(quant_type)[: 15 if quant_type == "int4" else 16])
    half_gap = np.diff(t).max() / 2
    am = q.absmax.cpu().repeat_interleave(64).reshape(x.shape)
    assert ((x.cpu() - out).abs() <= am * (half_gap * (1 + 1e-6))).all()


def test_empty_tensor():
    q = qlora_ext.quantize(torch.empty(0, 5))
    assert q.codes.numel() == 0 and qlora_ext.dequantize(q).shape == (0, 5)


def test_cpu_simd_and_scalar_paths_agree(rng):
    """Scalar, AVX2 and AVX-512 paths (as far as this CPU has them) give the same bits."""
    if not _C.build_info()["cpu_simd"]:
        pytest.skip("no AVX2 on this CPU: only the scalar path exists")
    results = []
    for simd, avx512 in ((True, True), (True, False), (False, False)):
        _C.set_cpu_simd(simd)
        _C.set_cpu_avx512(avx512)
        try:
            out = []
            for quant_type in QUANT_TYPES:
                for dtype in DTYPES:
                    x = make_input(np.random.default_rng(7), (129, 192), "scaled", dtype)
                    q = qlora_ext.quantize(x, quant_type=quant_type, double_quant=True)
                    out.append([q.codes, q.absmax.view(torch.uint8)] +
                               [qlora_ext.dequantize(q, d).view(torch.uint8) for d in DTYPES])
            results.append(out)
        finally:
            _C.set_cpu_simd(True)
            _C.set_cpu_avx512(True)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for ta, tb in zip(a, b):
                assert torch.equal(ta, tb)


def test_a_nan_absmax_decodes_to_nan_on_every_cpu_path():
    """A corrupted state (quantize never writes one) must not decode to zeros: NaN absmax gives NaN weights in
    every dtype on the scalar, AVX2 and AVX-512 paths alike, and through the decode-sized linear_4bit path."""
    q = qlora_ext.quantize(torch.randn(4, 128), double_quant=False)
    q.absmax[1] = float("nan")
    q.absmax[2] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # a payload that carries on rounding
    nan_rows = torch.zeros(4, 128, dtype=torch.bool)
    nan_rows[0, 64:] = nan_rows[1, :64] = True
    for simd, avx512 in ((True, True), (True, False), (False, False)):
        _C.set_cpu_simd(simd)
        _C.set_cpu_avx512(avx512)
        try:
            for dtype in DTYPES:
                assert torch.equal(qlora_ext.dequantize(q, dtype).isnan(), nan_rows), (simd, avx512, dtype)
                y = qlora_ext.linear_4bit(torch.ones(1, 128, dtype=dtype), q)
                assert y.isnan().tolist() == [[True, True, False, False]], (simd, avx512, dtype)
        finally:
            _C.set_cpu_simd(True)
            _C.set_cpu_avx512(True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 63, 65, 97, 4097, 1 << 20, 3 * 5 * 7 * 11 * 13 * 17])
def test_cuda_matches_cpu_bit_for_bit(rng, quant_type, dtype, numel):
    x = make_input(rng, (numel,), "scaled", dtype)
    q_cpu = qlora_ext.quantize(x, quant_type=quant_type, double_quant=True)
    q_gpu = qlora_ext.quantize(x.cuda(), quant_type=quant_type, double_quant=True)
    for name, t in q_cpu.tensors().items():
        assert torch.equal(t.view(torch.uint8), q_gpu.tensors()[name].cpu().view(torch.uint8)), name
    for d in DTYPES:
        assert torch.equal(qlora_ext.dequantize(q_cpu, d).view(torch.uint8),
                           qlora_ext.dequantize(q_gpu, d).cpu().view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_unaligned_view_and_current_stream(rng):
    base = make_input(rng, (4097 * 2 + 1,), "normal", torch.bfloat16).cuda()
    x = base[1:]                       # 2-byte offset: not 16-byte aligned
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        q = qlora_ext.quantize(x, double_quant=True)
        out = qlora_ext.dequantize(q)
    stream.synchronize()
    q_cpu = qlora_ext.quantize(x.cpu(), double_quant=True)
    assert torch.equal(out.cpu(), qlora_ext.dequantize(q_cpu))
