"""The fused LoRA op (qlora_ext::lora_linear_4bit and its backward op) that LoRALinear uses on a Linear4bit
base: the same numbers as the separate ops it replaces, against a float64 reference with the NumPy dropout
mask, gradcheck, opcheck, torch.compile, gradient checkpointing, autocast, and bad inputs."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import qlora_ext
from qlora_ext import Linear4bit, LoRALinear
from qlora_ext.linear import lora_linear_4bit
from tests import reference as ref
from tests import reference_dropout as ref_dropout
from tests.conftest import DEVICES, cuda_only

ops = torch.ops.qlora_ext


def make_layer(rng, n, k, r, device, dtype, adapter_dtype, double_quant=True, bias=True):
    dense = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(rng.standard_normal((n, k)) * 0.05))
        if bias:
            dense.bias.copy_(torch.from_numpy(rng.standard_normal(n)))
    base = Linear4bit.from_linear(dense.to(device), double_quant=double_quant)
    if bias:
        base.bias.data = base.bias.data.to(dtype)
    a = torch.from_numpy(rng.standard_normal((r, k)) * 0.1).to(adapter_dtype).to(device)
    b = torch.from_numpy(rng.standard_normal((n, r)) * 0.1).to(adapter_dtype).to(device)
    return base, a, b


def separate_ops(x, q, bias, a, b, scaling, p, seed):
    """What LoRALinear computed before the fused op: five ops, autograd through each."""
    y = qlora_ext.linear_4bit(x, q, bias)
    xd = ops.dropout(x, seed, p) if p > 0 else x
    t = nn.functional.linear(xd.to(a.dtype), a) * scaling
    if y.dtype == t.dtype:
        return torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, a.shape[0]), b.t()).view(y.shape)
    return y + nn.functional.linear(t, b).to(y.dtype)


def run(fn, x, a, b, bias, dy):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(x, a, b, bias)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


CASES = [  # (dtype of x, dtype of the adapters)
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m,n,r", [(1, 65, 1), (63, 64, 8), (97, 1, 4), (2 * 65, 97, 16)])
def test_same_numbers_as_the_separate_ops(device, dtype, adapter_dtype, p, m, n, r, rng):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("linear_4bit takes float64 on CPU only")
    k = 128
    base, a, b = make_layer(rng, n, k, r, device, dtype, adapter_dtype)
    x = torch.from_numpy(rng.standard_normal((m, k))).to(dtype).to(device)
    if m % 2 == 0:
        x = x.view(2, m // 2, k)  # 3-D input
    seed = torch.tensor([int(rng.integers(-(2**63), 2**63 - 1))], dtype=torch.int64)
    dy = torch.from_numpy(rng.standard_normal((*x.shape[:-1], n))).to(dtype).to(device)
    q = base.weight

    def fused(x, a, b, bias):
        return lora_linear_4bit(x, q, a, b, 2.0, p, seed if p else None, bias)

    def separate(x, a, b, bias):
        return separate_ops(x, q, bias, a, b, 2.0, p, seed)

    got, want = run(fused, x, a, b, base.bias, dy), run(separate, x, a, b, base.bias, dy)
    for name, g, w in zip(("y", "grad_x", "grad_A", "grad_B", "grad_bias"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if name == "y":
            assert torch.equal(g, w)  # the same ops in the same order
        else:
            # The same products, but the GEMMs see other layouts than autograd's (e.g. dy^T @ t instead of
            # (t^T @ dy)^T), and without dropout the adapter's input gradient is added inside the base's
            # (one rounding instead of two): equal up to the GEMMs' own rounding.
            # Where terms cancel, a rounding of the terms is the whole difference: absolute tolerance
            # in units of the largest value.
            atol = 2 * torch.finfo(g.dtype).eps * float(w.abs().max())
            torch.testing.assert_close(g, w, rtol=1.6e-2 if g.element_size() == 2 else 1e-5, atol=atol,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_float32_against_float64_reference(device, p, rng):
    n, k, r, m = 97, 192, 8, 65
    base, a, b = make_layer(rng, n, k, r, device, torch.float32, torch.float32, double_quant=False)
    q = base.weight
    w64 = ref.dequantize(q.codes.cpu().numpy(), q.absmax.cpu().numpy(), 64, "nf4", (n, k), torch.float64)
    seed_value = int(rng.integers(-(2**63), 2**63 - 1))
    mask = ref_dropout.dropout(torch.ones(m, k, dtype=torch.float64), seed_value, p) if p else torch.ones(m, k,
                                                                                                       dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((m, k))).float()
    dy = torch.from_numpy(rng.standard_normal((m, n))).float()

    def formula(x, a, b, bias, w, mask):
        return x @ w.t() + bias + 2.0 * ((x * mask) @ a.t()) @ b.t()

    want = run(lambda x, a, b, bias: formula(x, a, b, bias, torch.as_tensor(w64), mask), x.double(), a.cpu().double(),
               b.cpu().double(), base.bias.cpu().double(), dy.double())
    plain = run(lambda x, a, b, bias: formula(x, a, b, bias, torch.as_tensor(w64).float(), mask.float()), x,
                a.cpu(), b.cpu(), base.bias.cpu(), dy)
    seed = torch.tensor([seed_value], dtype=torch.int64)
    got = run(lambda x, a, b, bias: lora_linear_4bit(x, q, a, b, 2.0, p, seed if p else None, bias), x.to(device),
              a, b, base.bias, dy.to(device))
    for name, g, pl, w in zip(("y", "grad_x", "grad_A", "grad_B", "grad_bias"), got, plain, want):
        err, plain_err = (g.cpu().double() - w).abs().max(), (pl.double() - w).abs().max()
        assert err <= 2 * plain_err + 1e-6 * w.abs().max(), (name, float(err), float(plain_err))


def test_gradcheck_float64(rng):
    base, a, b = make_layer(rng, 5, 64, 3, "cpu", torch.float64, torch.float64)
    x = torch.from_numpy(rng.standard_normal((4, 64))).requires_grad_()
    a, b, bias = a.requires_grad_(), b.requires_grad_(), base.bias.detach().clone().requires_grad_()
    seed = torch.tensor([7], dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda x, a, b, bias: lora_linear_4bit(x, base.weight, a, b, 1.5, 0.25, seed, bias),
                                    (x, a, b, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, rng):
    for dtype, adapter_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        base, a, b = make_layer(rng, 65, 128, 4, device, dtype, adapter_dtype)
        q = base.weight
        x = torch.from_numpy(rng.standard_normal((3, 5, 128))).to(dtype).to(device)
        seed = torch.tensor([3], dtype=torch.int64)
        for p in (0.0, 0.2):
            args = (x.requires_grad_(), q.codes, q.absmax, q.absmax_scale, q.absmax_mean, base.bias,
                    a.requires_grad_(), b.requires_grad_(), seed, 64, "nf4", 65, 2.0, p)
            torch.library.opcheck(ops.lora_linear_4bit, args)
            y, lora_input, hidden = ops.lora_linear_4bit(*args)
            saved = lora_input if lora_input.numel() else x
            dy = torch.randn_like(y)
            torch.library.opcheck(ops.lora_linear_4bit_backward,
                                  (dy, saved.detach(), hidden, q.codes, q.absmax, q.absmax_scale, q.absmax_mean,
                                   a.detach(), b.detach(), seed, 64, "nf4", 128, 2.0, p, True))


def lora_module(rng, p=0.1, device="cpu"):
    base = Linear4bit.from_linear(nn.Linear(128, 96).to(device))
    lora = LoRALinear(base, r=8, alpha=16, dropout=p)
    with torch.no_grad():
        lora.lora_B.copy_(torch.from_numpy(rng.standard_normal((96, 8)) * 0.1))
    return lora


def fused_node(y):
    return "LoraLinear4bitFunction" in y.grad_fn.name()  # the C++ autograd node of lora_linear_4bit


def test_module_uses_the_fused_op_and_falls_back_where_it_does_not_apply(rng):
    lora = lora_module(rng)
    x = torch.randn(4, 128, requires_grad=True)
    assert fused_node(lora(x))
    lora.base.compute_dtype = torch.bfloat16  # the base casts x first: the adapter must see the uncast x
    assert not fused_node(lora(x))
    dense = LoRALinear(nn.Linear(128, 96), r=8, alpha=16)
    assert not fused_node(dense(x))


def test_eval_mode_draws_no_seed(rng):
    lora = lora_module(rng).eval()
    x = torch.randn(4, 128)
    state = torch.get_rng_state()
    lora(x)
    assert torch.equal(torch.get_rng_state(), state)
    lora.train()
    lora(x)
    assert not torch.equal(torch.get_rng_state(), state)


def test_gradient_checkpointing_reproduces_the_mask(rng):
    lora = lora_module(rng, p=0.5)
    x = torch.randn(6, 128, requires_grad=True)
    torch.manual_seed(11)
    lora(x).square().sum().backward()
    plain = (x.grad.clone(), lora.lora_A.grad.clone(), lora.lora_B.grad.clone())
    x.grad = lora.lora_A.grad = lora.lora_B.grad = None
    torch.manual_seed(11)
    checkpoint(lora, x, use_reentrant=False).square().sum().backward()
    for got, want in zip((x.grad, lora.lora_A.grad, lora.lora_B.grad), plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph_matches_eager(p, rng):
    lora = lora_module(rng, p=p)
    x = torch.randn(2, 7, 128)
    compiled = torch.compile(lora, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (lora, compiled):
        torch.manual_seed(5)
        xx = x.clone().requires_grad_()
        f(xx).sum().backward()
        grads.append((xx.grad, lora.lora_A.grad.clone(), lora.lora_B.grad.clone()))
        lora.zero_grad(set_to_none=True)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_autocast_runs_the_adapter_in_the_autocast_dtype(rng):
    lora = lora_module(rng, p=0.0)
    x = torch.randn(5, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
    assert y.dtype == torch.bfloat16
    want = lora_linear_4bit(x.bfloat16(), lora.base.weight, lora.lora_A.bfloat16(), lora.lora_B.bfloat16(),
                            lora.scaling, bias=lora.base.bias.bfloat16())
    assert torch.equal(y, want)


def test_bad_inputs_give_clear_errors(rng):
    base, a, b = make_layer(rng, 32, 64, 4, "cpu", torch.float32, torch.float32)
    q, x = base.weight, torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, in_features\] = \[r, 64\]"):
        lora_linear_4bit(x, q, a[:, :32], b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[out_features, r\] = \[32, 4\]"):
        lora_linear_4bit(x, q, a, b[:, :3], 1.0)
    with pytest.raises(TypeError, match="lora_B must have lora_A's dtype"):
        lora_linear_4bit(x, q, a, b.double(), 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear_4bit(x, q, a, b, 1.0, 1.0, torch.tensor([1]))
    with pytest.raises(ValueError, match="dropout_p > 0 needs a seed"):
        lora_linear_4bit(x, q, a, b, 1.0, 0.1)
    with pytest.raises(ValueError, match="x's last dimension"):
        lora_linear_4bit(torch.randn(3, 65), q, a, b, 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]), reason="needs a CUDA GPU")
def test_adapters_on_another_device_are_an_error(rng):
    base, a, b = make_layer(rng, 32, 64, 4, "cuda", torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="lora_A and lora_B must be on x's device"):
        lora_linear_4bit(torch.randn(3, 64, device="cuda"), base.weight, a.cpu(), b.cpu(), 1.0)


def test_placeholder_seed_is_on_the_data_device():
    # without dropout the op still takes a seed tensor: on x's device, so that no CPU tensor keeps a compiled
    # CUDA layer out of a CUDA graph
    from qlora_ext.linear import _no_seed
    assert _no_seed(torch.device("cpu")).device.type == "cpu"
    assert _no_seed(torch.device("cpu")) is _no_seed(torch.device("cpu"))
    assert _no_seed(torch.device("meta")).device.type == "meta"


def test_placeholder_seed_made_under_inference_mode_still_trains(rng, monkeypatch):
    # first made during generation (torch.inference_mode), it must not be an inference tensor, which a later
    # training step could not save for the backward pass
    from qlora_ext import linear
    monkeypatch.setattr(linear, "_NO_SEED", {})
    lora = lora_module(rng, p=0.0)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        lora(x)
    assert not linear._NO_SEED[torch.device("cpu")].is_inference()
    lora(x.requires_grad_()).sum().backward()
    assert lora.lora_B.grad is not None


@cuda_only
def test_seed_on_the_device_gives_the_host_seeds_numbers(rng):
    base, a, b = make_layer(rng, 97, 128, 8, "cuda", torch.bfloat16, torch.float32)
    x = torch.from_numpy(rng.standard_normal((65, 128))).to(torch.bfloat16).cuda()
    dy = torch.from_numpy(rng.standard_normal((65, 97))).to(torch.bfloat16).cuda()
    seed = torch.tensor([int(rng.integers(-(2**63), 2**63 - 1))], dtype=torch.int64)
    host, device = (run(lambda x, a, b, bias: lora_linear_4bit(x, base.weight, a, b, 2.0, 0.3, s, bias), x, a, b,
                        base.bias, dy) for s in (seed, seed.cuda()))
    for got, want in zip(device, host):
        assert torch.equal(got, want)


def test_reference_mask_is_the_ops_mask():
    """The float64 reference above builds the mask with the NumPy Philox reference: check it is the op's."""
    seed = 123456789
    ones = torch.ones(65, 192, dtype=torch.float64)
    assert torch.equal(ref_dropout.dropout(ones, seed, 0.3), ops.dropout(ones, torch.tensor([seed]), 0.3))
    assert np.isclose(float(ref_dropout.dropout(ones, seed, 0.3).mean()), 1.0, atol=0.03)
