"""DoRA layers (qlora_ext/dora.py, LoRALinear(use_dora=True)): forward and gradients against a float64 reference
of the formula on the (dequantized) weight, the row norms taken from the 4-bit weight against the dense ones,
PEFT's own DoRA both ways, dropout, merging, disabling, torch.compile, and what is refused."""
import copy
import json
import pickle

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import LoRALinear, prepare_model
from qlora_ext.dora import weight_norm
from qlora_ext.peft_io import load_peft_adapter, save_peft_adapter
from tests.conftest import cuda_only


def _layer(quant_type="nf4", out=65, inp=128, bias=True, seed=0, dropout=0.0, use_rslora=False):
    """A DoRA layer with random adapters and magnitudes (as if trained)."""
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, bias=bias)
    model = prepare_model(nn.Sequential(linear), r=4, alpha=8.0, dropout=dropout, quant_type=quant_type, exclude=(),
                          use_dora=True, use_rslora=use_rslora)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.1)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(out))
    return layer


def _dense_weight(layer) -> torch.Tensor:
    base = layer.base
    w = base.dequantized_weight(torch.float32) if isinstance(base, qlora_ext.Linear4bit) else base.weight.detach()
    return w.double()


def _reference(layer, x, dropped=None):
    """The DoRA formula in float64 with autograd (the norm detached, as the paper and PEFT treat it):
    y = W x + b + (m / n - 1) W x_d + (m / n) s B A x_d."""
    W = _dense_weight(layer)
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    m = layer.lora_magnitude_vector.detach().double().requires_grad_()
    x = x.detach().double().requires_grad_()
    xd = x if dropped is None else dropped(x)
    s = layer.scaling
    n = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
    bias = 0 if layer.base.bias is None else layer.base.bias.detach().double()
    y = x @ W.t() + bias + (m / n - 1) * (xd @ W.t()) + (m / n) * s * (xd @ A.t() @ B.t())
    return y, (x, A, B, m)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "none"])
@pytest.mark.parametrize("shape", [(1, 128), (3, 17, 128)])
def test_forward_and_gradients_match_the_formula(quant_type, shape):
    layer = _layer(quant_type).train()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    want, (xr, A, B, m) = _reference(layer, x)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    for ours, theirs in ((x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                         (layer.lora_magnitude_vector.grad, m.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5)
    assert layer.lora_magnitude_vector.grad.abs().max() > 0


def test_the_norm_of_a_4bit_weight_needs_no_dense_weight():
    layer = _layer("nf4", out=97, inp=256)
    want = torch.linalg.vector_norm(_dense_weight(layer) + layer.scaling * (
        layer.lora_B.detach().double() @ layer.lora_A.detach().double()), dim=1)
    torch.testing.assert_close(weight_norm(layer).double(), want, rtol=1e-6, atol=0)
    assert not weight_norm(layer).requires_grad


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_a_fresh_layer_computes_its_base_and_disabling_gives_the_base(quant_type):
    torch.manual_seed(1)
    linear = nn.Linear(64, 33)
    layer = prepare_model(nn.Sequential(linear), r=4, exclude=(), quant_type=quant_type, use_dora=True)[0]
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=1e-6)   # B = 0, m = ||W||: m / n = 1
    trained = _layer(quant_type)
    with qlora_ext.adapters_disabled(trained):
        assert torch.equal(trained(x.new_ones(2, 128)), trained.base(x.new_ones(2, 128)))
    assert not torch.allclose(trained(x.new_ones(2, 128)), trained.base(x.new_ones(2, 128)), atol=1e-3)


def test_dropout_reaches_the_adapter_and_the_direction_not_the_base():
    """With dropout in training, the base term sees x and the DoRA terms the dropped x (as PEFT computes)."""
    layer = _layer("nf4", dropout=0.3).train()
    mask = (torch.rand(4, 128, generator=torch.Generator().manual_seed(0)) > 0.3).double() / 0.7

    class FixedMask(nn.Module):
        def forward(self, x):
            return x * mask.to(x.dtype)

    real, layer.dropout = layer.dropout, FixedMask()
    x = torch.randn(4, 128)
    want, _ = _reference(layer, x, dropped=lambda t: t * mask)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    layer.dropout = real
    assert not torch.allclose(layer(x), layer(x))   # the real dropout draws a mask per call
    layer.eval()   # and none in eval
    torch.testing.assert_close(layer(x).double(), _reference(layer, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_the_merged_weight_computes_the_layer(quant_type):
    layer = _layer(quant_type).eval()
    x = torch.randn(6, 128)
    merged = layer.merged_weight(torch.float32)
    torch.testing.assert_close(nn.functional.linear(x, merged, layer.base.bias), layer(x), rtol=1e-5, atol=1e-5)
    model = qlora_ext.merge_and_unload(nn.Sequential(copy.deepcopy(layer)))
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0](x), layer(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    layer = _layer("nf4").train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 128)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


def test_the_base_row_norms_follow_a_loaded_base_and_stay_float32():
    """The 4-bit base's row norms are taken again when load_state_dict fills the base (a model built with
    placeholder weights, then loaded), and stay float32 under model.half() (squares above 65504 would overflow)."""
    def make(seed):
        torch.manual_seed(seed)
        return prepare_model(nn.Sequential(nn.Linear(128, 64)), r=4, exclude=(), use_dora=True)

    x = torch.randn(3, 128)
    a, b = make(0), make(1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x))
    placeholder = prepare_model(nn.Sequential(qlora_ext.Linear4bit(128, 64)), r=4, exclude=(), use_dora=True)
    placeholder.load_state_dict(a.state_dict())
    assert torch.equal(placeholder(x), a(x))

    big = nn.Linear(4096, 8, bias=False)
    with torch.no_grad():
        big.weight.fill_(5.0)   # ||W_i||^2 = 102400: above float16's range
    layer = prepare_model(nn.Sequential(big), r=4, exclude=(), use_dora=True).half()[0]
    assert layer.dora_weight_sq.dtype == torch.float32
    xh = torch.ones(2, 4096, dtype=torch.float16)
    torch.testing.assert_close(layer(xh), layer.base(xh))


def test_loading_the_4bit_base_alone_refreshes_the_row_norms_also_in_a_copy():
    """The norms follow the base wherever load_state_dict fills it: the base loaded alone, a deepcopy's base (the
    copy's norms, not the original's), and a layer built again on the same base (one refresh, by the new layer)."""
    def make(seed):
        torch.manual_seed(seed)
        return prepare_model(nn.Sequential(nn.Linear(128, 64)), r=4, exclude=(), use_dora=True)[0]

    x = torch.randn(3, 128)
    a, b = make(0), make(1)
    b_before = b.dora_weight_sq.clone()
    copied = copy.deepcopy(b)
    b.base.load_state_dict(a.base.state_dict())
    torch.testing.assert_close(b.dora_weight_sq, a.dora_weight_sq, rtol=0, atol=0)
    b.lora_magnitude_vector.data.copy_(a.lora_magnitude_vector)
    assert torch.equal(b(x), a(x))
    torch.testing.assert_close(copied.dora_weight_sq, b_before, rtol=0, atol=0)   # the copy's base is its own
    copied.base.load_state_dict(a.base.state_dict())
    torch.testing.assert_close(copied.dora_weight_sq, a.dora_weight_sq, rtol=0, atol=0)
    again = LoRALinear(b.base, r=4, use_dora=True)
    assert len(b.base._load_state_dict_post_hooks) == 1
    b.base.load_state_dict(make(2).base.state_dict())
    assert not torch.equal(again.dora_weight_sq, a.dora_weight_sq)


def test_the_refresh_hook_makes_no_reference_cycle_and_old_pickles_still_load():
    """A DoRA layer on a 4-bit base is freed by reference counting (no base -> hook -> layer cycle keeping GPU
    memory until the garbage collector runs); a copy of the base alone does not drag the layer along; a layer
    pickled with the hook on the layer itself (before it moved to the base) still loads state dicts."""
    import gc
    import weakref
    from qlora_ext.nn import _refresh_dora_weight_sq
    layer = prepare_model(nn.Sequential(nn.Linear(128, 64)), r=4, exclude=(), use_dora=True)[0]
    codes = weakref.ref(layer.base.weight_codes)
    lone = copy.deepcopy(layer.base)
    lone.load_state_dict(layer.base.state_dict())   # (its hook has no layer: nothing to refresh)
    gc.disable()
    try:
        del layer
        assert codes() is None
    finally:
        gc.enable()
    old = prepare_model(nn.Sequential(nn.Linear(128, 64)), r=4, exclude=(), use_dora=True)[0]
    old.base._load_state_dict_post_hooks.clear()
    old.register_load_state_dict_post_hook(_refresh_dora_weight_sq)   # as layers pickled before
    old = pickle.loads(pickle.dumps(old))
    other = prepare_model(nn.Sequential(nn.Linear(128, 64)), r=4, exclude=(), use_dora=True)[0]
    old.load_state_dict(other.state_dict())
    torch.testing.assert_close(old.dora_weight_sq, other.dora_weight_sq, rtol=0, atol=0)


def test_a_zero_row_computes_its_base_and_bf16_adapters_start_at_the_base():
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[3] = 0.0   # a pruned row: n = m = 0 (PEFT gives NaN)
    layer = prepare_model(nn.Sequential(linear), r=4, exclude=(), use_dora=True)[0]
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, layer.base(x), rtol=0, atol=1e-6)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, x))
    bf16 = LoRALinear(qlora_ext.Linear4bit.from_linear(nn.Linear(64, 8)), r=4, use_dora=True,
                      adapter_dtype=torch.bfloat16)
    assert bf16.lora_magnitude_vector.dtype == torch.float32   # (a bf16 magnitude would not be the base's norm)
    torch.testing.assert_close(bf16(x.detach()), bf16.base(x.detach()), rtol=0, atol=1e-6)


def test_under_autocast_the_output_has_the_autocast_dtype():
    layer = _layer("nf4").train()
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want, _ = _reference(layer, x)
    assert (y.double() - want).abs().max() < 0.02 * want.abs().max()


def test_prepare_model_again_keeps_the_magnitudes_training_and_warns_of_a_mix():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    prepare_model(model, r=4, target_modules=["0"], exclude=(), use_dora=True)
    prepare_model(model, r=4, target_modules=["1"], exclude=(), use_dora=True)
    assert model[0].lora_magnitude_vector.requires_grad and model[1].lora_magnitude_vector.requires_grad
    with pytest.warns(UserWarning, match=r"existing adapters have \(use_rslora, use_dora\) = \[\(False, True\)\]"):
        prepare_model(model, r=4, target_modules=["2"], exclude=())
    assert model[0].lora_magnitude_vector.requires_grad and not model[2].use_dora


def test_a_dense_dora_layer_builds_and_runs_on_meta():
    layer = LoRALinear(nn.Linear(64, 32, device="meta"), r=4, use_dora=True)   # (as a model built before loading)
    assert layer(torch.empty(2, 64, device="meta")).shape == (2, 32)


def test_what_dora_cannot_start_from_is_refused():
    with pytest.raises(ValueError, match="cannot start DoRA layers"):
        prepare_model(nn.Sequential(nn.Linear(64, 32)), r=4, exclude=(), use_dora=True, init_lora_weights="loftq")
    layer = _layer()
    with pytest.raises(ValueError, match="a DoRA layer starts at B = 0"):
        layer.init_adapters(layer.lora_A, layer.lora_B)


peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_computes_our_dora_adapters_and_we_compute_its(tmp_path, use_rslora):
    base = _tiny_llama()
    ours = prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none", use_dora=True,
                         use_rslora=use_rslora).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    save_peft_adapter(ours, str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want = ours(input_ids=IDS).logits
        torch.testing.assert_close(theirs(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, base(input_ids=IDS).logits, atol=1e-3)   # the adapters matter

    # PEFT's own DoRA adapter (its magnitudes moved as if trained) loads here and computes what PEFT computes
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                          use_rslora=use_rslora, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    again = prepare_model(copy.deepcopy(base), target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8.0,
                          quant_type="none", use_dora=True, use_rslora=use_rslora).eval()
    load_peft_adapter(again, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, theirs.eval()(input_ids=IDS).logits, rtol=1e-5,
                                   atol=1e-5)
    plain = prepare_model(copy.deepcopy(base), target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8.0,
                          quant_type="none", use_rslora=use_rslora)
    with pytest.raises(ValueError, match="use_dora=True for layer .*, but the model's layer has .* use_dora=False"):
        load_peft_adapter(plain, str(tmp_path / "peft"))


def test_peft_on_the_dequantized_weights_computes_our_4bit_dora_model(tmp_path):
    """A 4-bit DoRA model's adapters in PEFT, on a dense model holding the dequantized 4-bit weights, compute
    what ours computes (the row norms from the 4-bit weight against PEFT's dense ones)."""
    base = _tiny_llama()
    ours = prepare_model(copy.deepcopy(base), r=4, alpha=8.0, use_dora=True).eval()
    g = torch.Generator().manual_seed(2)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
                dense.get_submodule(name).weight.copy_(m.base.dequantized_weight(torch.float32))
    save_peft_adapter(ours, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(dense, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_4bit_dora_model_round_trips_its_adapters(tmp_path):
    model = prepare_model(_tiny_llama(), r=4, alpha=8.0, use_dora=True).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
                m.lora_magnitude_vector.mul_(1.1)
    save_peft_adapter(model, str(tmp_path / "a"))
    other = prepare_model(_tiny_llama(), r=4, alpha=8.0, use_dora=True).eval()
    load_peft_adapter(other, str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS).logits, model(input_ids=IDS).logits)


@cuda_only
@pytest.mark.parametrize("rows", [1, 63, 97])
def test_cuda_dora_layer_matches_the_cpu_reference(rows):
    """On the GPU (bf16 input, as the trainer's autocast gives it): the same formula within bf16 rounding, and
    gradients for the adapters and magnitudes."""
    layer = _layer("nf4", out=65, inp=256)
    x = torch.randn(rows, 256)
    want, _ = _reference(layer, x)
    cuda = copy.deepcopy(layer).cuda().train()
    xc = x.cuda().bfloat16().requires_grad_()
    out = torch.full((rows, 65), float("nan"), device="cuda")   # poisoned: every element must be written
    out.copy_(cuda(xc).float())
    err = (out.double().cpu() - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err
    out.sum().backward()
    for p in (cuda.lora_A, cuda.lora_B, cuda.lora_magnitude_vector, xc):
        assert p.grad is not None and torch.isfinite(p.grad).all()
