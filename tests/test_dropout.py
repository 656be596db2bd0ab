"""The counter-based dropout op (qlora_ext::dropout) and qlora_ext.nn.Dropout: bit-exact against the NumPy
Philox reference, statistics of the mask, the backward pass reusing the mask, gradient checkpointing,
torch.compile, opcheck and bad inputs."""
import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import qlora_ext
from qlora_ext import _C
from qlora_ext.nn import Dropout, draw_seed
from tests import reference_dropout as ref
from tests.conftest import DEVICES, cuda_only

ops = torch.ops.qlora_ext
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [1, 3, 63, 64, 65, 97, 4097]


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64)


@pytest.mark.parametrize("counter,key,expected", ref.PHILOX_KNOWN_ANSWERS)
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    got = ref.philox4x32_10(np.array([counter], dtype=np.uint64), key)[0]
    assert [int(v) for v in got] == list(expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_bit_exact_against_reference(device, dtype, numel, rng):
    x = torch.from_numpy(rng.standard_normal(numel) * 3).to(dtype)
    seed = int(rng.integers(-(2**63), 2**63 - 1))
    for p in (0.05, 0.5):
        want = ref.dropout(x, seed, p)
        got = ops.dropout(x.to(device), seed_tensor(seed), p).cpu()
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, want), f"p={p}"


def test_simd_and_scalar_cpu_paths_same_bits(rng):
    # 1563 batches: several threads' ranges, each with groups of four batches and a remainder
    x = torch.from_numpy(rng.standard_normal(100_003)).float()
    seed = seed_tensor(12345)
    fast = ops.dropout(x, seed, 0.1)
    _C.set_cpu_simd(False)
    try:
        slow = ops.dropout(x, seed, 0.1)
    finally:
        _C.set_cpu_simd(True)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_uses_logical_order(device, rng):
    base = torch.from_numpy(rng.standard_normal((65, 97))).float().to(device)
    x = base.t()  # [97, 65], not contiguous
    seed = seed_tensor(-7)
    assert torch.equal(ops.dropout(x, seed, 0.3), ops.dropout(x.contiguous(), seed, 0.3))
    assert ops.dropout(x, seed, 0.3).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_drop_fraction_and_mean_are_those_of_dropout(device):
    n = 1 << 20
    x = torch.ones(n, device=device)
    for p in (0.05, 0.25, 0.9):
        y = ops.dropout(x, seed_tensor(2024), p).cpu()
        dropped = float((y == 0).double().mean())
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(dropped - p) < 6 * sigma, (p, dropped)
        assert abs(float(y.double().mean()) - 1.0) < 6 * sigma / (1 - p)  # unbiased: E[y] = x


@pytest.mark.parametrize("device", DEVICES)
def test_masks_differ_between_seeds_and_repeat_for_one_seed(device):
    x = torch.ones(4096, device=device)
    a = ops.dropout(x, seed_tensor(1), 0.5)
    b = ops.dropout(x, seed_tensor(2), 0.5)
    assert torch.equal(a, ops.dropout(x, seed_tensor(1), 0.5))
    agree = float(((a == 0) == (b == 0)).float().mean())
    assert 0.4 < agree < 0.6  # independent masks agree on about half the elements


@pytest.mark.parametrize("device", DEVICES)
def test_p_zero_one_and_non_finite(device):
    x = torch.tensor([1.5, -2.0, float("inf"), float("nan")] * 20, device=device)
    torch.testing.assert_close(ops.dropout(x, seed_tensor(3), 0.0), x, rtol=0, atol=0, equal_nan=True)
    allgone = ops.dropout(x, seed_tensor(3), 1.0)
    assert torch.equal(allgone[:2], torch.zeros(2, device=device))
    assert allgone[2].isnan() and allgone[3].isnan()  # inf * 0 and NaN * 0 are NaN, as in torch's dropout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_applies_the_forward_mask(device, dtype, rng):
    x = torch.from_numpy(rng.standard_normal((33, 65))).to(dtype).to(device).requires_grad_()
    seed = seed_tensor(99)
    y = ops.dropout(x, seed, 0.2)
    g = torch.from_numpy(rng.standard_normal((33, 65))).to(dtype).to(device)
    y.backward(g)
    assert torch.equal(x.grad, ops.dropout(g, seed, 0.2))
    assert torch.equal(x.grad == 0, (y == 0) | (g == 0))


def test_gradcheck_float64():
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    seed = seed_tensor(5)
    assert torch.autograd.gradcheck(lambda t: ops.dropout(t, seed, 0.3), (x,))


def test_module_train_eval_and_reproducibility():
    d = Dropout(0.1)
    x = torch.randn(4, 128, 576)
    torch.manual_seed(0)
    a = d(x)
    torch.manual_seed(0)
    assert torch.equal(a, d(x))
    assert not torch.equal(a, d(x))  # the next call draws a new seed
    assert 0.05 < float((a == 0).float().mean()) < 0.15
    d.eval()
    assert d(x) is x
    assert "p=0.1" in repr(d)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_gradient_checkpointing_recomputes_the_same_mask():
    lin = torch.nn.Linear(64, 32)
    d = Dropout(0.3)

    def f(x):
        return lin(d(x)).sum()

    x = torch.randn(16, 64, requires_grad=True)
    torch.manual_seed(11)
    f(x).backward()
    plain = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    torch.manual_seed(11)
    checkpoint(f, x, use_reentrant=False).backward()
    assert torch.equal(x.grad, plain[0]) and torch.equal(lin.weight.grad, plain[1])


def test_lora_linear_uses_it():
    layer = qlora_ext.LoRALinear(torch.nn.Linear(64, 64), r=4, dropout=0.1)
    assert isinstance(layer.dropout, Dropout)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in DTYPES:
        x = torch.randn(5, 67, dtype=dtype, device=device)
        torch.library.opcheck(ops.dropout, (x, seed_tensor(1), 0.25))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    d = Dropout(0.2)

    def f(x):
        return d(x) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.rand(64, 1024) + 0.5  # no zeros: a zero output means a dropped element
    x.requires_grad_()
    y = compiled(x)
    y.sum().backward()
    kept = y != 0
    assert 0.15 < 1 - float(kept.float().mean()) < 0.25
    assert torch.equal(x.grad, kept.float() * (2.0 * torch.tensor(1 / 0.8, dtype=torch.float32)))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    x = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(x, seed_tensor(1), 1.5)
    with pytest.raises(TypeError, match="seed must be int64"):
        ops.dropout(x, torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="seed must have one element"):
        ops.dropout(x, torch.tensor([1, 2]), 0.1)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.dropout(torch.ones(3, dtype=torch.int32, device=device), seed_tensor(1), 0.1)
    if device == "cuda":  # a CUDA seed with a CPU x dispatches to the CUDA kernel, which names x
        with pytest.raises(RuntimeError, match="x must be"):
            ops.dropout(x.cpu(), seed_tensor(1).cuda(), 0.1)


def test_seed_is_drawn_on_the_data_device():
    assert draw_seed().device.type == "cpu" and draw_seed("cpu").device.type == "cpu"
    torch.manual_seed(3)
    a = draw_seed(torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(a, draw_seed()) and a.dtype == torch.int64 and a.shape == (1,)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_seed_read_on_the_device_gives_the_same_bits(dtype, rng):
    x = torch.from_numpy(rng.standard_normal(4097) * 3).to(dtype)
    seed = int(rng.integers(-(2**63), 2**63 - 1))
    got = ops.dropout(x.cuda(), seed_tensor(seed).cuda(), 0.3)
    assert torch.equal(got.cpu(), ref.dropout(x, seed, 0.3))
    assert torch.equal(got, ops.dropout(x.cuda(), seed_tensor(seed), 0.3))


@cuda_only
def test_module_on_cuda_draws_from_the_cuda_generator_and_recomputes_under_checkpoint():
    d = Dropout(0.3)
    x = torch.rand(16, 64, device="cuda") + 0.5
    assert draw_seed(x.device).device == x.device
    torch.cuda.manual_seed(5)
    a = d(x)
    torch.cuda.manual_seed(5)
    assert torch.equal(a, d(x)) and not torch.equal(a, d(x))
    lin = torch.nn.Linear(64, 32).cuda()
    xg = x.clone().requires_grad_()

    def f(t):
        return lin(d(t)).sum()

    torch.cuda.manual_seed(11)
    f(xg).backward()
    plain = xg.grad.clone()
    xg.grad = None
    torch.cuda.manual_seed(11)
    checkpoint(f, xg, use_reentrant=False).backward()
    assert torch.equal(xg.grad, plain)


@cuda_only
def test_cuda_graph_replays_draw_new_masks():
    # The seed is drawn on the device inside the graph: each replay draws a new one, and the replay's output
    # is the eager op's for that seed (a host-drawn seed would be frozen at capture).
    d = Dropout(0.5)
    x = torch.rand(4097, device="cuda") + 0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as torch.cuda.graphs asks
        d(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seed = draw_seed(x.device)
        y = ops.dropout(x, seed, 0.5)
        z = d(x)
    outputs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, ops.dropout(x, seed.cpu(), 0.5))
        outputs.append((y.clone(), z.clone()))
    for i in range(3):
        for j in range(i):
            assert not torch.equal(outputs[i][0], outputs[j][0]) and not torch.equal(outputs[i][1], outputs[j][1])
