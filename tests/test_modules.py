"""Linear4bit, LoRALinear and prepare_model: state_dict round trips, moves, LoRA gradients against a
dense reference, merged weights, and model surgery on a small llama-shaped model."""
import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import Linear4bit, LoRALinear, merge_and_unload, model_summary, prepare_model
from tests.conftest import DEVICES, HAS_CUDA


class Block(nn.Module):
    """The linear layers of a llama decoder block, with llama's names."""

    def __init__(self, d=128, f=192):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.o_proj(self.q_proj(h) * torch.sigmoid(self.k_proj(h)) + self.v_proj(h))
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=128, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_matches_dequantized_dense(device, double_quant):
    lin = nn.Linear(128, 70).to(device)
    q = Linear4bit.from_linear(lin, double_quant=double_quant)
    x = torch.randn(4, 128, device=device)
    w = qlora_ext.dequantize(qlora_ext.quantize(lin.weight.detach(), double_quant=double_quant))
    torch.testing.assert_close(q(x), x @ w.t() + lin.bias.detach(), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_state_dict_round_trip_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = Linear4bit.from_linear(nn.Linear(128, 64), quant_type="fp4")
    sd = src.state_dict()
    assert set(sd) == {"bias", "weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_mean",
                       "weight_format"}
    save_file(sd, str(tmp_path / "layer.safetensors"))
    dst = Linear4bit(128, 64)   # an nf4 placeholder: the saved format says fp4
    dst.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    x = torch.randn(3, 128)
    assert torch.equal(dst(x), src(x))
    for name, t in sd.items():
        assert torch.equal(dst.state_dict()[name], t)
    assert dst.quant_type == "fp4"


def test_a_state_dict_of_another_format_is_taken_or_refused_by_name():
    """The codes mean what the saved format says: its quant_type and weight_dtype are taken (an nf4 model loading
    an fp4 state dict strictly computed garbage before); another blocksize or double quantization is an error
    naming the layer; a state dict without the format (older) loads as before."""
    src = prepare_model(TinyLM(), r=4, quant_type="fp4").to(torch.bfloat16)
    dst = prepare_model(TinyLM(), r=4)
    dst.load_state_dict(src.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(dst.to(torch.bfloat16)(ids), src(ids), rtol=0, atol=0)
    q = dst.layers[0].q_proj.base
    assert (q.quant_type, q.weight_dtype) == ("fp4", torch.bfloat16)
    other = prepare_model(TinyLM(), r=4, blocksize=128)
    with pytest.raises(RuntimeError, match="layers.0.q_proj.base: the state dict holds a 4-bit weight with "
                                           "blocksize 64, double_quant=True, this layer has blocksize 128"):
        other.load_state_dict(src.state_dict(), strict=False)
    older = {k: v for k, v in src.state_dict().items() if not k.endswith("weight_format")}
    plain = prepare_model(TinyLM(), r=4)
    assert not plain.load_state_dict(older).missing_keys
    assert plain.layers[0].q_proj.base.quant_type == "nf4"
    broken = dict(src.state_dict())
    broken["layers.0.q_proj.base.weight_format"] = torch.tensor(list(b'{"quant_type": "nf5"}'), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="layers.0.q_proj.base.weight_format: not a 4-bit weight format"):
        plain.load_state_dict(broken)


def test_to_dtype_keeps_the_format():
    layer = Linear4bit.from_linear(nn.Linear(128, 64))
    before = {k: v.clone() for k, v in layer.state_dict().items() if k not in ("bias", "weight_format")}
    layer.to(torch.bfloat16)
    layer.half()
    for k, v in before.items():
        assert getattr(layer, k).dtype == v.dtype and torch.equal(getattr(layer, k), v)
    assert layer.bias.dtype == torch.float16
    # the dense weight the layer stands for follows, as an nn.Linear's would; float64 (gradcheck) does not
    assert layer.weight_dtype == torch.float16 and layer.dequantized_weight().dtype == torch.float16
    layer.double()
    assert layer.weight_dtype == torch.float16
    layer.float()
    assert layer.weight_dtype == torch.float32


def test_compute_dtype_is_the_gemm_dtype_and_the_output_keeps_x_dtype():
    """bitsandbytes' compute_dtype: an fp32 model whose 4-bit layers compute in bf16 stays fp32 between layers
    (its attention and norms see fp32); under autocast the output has the autocast dtype, as nn.Linear's."""
    lin = nn.Linear(128, 70)
    layer = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 128)
    y = layer(x)
    w = layer.dequantized_weight(torch.bfloat16)
    want = (x.bfloat16().float() @ w.float().t() + lin.bias.detach().bfloat16().float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    model = prepare_model(TinyLM(), r=4, compute_dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (2, 7))
    out = model(ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert model.layers[0].q_proj.lora_A.grad.dtype == torch.float32
    dora = prepare_model(TinyLM(), r=4, compute_dtype=torch.bfloat16, use_dora=True)
    dora.train()
    assert dora(ids).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merging_a_prepared_model_cast_to_another_dtype_gives_that_dtype(dtype):
    """prepare_model on an fp32 model, then .to(bf16): the merged model is a bf16 model that runs (PEFT's
    merge keeps the base layer's dtype)."""
    model = prepare_model(TinyLM(), r=4).to(dtype)
    ids = torch.randint(0, 50, (2, 7))
    merged = merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {dtype}
    assert torch.isfinite(merged(ids).float()).all()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_moves_between_devices_without_requantizing():
    layer = Linear4bit.from_linear(nn.Linear(128, 64))
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(5, 128)
    y = layer(x)
    layer.cuda()
    assert layer.weight_codes.is_cuda and layer.weight_absmax_mean.is_cuda
    torch.testing.assert_close(layer(x.cuda()).cpu(), y, rtol=1e-5, atol=1e-5)
    layer.cpu()
    for k, v in sd.items():
        assert torch.equal(layer.state_dict()[k], v)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_starts_at_base_and_gradients_match_dense_reference(device):
    base = Linear4bit.from_linear(nn.Linear(128, 96).to(device))
    lora = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(6, 128, device=device, requires_grad=True)
    assert torch.equal(lora(x), base(x))  # B = 0
    with torch.no_grad():
        lora.lora_B.normal_()
    w = base.dequantized_weight(torch.float32)
    a_ref = lora.lora_A.detach().clone().requires_grad_(True)
    b_ref = lora.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w.t() + base.bias + (x_ref @ a_ref.t() @ b_ref.t()) * 2.0
    y = lora(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in [(x.grad, x_ref.grad), (lora.lora_A.grad, a_ref.grad), (lora.lora_B.grad, b_ref.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert base.bias.grad is None


def test_merged_weight():
    lora = LoRALinear(Linear4bit.from_linear(nn.Linear(128, 64)), r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 128)
    merged = lora.merged_weight(torch.float32)
    torch.testing.assert_close(x @ merged.t() + lora.base.bias, lora(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_and_unload_computes_the_adapted_model(device):
    """Adapters on a 4-bit base, on a dense base (in_features 96: kept dense), and a bare Linear4bit: all become
    nn.Linear computing what they did (the dequantized base plus the adapter), frozen, in the asked dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
    with pytest.warns(UserWarning, match="kept dense"):
        prepare_model(model, r=4, alpha=8, dropout=0.1, target_modules=["0", "2"])
    model[4] = Linear4bit.from_linear(model[4], quant_type="fp4")
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_()
    model.eval()   # the adapted model without dropout is what a merged one computes
    x = torch.randn(5, 128, device=device)
    expected = model(x)
    merged = merge_and_unload(model)
    assert merged is model and all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    assert not any(p.requires_grad for p in model.parameters()) and model[0].weight.device.type == device
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    bare = merge_and_unload(LoRALinear(Linear4bit.from_linear(nn.Linear(64, 32)), r=2), torch.bfloat16)
    assert type(bare) is nn.Linear and bare.weight.dtype == bare.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_prepare_model_all_linear_but_lm_head(quant_type):
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids).detach()
    prepare_model(model, r=4, alpha=8, quant_type=quant_type)
    adapters = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 14 and not any("lm_head" in n for n in adapters)
    assert isinstance(model.lm_head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    after = model(ids)
    if quant_type == "none":
        torch.testing.assert_close(after, before)  # B = 0: the model is unchanged
    else:
        assert (after - before).abs().max() < 0.2 * before.abs().max()
    after.sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    s = model_summary(model)
    lora_params = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    assert s.trainable_params == lora_params
    dense_total = sum(p.numel() for p in TinyLM().parameters())
    assert s.total_params == dense_total + lora_params
    assert s.quantized_layers == (0 if quant_type == "none" else 14)


def test_prepare_model_targets_and_errors():
    model = TinyLM()
    prepare_model(model, target_modules=["q_proj", "v_proj"], r=2)
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert names == {"q_proj", "v_proj"}
    # PEFT's "all-linear" is the default: every linear layer but lm_head
    for spelling in ("all-linear", ["all-linear"]):
        everything = prepare_model(TinyLM(), target_modules=spelling, r=2)
        assert sum(isinstance(m, LoRALinear) for m in everything.modules()) == 14
        assert not isinstance(everything.lm_head, LoRALinear)
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no nn.Linear"):
        prepare_model(TinyLM(), target_modules=["qkv"])
    with pytest.raises(ValueError, match="quant_type must be"):
        prepare_model(TinyLM(), quant_type="nf2")
    with pytest.raises(ValueError, match="r must be a positive integer"):
        prepare_model(TinyLM(), r=0)


def test_a_model_with_nothing_to_adapt_is_refused_unchanged_and_gpt2_conv1d_is_named():
    """GPT-2's linear layers are transformers Conv1D modules (not nn.Linear): a prepare_model that would adapt
    nothing says so (and why, for Conv1D) instead of freezing every parameter."""
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=r"nothing to train: the model has no nn.Linear layer to adapt \(besides "
                                         r"exclude=\['2'\]\)$"):
        prepare_model(nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4), nn.Linear(4, 8)), exclude=["2"])
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50,
                                                                n_positions=16))
    with pytest.raises(ValueError, match=r"nothing to train.*\['c_attn', 'c_fc', 'c_proj'\] are transformers "
                                         r"Conv1D layers \(GPT-2's"):
        prepare_model(gpt2)
    assert all(p.requires_grad for p in gpt2.parameters())   # refused before anything changed
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no nn.Linear.*\['c_attn', 'c_fc', 'c_proj'\] are "
                                         r"transformers Conv1D layers"):
        prepare_model(gpt2, target_modules=["c_attn"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(dropout=2.0), "dropout must be a probability in \\[0, 1\\], got 2.0"),
    (dict(dropout=-0.1), "dropout must be a probability"),
    (dict(r=2.5), "r must be a positive integer, got 2.5"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(blocksize=32), "blocksize must be one of \\(64, 128, 256\\), got 32"),
    (dict(blocksize=100), "blocksize must be one of"),
    (dict(compute_dtype="bfloat17"), "compute_dtype must be None or one of \\['torch.float32'"),
    (dict(compute_dtype=torch.int8), "compute_dtype must be None or one of"),
    (dict(compute_dtype=torch.float8_e4m3fn), "compute_dtype must be None or one of"),
])
def test_bad_settings_are_refused_before_the_model_changes(kwargs, message):
    model = TinyLM()
    before = {n: (type(m), tuple(p.requires_grad for p in m.parameters(recurse=False)))
              for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=message):
        prepare_model(model, **kwargs)
    assert before == {n: (type(m), tuple(p.requires_grad for p in m.parameters(recurse=False)))
                      for n, m in model.named_modules()}
    if "compute_dtype" not in kwargs and "blocksize" not in kwargs:
        with pytest.raises(ValueError, match=message):
            LoRALinear(nn.Linear(64, 32), **kwargs)


def test_a_regular_expression_selects_whole_paths_as_in_peft():
    """PEFT's string target_modules is a regular expression matched against whole module paths; a plain name
    stays a name."""
    model = prepare_model(TinyLM(), target_modules=r"layers\.0\..*_proj", r=2)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == [f"layers.0.{n}" for n in sorted(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"))]
    assert sum(isinstance(m, LoRALinear) for m in prepare_model(TinyLM(), target_modules="q_proj").modules()) == 2
    with pytest.raises(ValueError, match="target_modules '.\\*qkv' \\(a regular expression.* paths are like"):
        prepare_model(TinyLM(), target_modules=".*qkv")
    with pytest.raises(ValueError, match="is not a regular expression"):
        prepare_model(TinyLM(), target_modules="(q_proj")


def test_a_regular_expression_target_again_adds_nothing_and_fails_nothing():
    model = prepare_model(TinyLM(), target_modules=r".*\.(q|v)_proj", r=2)
    again = prepare_model(model, target_modules=r".*\.(q|v)_proj", r=2)
    assert sum(isinstance(m, LoRALinear) for m in again.modules()) == 4


def test_state_dict_tools_that_set_one_tensor_at_a_time_find_the_format_buffer(tmp_path):
    """accelerate's device_map loading and torch.distributed.checkpoint's state dict helpers set or read each
    state dict entry as a module attribute: the format is a real buffer of a fixed size."""
    from accelerate.utils import load_checkpoint_in_model
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    torch.manual_seed(0)
    src = prepare_model(TinyLM(), r=2).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    dst = prepare_model(TinyLM(), r=2).to(torch.bfloat16)
    load_checkpoint_in_model(dst, str(tmp_path / "m.safetensors"), device_map={"": "cpu"})
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(dst(ids), src(ids))
    state = get_model_state_dict(dst)
    assert "layers.0.q_proj.base.weight_format" in state
    set_model_state_dict(dst, src.state_dict())
    fp4 = Linear4bit(128, 64, quant_type="fp4", weight_dtype=torch.bfloat16)
    assert fp4.weight_format.shape == Linear4bit(128, 64).weight_format.shape   # (one size for every format)
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        Linear4bit(128, 64, weight_dtype=torch.int8)


def test_the_format_key_is_read_at_any_length_and_state_dict_leaves_the_module_alone():
    src = prepare_model(TinyLM(), r=2, quant_type="fp4")
    sd = src.state_dict()
    short = b'{"blocksize": 64, "double_quant": true, "quant_type": "fp4", "weight_dtype": "float32"}'
    sd = {k: torch.tensor(list(short), dtype=torch.uint8) if k.endswith("weight_format") else v for k, v in sd.items()}
    dst = prepare_model(TinyLM(), r=2)
    dst.load_state_dict(sd)
    assert dst.layers[0].q_proj.base.quant_type == "fp4"
    buffers = {n: b for n, b in dst.named_buffers()}
    with torch.inference_mode():
        dst.state_dict()
    assert all(b is buffers[n] for n, b in dst.named_buffers())   # (no buffer replaced, none an inference tensor)
    dst.load_state_dict(src.state_dict())


def test_compute_dtype_by_name():
    model = prepare_model(TinyLM(), r=2, compute_dtype="bfloat16")
    assert model.layers[0].q_proj.base.compute_dtype == torch.bfloat16
    assert Linear4bit(64, 8, compute_dtype="torch.float16").compute_dtype == torch.float16


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_prepare_model_applied_again_adds_adapters_and_keeps_the_old_ones(quant_type):
    model = TinyLM()
    prepare_model(model, target_modules=["q_proj"], r=2, quant_type=quant_type)
    q_adapter = model.layers[0].q_proj
    prepare_model(model, target_modules=["q_proj", "v_proj"], r=2, quant_type=quant_type)
    assert model.layers[0].q_proj is q_adapter  # not wrapped again (its dense base is no target either)
    adapters = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapters == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{a}.lora_{ab}" for a in adapters for ab in "AB"}
    # all defaults again: every other linear but lm_head gets one, none is nested
    prepare_model(model, r=2, quant_type=quant_type)
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 14 and not any(isinstance(a.base, LoRALinear) for a in adapters)
    assert sum(p.requires_grad for p in model.parameters()) == 28


def test_prepare_model_keeps_layers_with_odd_in_features_dense_with_a_warning():
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.warns(UserWarning, match=r"1 linear layer\(s\) kept dense .*2 \(in_features 96 is not a multiple of blocksize 64\)"):
        prepare_model(model, r=2, exclude=())
    assert isinstance(model[0].base, Linear4bit) and isinstance(model[4].base, Linear4bit)
    assert isinstance(model[2].base, nn.Linear) and not model[2].base.weight.requires_grad
    y = model(torch.randn(5, 128))
    y.sum().backward()
    assert model[2].lora_A.grad is not None
    assert model_summary(model).quantized_layers == 2


def test_lora_layers_forward_their_bases_weight_and_bias_as_peft_layers_do():
    """Model code reads `self.o_proj.weight.dtype` (to cast its input) and tools probe layers: a LoRALinear
    answers with its base's weight (a 4-bit base: its QuantState, with the dense weight's dtype) and bias, and is
    shown with its r / alpha / scaling. transformers' tie_weights hands a dense base the embedding's weight; a
    4-bit one refuses clearly."""
    transformers = pytest.importorskip("transformers")

    class ReadsItsWeightsDtype(nn.Module):   # as some transformers models' forward do
        def __init__(self):
            super().__init__()
            self.o_proj = nn.Linear(64, 64)

        def forward(self, x):
            return self.o_proj(x.to(self.o_proj.weight.dtype))

    model = prepare_model(ReadsItsWeightsDtype(), r=2, alpha=4)
    layer = model.o_proj
    assert layer.weight.dtype == torch.float32 and layer.weight.shape == (64, 64) and layer.weight.device.type == "cpu"
    assert layer.bias is layer.base.bias and layer.weight.codes is layer.base.weight_codes
    model.to(torch.bfloat16)
    assert model(torch.randn(3, 64)).dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert "r=2, alpha=4, scaling=2" in repr(layer)
    assert "weight" not in dict(layer.named_parameters(recurse=False)) and set(layer.state_dict()) >= {
        "base.weight_codes", "base.bias", "lora_A", "lora_B"}

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    dense = prepare_model(transformers.LlamaForCausalLM(cfg), r=2, quant_type="none", exclude=())
    embedding, head = dense.model.embed_tokens.weight, dense.lm_head
    assert isinstance(head, LoRALinear) and head.base.weight is embedding
    assert (head.weight.dtype, head.weight.shape, head.weight.ndim) == (torch.float32, (64, 64), 2)
    assert not hasattr(head.weight, "quant_state")   # (what transformers and bitsandbytes probe)
    count = len(list(dense.parameters()))
    dense.tie_weights()
    assert head.base.weight is embedding and len(list(dense.parameters())) == count   # no stray parameter
    quantized = prepare_model(transformers.LlamaForCausalLM(cfg), r=2, exclude=())
    with pytest.raises(AttributeError, match="cannot set the weight of a LoRA layer on a 4-bit base"):
        quantized.tie_weights()


def test_model_code_computing_with_an_adapted_layers_weight_fails_instead_of_skipping_the_adapter():
    """Mamba's mixer computes `self.dt_proj.weight @ ...` (not dt_proj(...)): with the dense weight in hand it would
    run without dt_proj's adapter, silently; LoRALinear.weight gives dtype, device and shape only, so it fails,
    naming the way out."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=64, state_size=8, num_hidden_layers=1, expand=2)
    with pytest.warns(UserWarning, match="dt_proj .in_features 4 is not a multiple of blocksize 64"):
        model = prepare_model(transformers.MambaForCausalLM(cfg), r=2)
    with pytest.raises(TypeError, match="would skip the LoRA adapter; leave that layer out of target_modules"):
        model(torch.randint(0, 64, (1, 5)))
    model = prepare_model(transformers.MambaForCausalLM(cfg), r=2, exclude=("lm_head", "dt_proj"))
    model(torch.randint(0, 64, (1, 5))).logits.sum().backward()
    weight = model.backbone.layers[0].mixer.in_proj.weight   # a 4-bit base: its QuantState, math fails too
    for product in (lambda: weight @ torch.randn(64), lambda: torch.randn(2, 64) @ weight):
        with pytest.raises(TypeError, match="a QuantState is a 4-bit weight, not a tensor: call its layer"):
            product()
    for probe in (lambda w: w.t(), lambda w: torch.matmul(torch.randn(2, 64), w), lambda w: w * 2):
        with pytest.raises((TypeError, AttributeError), match="skip the LoRA adapter"):
            probe(prepare_model(nn.Sequential(nn.Linear(64, 64)), quant_type="none")[0].weight)


def test_transformers_flash_attention_finds_the_dtype_of_a_4bit_attention():
    """transformers' flash-attention path casts float32 queries to a dtype it finds in the attention module's
    first nn.Linear, or (for quantized models) in the config: a prepared model is marked quantized as a
    bitsandbytes load is, so it gets the config's dtype instead of StopIteration."""
    transformers = pytest.importorskip("transformers")
    flash = pytest.importorskip("transformers.integrations.flash_attention")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, dtype=torch.bfloat16)
    model = prepare_model(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16), r=2)   # (as from_pretrained)
    attention = model.model.layers[0].self_attn
    assert flash.get_target_dtype(torch.zeros(1, dtype=torch.float32), attention) == torch.bfloat16
    assert "_is_quantized" not in model.config.to_dict()   # (transformers never saves the mark)
    merge_and_unload(model)   # dense again: its layers' dtype, found in the attention's nn.Linear
    assert not hasattr(model.config, "_is_quantized")
    assert flash.get_target_dtype(torch.zeros(1, dtype=torch.float32), attention) == torch.bfloat16
