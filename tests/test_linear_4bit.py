"""linear_4bit (y = x @ W^T + b with W 4-bit) forward and backward on CPU and CUDA against an fp32
reference computed from the dequantized weight; gradcheck, opcheck, autocast, torch.compile."""
import os

import numpy as np
import pytest
import torch

import qlora_ext
from qlora_ext import _C
from qlora_ext.linear import linear_4bit
from tests.conftest import DEVICES, HAS_CUDA

ops = torch.ops.qlora_ext

# (M, N, K): decode-sized and odd M, odd N, K multiples of 64
SHAPES = [(1, 1, 64), (3, 65, 128), (17, 130, 192), (4097, 65, 64), (5, 1100, 64), (16, 64, 1024)]


def make_weight(n, k, quant_type="nf4", double_quant=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return qlora_ext.quantize(w.to(device), quant_type=quant_type, double_quant=double_quant)


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_vs_fp32_reference(device, dtype, m, n, k, bias):
    q = make_weight(n, k, device=device, seed=m + n)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device) if bias else None
    dy = torch.randn(m, n, generator=g).to(device)
    w32 = qlora_ext.dequantize(q, torch.float32)
    # fp32 reference, and plain torch in the low precision on the same dequantized weight
    ref_y = x @ w32.t() + (b if bias else 0)
    ref_dx = dy @ w32
    plain_y = (x.to(dtype) @ w32.to(dtype).t() + (b.to(dtype) if bias else 0)).float()
    plain_dx = (dy.to(dtype) @ w32.to(dtype)).float()

    xq = x.to(dtype).requires_grad_(True)
    bq = b.to(dtype).requires_grad_(True) if bias else None
    y = linear_4bit(xq, q, bq)
    assert y.dtype == dtype and y.shape == (m, n)
    y.backward(dy.to(dtype))
    # plus one rounding of the output dtype, which decides alone when the output has a handful of elements
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    assert rel_err(y, ref_y) <= 2 * rel_err(plain_y, ref_y) + tol
    assert rel_err(xq.grad, ref_dx) <= 2 * rel_err(plain_dx, ref_dx) + tol
    if bias:
        want = dy.to(dtype).double().sum(0)
        assert (bq.grad.double() - want).abs().max() <= 2 * tol * want.abs().max() + 1e-6


def tiled(fn):
    """fn() with the AVX-512 CPU paths off: decode-sized x goes through dequantize + GEMM then."""
    _C.set_cpu_avx512(False)
    try:
        return fn()
    finally:
        _C.set_cpu_avx512(True)


needs_avx512 = pytest.mark.skipif(not qlora_ext.build_info()["cpu_avx512"], reason="the fused CPU path needs AVX-512")


@needs_avx512
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128),
                                                               ("int4", True, 256), ("nf4", False, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 65, 97])
def test_cpu_decode_sized_forward_decodes_in_registers(quant_type, double_quant, blocksize, dtype, n):
    """x with 1..8 rows takes the fused CPU path (csrc/kernels/linear_4bit_cpu.cpp), 9 the dequantize + GEMM one:
    both within the accuracy rule of the test above against the weight dequantized to x's dtype, and the fused one
    near the tiled one."""
    k = 4 * blocksize
    g = torch.Generator().manual_seed(blocksize + n)
    q = qlora_ext.quantize(torch.randn(n, k, generator=g) * 0.05, blocksize, quant_type, double_quant)
    w = qlora_ext.dequantize(q, dtype)
    b = torch.randn(n, generator=g)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for m in range(1, 10):
        x = torch.randn(m, k, generator=g).to(dtype)
        ref = x.double() @ w.double().t() + b.to(dtype).double()
        plain = (x @ w.t() + b.to(dtype)).float()
        y = linear_4bit(x, q, b.to(dtype))
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_err(y, ref) <= 2 * rel_err(plain, ref) + tol
        # the same weights, the float32 sums in another order: apart by little more than the output's rounding
        assert rel_err(y, tiled(lambda: linear_4bit(x, q, b.to(dtype)))) <= 1.5 * tol + 1e-6


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_decode_sized_forward_uses_dequantize_weights_to_the_bit(dtype):
    """One-hot rows of x read single weights out of the fused path: each is dequantize's value in x's dtype, for
    absmax across the exponents (subnormal results and rounding ties included), and a K long enough that every
    thread takes one weight row."""
    n, blocksize = 3, 256
    k = 65 * blocksize
    g = torch.Generator().manual_seed(11)
    q = qlora_ext.quantize(torch.randn(n, k, generator=g), blocksize, "nf4", double_quant=False)
    top = {torch.float32: 100.0, torch.bfloat16: 100.0, torch.float16: 14.0}[dtype]  # fp16: below 65504 / 1
    exponents = torch.linspace(-30.0 if dtype == torch.float16 else -130.0, top, q.absmax.numel())
    q.absmax = (2.0 ** exponents * (1 + torch.rand(q.absmax.numel(), generator=g))).float()
    w = qlora_ext.dequantize(q, dtype)
    columns = torch.randint(0, k, (8,), generator=g)
    x = torch.zeros(8, k, dtype=dtype)
    x[torch.arange(8), columns] = 1
    y = linear_4bit(x, q)
    assert torch.equal(y, w[:, columns].t())
    assert torch.equal(y, tiled(lambda: linear_4bit(x, q)))


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_decode_sized_forward_decodes_double_quantized_absmax_as_dequantize(dtype):
    """The fused path decodes FP8 absmax 16 blocks at a time: every one of the 256 codes (subnormal, negative and
    NaN ones, which decode to zero), rows whose blocks do not start at a multiple of 16, and rows across the
    boundary between two chunks of 256 blocks (two scales in one vector): one-hot rows of x read dequantize's
    weights."""
    n, blocksize, k = 5, 64, 101 * 64  # 101 blocks per row: row 2 holds blocks 202..302, across block 256
    g = torch.Generator().manual_seed(12)
    q = qlora_ext.quantize(torch.randn(n, k, generator=g), blocksize, "nf4", double_quant=True)
    q.absmax = torch.randperm(256, generator=g).repeat(2)[: q.absmax.numel()].to(torch.uint8)
    q.absmax_scale = torch.rand(q.absmax_scale.numel(), generator=g) * 0.01 + 0.001
    q.absmax_mean = torch.tensor([0.3])
    w = qlora_ext.dequantize(q, dtype)
    assert (w == 0).any() and (w != 0).any()
    for start in range(0, k, 8 * 64):
        columns = torch.arange(start, min(k, start + 8 * 64), 64) + torch.randint(0, 64, (1,), generator=g)
        x = torch.zeros(len(columns), k, dtype=dtype)
        x[torch.arange(len(columns)), columns] = 1
        assert torch.equal(linear_4bit(x, q), w[:, columns].t())


@pytest.mark.parametrize("device", DEVICES)
def test_3d_and_noncontiguous_inputs(device):
    q = make_weight(72, 128, device=device)
    w32 = qlora_ext.dequantize(q, torch.float32)
    x = torch.randn(4, 128, 6, device=device).transpose(1, 2)  # [4, 6, 128], not contiguous
    assert not x.is_contiguous()
    x.requires_grad_(True)
    y = linear_4bit(x, q)
    assert y.shape == (4, 6, 72)
    torch.testing.assert_close(y, x @ w32.t(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 6, 72, device=device) @ w32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gradcheck_float64_cpu(quant_type, double_quant):
    q = make_weight(33, 128, quant_type=quant_type, double_quant=double_quant)
    x = torch.randn(3, 128, dtype=torch.float64, requires_grad=True)
    b = torch.randn(33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: linear_4bit(x, q, b), (x, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for double_quant in (False, True):
        q = make_weight(65, 128, double_quant=double_quant, device=device)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(5, 128, dtype=dtype, device=device, requires_grad=True)
            b = torch.randn(65, dtype=dtype, device=device, requires_grad=True)
            args = (x, q.codes, q.absmax, q.absmax_scale, q.absmax_mean, b, 64, "nf4", 65)
            torch.library.opcheck(ops.linear_4bit, args)
            dy = torch.randn(5, 65, dtype=dtype, device=device)
            torch.library.opcheck(ops.linear_4bit_grad_input,
                                  (dy, q.codes, q.absmax, q.absmax_scale, q.absmax_mean, 64, "nf4", 128))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    q = make_weight(64, 128, device=device)
    x = torch.randn(3, 128, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = linear_4bit(x, q)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, linear_4bit(x.bfloat16(), q))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_module(device):
    torch._dynamo.reset()
    layer = qlora_ext.LoRALinear(qlora_ext.Linear4bit.from_linear(torch.nn.Linear(128, 96).to(device)), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 128, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    y_c.sum().backward()
    grads_c = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y_c, y)
    for a, b in zip(grads_c, [x.grad, layer.lora_A.grad, layer.lora_B.grad]):
        torch.testing.assert_close(a, b)


def test_errors():
    q = make_weight(64, 128)
    with pytest.raises(ValueError, match=r"x's last dimension \(100\) must equal in_features \(128\)"):
        linear_4bit(torch.randn(2, 100), q)
    with pytest.raises(ValueError, match="must be a multiple of blocksize"):
        ops.linear_4bit(torch.randn(2, 96), q.codes, q.absmax, q.absmax_scale, q.absmax_mean, None, 64, "nf4", 128)
    with pytest.raises(ValueError, match="does not match the weight"):
        ops.linear_4bit(torch.randn(2, 128), q.codes, q.absmax, q.absmax_scale, q.absmax_mean, None, 64, "nf4", 32)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.linear_4bit(torch.ones(2, 128, dtype=torch.int64), q.codes, q.absmax, q.absmax_scale, q.absmax_mean,
                        None, 64, "nf4", 64)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        linear_4bit(torch.randn(2, 128), q, torch.zeros(64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"bias must have shape \[64\]"):
        linear_4bit(torch.randn(2, 128), q, torch.zeros(63))
    with pytest.raises(ValueError, match="must be a quantized 2-D"):
        linear_4bit(torch.randn(2, 128), qlora_ext.quantize(torch.randn(4, 4, 128)))
    with pytest.raises(ValueError, match="in_features .* multiple of blocksize"):
        qlora_ext.Linear4bit.from_linear(torch.nn.Linear(100, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_device_mismatch():
    q = make_weight(64, 128, device="cuda")
    with pytest.raises(RuntimeError, match="x must be on cuda"):
        linear_4bit(torch.randn(2, 128), q)
    with pytest.raises(RuntimeError, match="bias must be on"):
        linear_4bit(torch.randn(2, 128, device="cuda"), q, torch.zeros(64))


@pytest.fixture
def backend(request):
    qlora_ext.set_linear_backend(request.param)
    yield request.param
    qlora_ext.set_linear_backend("auto")


@pytest.fixture
def hopper_tile_n(request):
    """The Hopper kernels' tile width for one test (0: their choice by shape)."""
    _C.set_hopper_tile_n(request.param)
    yield request.param
    _C.set_hopper_tile_n(0)


def test_fused_large_kernel_without_a_gpu_says_none():
    if not HAS_CUDA:
        assert qlora_ext.fused_large_kernel() == "none"
    else:
        assert qlora_ext.fused_large_kernel() in ("wgmma", "mma.sync")


def test_hopper_tile_switch():
    assert _C.hopper_tile_n() == 0
    with pytest.raises(ValueError, match="tile_n must be 0 .automatic., 128 or 256, got 64"):
        _C.set_hopper_tile_n(64)
    for tn in (128, 256, 0):
        _C.set_hopper_tile_n(tn)
        assert _C.hopper_tile_n() == tn


def test_backend_switch():
    assert qlora_ext.linear_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be 'auto', 'fused', 'fused_mma', 'dequant' or 'tune'"):
        qlora_ext.set_linear_backend("fast")
    for name in ("fused", "fused_mma", "dequant", "tune", "auto"):
        qlora_ext.set_linear_backend(name)
        assert qlora_ext.linear_backend() == name


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["auto", "fused", "fused_mma", "dequant", "tune"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64, 65, 128, 257, 4097])  # "fused": small-M kernels to 64
@pytest.mark.parametrize("n,k", [(1, 64), (65, 128), (11008, 256), (256, 4096), (97, 4160)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_forward_backward_every_backend(backend, dtype, m, n, k, double_quant):
    """Fresh inputs each run; outputs poisoned by the allocator fixture; odd M, N and K. On Hopper "fused" runs
    the wgmma large-M kernels and "fused_mma" the mma.sync ones; "tune" whichever it measured fastest."""
    if backend == "fused_mma" and m <= 64:
        pytest.skip("M <= 64: the same small-M kernels as 'fused'")
    if backend == "tune" and (dtype != torch.bfloat16 or not double_quant):
        pytest.skip("'tune' picks among the kernels tested above: bf16 with double quant shows it picks right")
    q = make_weight(n, k, seed=m, double_quant=double_quant)  # quantized on the CPU (the reference kernels)
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    b = torch.randn(n, generator=g).to(dtype).cuda()
    dy = torch.randn(m, n, generator=g).to(dtype).cuda()
    # references on the GPU (fp32 without TF32, and plain torch in the low precision), from the CPU dequantization
    assert not torch.backends.cuda.matmul.allow_tf32
    w32 = qlora_ext.dequantize(q, torch.float32).cuda()
    ref_y, ref_dx = x.float() @ w32.t() + b.float(), dy.float() @ w32
    plain_y = (x @ w32.to(dtype).t() + b).float()
    plain_dx = (dy @ w32.to(dtype)).float()
    qc = q.to("cuda")
    y = linear_4bit(x, qc, b)
    dx = ops.linear_4bit_grad_input(dy, qc.codes, qc.absmax, qc.absmax_scale, qc.absmax_mean, 64, "nf4", k)
    assert y.shape == (m, n) and dx.shape == (m, k) and y.dtype == dtype and dx.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert rel_err(y, ref_y) <= 2 * rel_err(plain_y, ref_y) + eps
    assert rel_err(dx, ref_dx) <= 2 * rel_err(plain_dx, ref_dx) + eps
    # deterministic: the split partial sums are added in a fixed order
    assert torch.equal(linear_4bit(x, qc, b), y)


@pytest.fixture
def fused_split(request):
    """How the small-M kernels split their reduction, for one test (linear_4bit_split.h)."""
    _C.set_fused_split(request.param)
    yield request.param
    _C.set_fused_split("auto")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["fused"], indirect=True)
@pytest.mark.parametrize("fused_split", ["auto", "cta", "grid"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)  # fp16: the same code; test above, "auto"
@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64])
# forward tiles / reduction blocks: 2 / 65 (odd, empty warp slices), 256 / 16, 4 / 128 (CTA and grid split
# together), 129 / 10; input gradient tiles / 16-row steps: 65 / 4, 16 / 512, 128 / 7, 10 / 257
@pytest.mark.parametrize("n,k", [(63, 4160), (8192, 1024), (97, 8192), (4097, 640)])
def test_cuda_small_m_split_modes(backend, fused_split, dtype, m, n, k):
    """The warps of a CTA that share a tile add their sums in shared memory, the grid splits in a second
    kernel: each mode, at sizes that make the launcher use 1 to 16 warps per tile, with and without grid
    splits, must give the reference's result, deterministically, with bias."""
    q = make_weight(n, k, seed=m + n).to("cuda")
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    b = torch.randn(n, generator=g).to(dtype).cuda()
    dy = torch.randn(m, n, generator=g).to(dtype).cuda()
    w32 = qlora_ext.dequantize(q, torch.float32)
    ref_y, ref_dx = x.float() @ w32.t() + b.float(), dy.float() @ w32
    plain_y, plain_dx = (x @ w32.to(dtype).t() + b).float(), (dy @ w32.to(dtype)).float()
    y = linear_4bit(x, q, b)
    dx = ops.linear_4bit_grad_input(dy, q.codes, q.absmax, q.absmax_scale, q.absmax_mean, 64, "nf4", k)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert rel_err(y, ref_y) <= 2 * rel_err(plain_y, ref_y) + eps
    assert rel_err(dx, ref_dx) <= 2 * rel_err(plain_dx, ref_dx) + eps
    assert torch.equal(linear_4bit(x, q, b), y)
    assert torch.equal(ops.linear_4bit_grad_input(dy, q.codes, q.absmax, q.absmax_scale, q.absmax_mean, 64, "nf4",
                                                  k), dx)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["fused", "fused_mma"], indirect=True)
@pytest.mark.parametrize("hopper_tile_n", [0, 128], indirect=True)  # 0: 256 columns here (wgmma; mma.sync: 128)
@pytest.mark.parametrize("fused_split", ["auto", "cta"], indirect=True)
@pytest.mark.parametrize("m", [65, 128, 200])
# a few output tiles over a long reduction, so that "auto" splits K over the grid (up to the partial sums'
# traffic cap, reduction / (16 M)): forward over K = 4096 and 8256 (129 steps: an uneven last split), the input
# gradient over N = 8257 (odd: the plain-load path for dy)
@pytest.mark.parametrize("n,k", [(200, 4096), (97, 8256), (8257, 192)])
def test_cuda_large_m_split_k(backend, hopper_tile_n, fused_split, m, n, k):
    """The large-M kernels' split-K ("auto": fp32 partial sums per split, added by a second kernel with the bias)
    against the reference, and one launch ("cta": no split), deterministic."""
    if backend == "fused_mma" and hopper_tile_n == 128:
        pytest.skip("mma.sync has one tile width: the same as hopper_tile_n 0")
    q = make_weight(n, k, seed=m + n).to("cuda")
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    b = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    dy = torch.randn(m, n, generator=g).to(torch.bfloat16).cuda()
    w32 = qlora_ext.dequantize(q, torch.float32)
    ref_y, ref_dx = x.float() @ w32.t() + b.float(), dy.float() @ w32
    plain_y, plain_dx = (x @ w32.to(torch.bfloat16).t() + b).float(), (dy @ w32.to(torch.bfloat16)).float()
    qa = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)
    y = ops.linear_4bit(x, *qa, b, 64, "nf4", n)
    dx = ops.linear_4bit_grad_input(dy, *qa, 64, "nf4", k)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert rel_err(y, ref_y) <= 2 * rel_err(plain_y, ref_y) + 2.0 ** -8
    assert rel_err(dx, ref_dx) <= 2 * rel_err(plain_dx, ref_dx) + 2.0 ** -8
    assert torch.equal(ops.linear_4bit(x, *qa, b, 64, "nf4", n), y)
    assert torch.equal(ops.linear_4bit_grad_input(dy, *qa, 64, "nf4", k), dx)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["fused", "fused_mma"], indirect=True)
@pytest.mark.parametrize("fused_split", ["auto", "grid"], indirect=True)
@pytest.mark.parametrize("m", [1, 16, 128])
def test_cuda_graph_capture_and_replay_of_the_fused_kernels(backend, fused_split, m):
    """Captured in a CUDA graph (torch.compile's "reduce-overhead"), the fused kernels with every split path
    (few output tiles over a long reduction: the CTA split at M = 1 and 16, the grid split and its reduce
    kernel in "grid" mode, split-K at M = 128) allocate their partial sums from the graph's pool and replay
    with new inputs written into the captured buffers, giving what an eager call gives, bit for bit (same
    kernels, same splits, fixed summation order)."""
    n, k = 200, 4096
    q = make_weight(n, k, seed=m).to("cuda")
    qa = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    dy = torch.randn(m, n, generator=g).to(torch.bfloat16).cuda()
    b = torch.randn(n, generator=g).to(torch.bfloat16).cuda()

    def step():
        return ops.linear_4bit(x, *qa, b, 64, "nf4", n), ops.linear_4bit_grad_input(dy, *qa, 64, "nf4", k)

    step()  # warm-up outside the capture: module load, the Hopper probe, occupancy and attribute caches
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        with torch.cuda.graph(graph, stream=stream):
            y, dx = step()
    torch.cuda.current_stream().wait_stream(stream)
    x2, dy2 = torch.randn_like(x), torch.randn_like(dy)
    x.copy_(x2)
    dy.copy_(dy2)
    graph.replay()
    torch.cuda.synchronize()
    want_y, want_dx = step()
    assert torch.equal(y, want_y) and torch.equal(dx, want_dx)
    w32 = qlora_ext.dequantize(q, torch.float32)
    assert rel_err(y, x2.float() @ w32.t() + b.float()) < 1e-2 and rel_err(dx, dy2.float() @ w32) < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["tune"], indirect=True)
def test_cuda_tune_measures_once_per_class_and_keeps_a_candidate(backend):
    _C.clear_linear_tuning_cache()
    q = make_weight(256, 512).to("cuda")
    qa = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)
    w32 = qlora_ext.dequantize(q, torch.float32)
    for m in (300, 257, 512, 3):  # 300, 257 and 512: one class (M <= 512); 3: another
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        y = ops.linear_4bit(x, *qa, None, 64, "nf4", 256)
        dx = ops.linear_4bit_grad_input(dy, *qa, 64, "nf4", 512)
        assert rel_err(y, x.float() @ w32.t()) < 1e-2 and rel_err(dx, dy.float() @ w32) < 1e-2
    cache = dict((key, choice) for key, choice in _C.linear_tuning_cache())
    assert sorted(k.split(" M<=")[1].split()[0] + " " + k.split()[0] for k in cache) == \
        ["4 bwd", "4 fwd", "512 bwd", "512 fwd"], cache
    large = {"dequant+cuBLAS", "fused mma.sync", "fused wgmma TN=128", "fused wgmma TN=256"}
    for key, (name, us) in cache.items():
        small = {"dequant+cuBLAS", "fused small-M", "fused small-M grid split"}
        assert name in (large if "M<=512" in key else small), (key, name)
        assert 0 < us < 1e5
    _C.clear_linear_tuning_cache()
    assert _C.linear_tuning_cache() == []


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_hopper_runs_the_wgmma_kernels():
    """A Hopper GPU with a build that has sm_90a must get the wgmma kernels under "fused" (else the tests above
    would test mma.sync twice without saying so); any other GPU or build gets mma.sync."""
    archs = qlora_ext.build_info()["cuda_arch_list"].replace("+PTX", "").split(";")
    hopper = torch.cuda.get_device_capability() == (9, 0) and "9.0a" in archs and "9.0" not in archs
    kernel = qlora_ext.fused_large_kernel()
    if os.environ.get("QLORA_DISABLE_WGMMA") == "1":  # bench/gpu_check.sh, after a failed wgmma smoke test
        assert kernel == "mma.sync"
    elif hopper:
        assert kernel == "wgmma"
    elif torch.cuda.get_device_capability() != (9, 0):
        assert kernel == "mma.sync"
    else:  # both sm_90 and sm_90a images: which one the driver loads decides, and the probe reports it
        assert kernel in ("wgmma", "mma.sync")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["fused"], indirect=True)
@pytest.mark.parametrize("tokens", [5, 100])  # M = 10: small-M kernels; M = 200: large-M kernels
def test_cuda_fused_3d_input_and_autograd(backend, tokens):
    q = make_weight(200, 256).to("cuda")
    x = torch.randn(2, tokens, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = linear_4bit(x, q)
    y.float().sum().backward()
    w = qlora_ext.dequantize(q, torch.float32)
    torch.testing.assert_close(y.float(), x.detach().float() @ w.t(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), torch.ones(2, tokens, 200, device="cuda") @ w, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("backend", ["fused", "fused_mma"], indirect=True)
@pytest.mark.parametrize("hopper_tile_n", [128, 256], indirect=True)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("m,n,k", [(65, 72, 128), (257, 200, 4096), (130, 64, 64)])
@pytest.mark.parametrize("dy_offset", [0, 1])  # 1: dy starts 2 bytes off a 16-byte boundary (plain-load path)
def test_cuda_fused_large_m_code_books(backend, hopper_tile_n, quant_type, double_quant, m, n, k, dy_offset):
    """The large-M kernels (wgmma on Hopper under "fused", both tile widths; mma.sync under "fused_mma") for
    every code book and absmax source, against the fp32 reference."""
    if backend == "fused_mma" and hopper_tile_n == 256:
        pytest.skip("the tile width is the wgmma kernels' alone")
    dtype = torch.bfloat16
    q = make_weight(n, k, quant_type=quant_type, double_quant=double_quant, seed=m + k)
    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    b = torch.randn(n, generator=g).to(dtype).cuda()
    dy_buf = torch.randn(m * n + dy_offset, generator=g).to(dtype).cuda()
    dy = dy_buf[dy_offset:].view(m, n)
    assert dy.is_contiguous() and (dy.data_ptr() % 16 != 0) == bool(dy_offset)
    w32 = qlora_ext.dequantize(q, torch.float32).cuda()
    ref_y, ref_dx = x.float() @ w32.t() + b.float(), dy.float() @ w32
    plain_y = (x @ w32.to(dtype).t() + b).float()
    plain_dx = (dy @ w32.to(dtype)).float()
    qc = q.to("cuda")
    y = ops.linear_4bit(x, qc.codes, qc.absmax, qc.absmax_scale, qc.absmax_mean, b, 64, quant_type, n)
    dx = ops.linear_4bit_grad_input(dy, qc.codes, qc.absmax, qc.absmax_scale, qc.absmax_mean, 64, quant_type, k)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    eps = 2.0 ** -8
    assert rel_err(y, ref_y) <= 2 * rel_err(plain_y, ref_y) + eps
    assert rel_err(dx, ref_dx) <= 2 * rel_err(plain_dx, ref_dx) + eps
    torch.cuda.synchronize()
