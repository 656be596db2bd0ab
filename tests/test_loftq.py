"""LoftQ initialisation (qlora_ext/loftq.py, prepare_model(init_lora_weights="loftq")), against the algorithm's
own invariants computed independently in float64: after one iteration the base is the plain quantization of W and
the adapters are the truncated SVD of its error, so what remains is exactly the spectrum's tail."""
import numpy as np
import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import LoRALinear, prepare_model
from qlora_ext.loftq import loftq_init
from qlora_ext.quantize import dequantize, quantize
from tests.test_modules import TinyLM


def weight(out=96, inp=128, seed=0):
    # a low-rank structure plus noise, like trained weights, so that the adapters have something to capture
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g)
    return (low + 0.3 * torch.randn(out, inp, generator=g)) * 0.05


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_one_iteration_leaves_exactly_the_tail_of_the_error_spectrum(quant_type):
    w, r, s = weight(), 6, 2.0
    q, A, B = loftq_init(w, r, s, quant_type=quant_type)
    plain = quantize(w, 64, quant_type, True)
    assert torch.equal(q.codes, plain.codes) and torch.equal(q.absmax, plain.absmax)
    error = (w - dequantize(plain, torch.float32)).double().numpy()
    sv = np.linalg.svd(error, compute_uv=False)
    left = (w.double() - dequantize(q, torch.float32).double() - s * (B.double() @ A.double())).numpy()
    assert np.linalg.norm(left) == pytest.approx(np.sqrt((sv[r:] ** 2).sum()), rel=1e-5)
    assert np.linalg.norm(left) < np.linalg.norm(error)
    # B A is split evenly: both factors carry sqrt of the singular values
    np.testing.assert_allclose(np.linalg.norm(A.double().numpy(), axis=1),
                               np.linalg.norm(B.double().numpy(), axis=0), rtol=1e-5)


def test_more_iterations_reduce_the_error():
    w = weight(seed=1)
    errors = []
    for iters in (1, 3):
        q, A, B = loftq_init(w, 4, 1.0, iters=iters)
        errors.append((w - dequantize(q, torch.float32) - B @ A).norm().item())
    assert errors[1] < errors[0]


def test_randomized_svd_leaves_about_the_exact_error_and_repeats_itself():
    """svd="randomized" (torch.svd_lowrank, seeded): within 2% of the exact truncated SVD's remaining error here,
    the same adapters on every call, and torch's global random state untouched."""
    w = weight(out=192, inp=256, seed=2)
    errors = {}
    for svd in ("exact", "randomized"):
        q, A, B = loftq_init(w, 8, 2.0, svd=svd)
        errors[svd] = (w.double() - dequantize(q, torch.float32).double() - 2.0 * (B.double() @ A.double())).norm()
    assert errors["exact"] <= errors["randomized"] <= 1.02 * errors["exact"]
    state = torch.get_rng_state()
    again = loftq_init(w, 8, 2.0, svd="randomized")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(again[1:], loftq_init(w, 8, 2.0, svd="randomized")[1:]))
    with pytest.raises(ValueError, match="loftq_svd must be one of \\('exact', 'randomized'\\), got 'fast'"):
        prepare_model(TinyLM(), init_lora_weights="loftq", loftq_svd="fast")


def test_bad_arguments():
    with pytest.raises(ValueError, match="loftq iters must be at least 1, got 0"):
        loftq_init(weight(), 4, 1.0, iters=0)
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        loftq_init(weight(), 0, 1.0)
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match=f"LoftQ needs a positive scaling .*got {bad}"):
            loftq_init(weight(), 4, bad)
    with pytest.raises(ValueError, match="init_lora_weights='loftq' needs a quantized base"):
        prepare_model(TinyLM(), quant_type="none", init_lora_weights="loftq")
    with pytest.raises(ValueError, match="init_lora_weights must be 'default' or 'loftq', got 'pissa'"):
        prepare_model(TinyLM(), init_lora_weights="pissa")


def test_prepare_model_with_loftq_starts_closer_to_the_dense_model_and_trains():
    torch.manual_seed(0)
    dense = TinyLM()
    ids = torch.randint(0, 50, (2, 9))
    want = dense(ids).detach()
    default, loftq = TinyLM(), TinyLM()
    default.load_state_dict(dense.state_dict())
    loftq.load_state_dict(dense.state_dict())
    prepare_model(default, r=8, alpha=16.0)
    prepare_model(loftq, r=8, alpha=16.0, init_lora_weights="loftq", loftq_iters=2)
    assert (loftq(ids) - want).norm() < (default(ids) - want).norm()
    adapters = [m for m in loftq.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 14
    for a in adapters:
        assert torch.equal(a.lora_A_init, a.lora_A) and torch.equal(a.lora_B_init, a.lora_B)
        assert a.lora_B.abs().max() > 0 and "lora_A_init" not in a.state_dict()
        assert a.lora_A_init.device.type == "cpu" and a.lora_B_init.dtype == torch.float32  # no GPU memory
    trainable = {n for n, p in loftq.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in default.named_parameters() if p.requires_grad}
    loftq(ids).sum().backward()
    assert all(loftq.get_parameter(n).grad is not None for n in trainable)


def test_loftq_leaves_layers_that_stay_dense_at_the_default_start():
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))
    with pytest.warns(UserWarning, match="kept dense"):
        prepare_model(model, r=4, exclude=(), init_lora_weights="loftq")
    assert model[0].lora_A_init is not None and model[0].lora_B.abs().max() > 0
    assert model[2].lora_A_init is None and model[2].lora_B.abs().max() == 0
    assert isinstance(model[0].base, qlora_ext.Linear4bit) and model[0].base.weight_dtype == torch.float32


def test_a_rank_above_the_layer_size_starts_the_extra_ranks_as_lora_does():
    """r = 8 on a 4 x 128 layer (e.g. a small classification head): the error has 4 singular values; the other
    4 ranks start at A Kaiming, B zero, so they train (A = B = 0 would not)."""
    w = weight(out=4, inp=128)
    q, A, B = loftq_init(w, 8, 2.0)
    left = w.double() - dequantize(q, torch.float32).double() - 2.0 * (B.double() @ A.double())
    assert left.abs().max() < 1e-5  # rank 4 captures all of a 4-row error
    assert B[:, 4:].abs().max() == 0 and A[4:].abs().max() > 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_prepare_model_starts_loftq_at_the_adapters_own_scaling(use_rslora):
    """The start is computed for the scaling the adapters run with (alpha / sqrt(r) under rsLoRA): the merged
    weight is W less exactly the tail of the quantization error's spectrum, as loftq_init gives it for that
    scaling (with the other scaling the start would miss W by a factor of sqrt(r))."""
    w = weight()
    linear = nn.Linear(128, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    model = prepare_model(nn.Sequential(linear), r=8, alpha=16.0, exclude=(), init_lora_weights="loftq",
                          use_rslora=use_rslora)
    a = model[0]
    assert a.scaling == (16.0 / 8 ** 0.5 if use_rslora else 2.0)
    error = (w - dequantize(quantize(w, 64, "nf4", True), torch.float32)).double().numpy()
    tail = np.sqrt((np.linalg.svd(error, compute_uv=False)[8:] ** 2).sum())
    left = (w.double() - a.merged_weight(torch.float64)).numpy()
    assert np.linalg.norm(left) == pytest.approx(tail, rel=1e-4)
