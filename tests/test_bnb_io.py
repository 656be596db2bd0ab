"""Taking over bitsandbytes' 4-bit weights (qlora_ext/bnb_io.py, Linear4bit.from_bnb, prepare_model on a model
loaded with BitsAndBytesConfig), checked against bitsandbytes itself: the converted weight decodes to exactly the
weight bitsandbytes decodes, for NF4 and FP4, with and without its double quantization, every blocksize both
support, odd shapes, 16-bit weights and other storage dtypes; from the module, from a checkpoint's tensors, and
from a layer bitsandbytes repacked for its CPU kernel. The trainer on a pre-quantized model directory is in
tests/test_train.py."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext import Linear4bit, LoRALinear, merge_and_unload, prepare_model  # noqa: E402
from qlora_ext.bnb_io import (bnb_dense_weight, quant_state_from_bnb, quant_state_from_bnb_module,  # noqa: E402
                              quant_state_from_bnb_tensors)

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]),
                                reason="needs a CUDA GPU and a CUDA build")


def _from_state(q, qs, double_quant=False):
    """qlora_ext's QuantState from bitsandbytes' functional API's (codes, QuantState)."""
    nested = qs.nested
    return quant_state_from_bnb(q, qs.absmax, qs.code, qs.quant_type, qs.blocksize, qs.shape, qs.dtype,
                                nested_absmax=qs.state2.absmax if nested else None,
                                nested_quant_map=qs.state2.code if nested else None,
                                nested_blocksize=qs.state2.blocksize if nested else None,
                                nested_offset=qs.offset if nested else None, double_quant=double_quant)


def _bnb_layer(linear: torch.nn.Linear, quant_type="nf4", nested=True, device="cpu", blocksize=64):
    """A bitsandbytes Linear4bit holding linear's weight, quantized by bitsandbytes (on the move to device)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, blocksize=blocksize)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to(device)
    layer.support_avx512bf16_for_cpu = False  # its CPU inference kernel would repack it (tested below on purpose)
    return layer


def test_code_tables_are_bitsandbytes_tables():
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(bnbF.get_4bit_type(quant_type, device="cpu").float(), qlora_ext.code_table(quant_type))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape,dtype", [((65, 128), torch.float32), ((1, 256), torch.bfloat16),
                                         ((97, 192), torch.float16), ((300, 256), torch.float32)])
def test_decodes_to_exactly_bitsandbytes_weight(quant_type, nested, blocksize, shape, dtype):
    if shape[1] % blocksize:
        pytest.skip("rows must start blocks for a linear weight")
    w = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(dtype)
    q, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    ours = _from_state(q, qs)
    assert not ours.double_quant and ours.quant_type == quant_type and ours.blocksize == blocksize
    assert ours.shape == w.shape and ours.dtype == dtype
    expected = bnbF.dequantize_4bit(q, qs)
    got = qlora_ext.dequantize(ours)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    # without bitsandbytes' double quantization the absmax and codes are what qlora_ext computes itself, but for
    # exact ties of FP4 (possible with 16-bit weights), which bitsandbytes rounds away from zero when negative
    if not nested:
        own = qlora_ext.quantize(w, blocksize, quant_type, double_quant=False)
        assert torch.equal(ours.absmax, own.absmax)
        if quant_type == "nf4":
            assert torch.equal(ours.codes, own.codes)
        else:
            table = qlora_ext.code_table(quant_type)
            values = lambda q: table[torch.stack([q.codes >> 4, q.codes & 15], -1).reshape(-1).long()]  # noqa: E731
            x = w.reshape(-1).float() / own.absmax.repeat_interleave(blocksize)
            torch.testing.assert_close((values(ours) - x).abs(), (values(own) - x).abs(), rtol=0, atol=1e-6)


def test_other_storage_dtypes_and_the_checkpoint_tensors():
    w = torch.randn(96, 128)
    q, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_storage=torch.bfloat16)
    assert q.dtype == torch.bfloat16
    ours = _from_state(q, qs)
    assert torch.equal(qlora_ext.dequantize(ours), bnbF.dequantize_4bit(q, qs))
    # A checkpoint holds the same parts as tensors, the small fields packed as JSON bytes.
    tensors = {"layer.weight": q, **{f"layer.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    from_file = quant_state_from_bnb_tensors(tensors, "layer.weight")
    assert torch.equal(from_file.codes, ours.codes) and torch.equal(from_file.absmax, ours.absmax)
    assert from_file.shape == ours.shape and from_file.dtype == torch.float32
    with pytest.raises(KeyError, match="no bitsandbytes 4-bit weight at 'other.weight'"):
        quant_state_from_bnb_tensors(tensors, "other.weight")
    del tensors["layer.weight.nested_absmax"]
    with pytest.raises(KeyError, match=r"lacks \['layer.weight.nested_absmax'\]"):
        quant_state_from_bnb_tensors(tensors, "layer.weight")


def _tiny_llama_in_bnb(tmp_path, quant_type: str, seed: int):
    """A one-layer random llama saved dense, then loaded by transformers with BitsAndBytesConfig (double quant)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=True)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=bnb_config)


def test_a_saved_prequantized_model_reads_back(tmp_path):
    """The tensors transformers writes for a BitsAndBytesConfig model (what a pre-quantized checkpoint holds)."""
    from safetensors.torch import load_file

    model = _tiny_llama_in_bnb(tmp_path, "fp4", seed=0)
    model.save_pretrained(tmp_path / "bnb")
    tensors = load_file(str(tmp_path / "bnb" / "model.safetensors"))
    layer = model.model.layers[0].mlp.down_proj
    from_file = quant_state_from_bnb_tensors(tensors, "model.layers.0.mlp.down_proj.weight")
    from_module = quant_state_from_bnb_module(layer)
    assert from_file.quant_type == "fp4" and from_file.shape == (64, 128)
    for a, b in zip(from_file.tensors().values(), from_module.tensors().values()):
        assert torch.equal(a, b)
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(qlora_ext.dequantize(from_file), expected)


def test_reencoding_in_fp8_double_quant_costs_little_beside_the_4bit_error():
    """qlora_ext's FP8 double quantization is coarser than bitsandbytes' 8-bit dynamic map (3 mantissa bits):
    re-encoding bitsandbytes' absmax adds 4-7x the weight error bitsandbytes' own double quantization adds (measured
    on these weights), still under 1% of the 4-bit rounding error itself."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 1024, generator=g) * torch.rand(512, 1, generator=g)
    q, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True)
    ours = _from_state(q, qs, double_quant=True)
    assert ours.double_quant and ours.bits_per_param() == pytest.approx(4.127, abs=0.001)
    q0, qs0 = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False)
    plain_error = (bnbF.dequantize_4bit(q0, qs0) - w).norm()
    bnb_dq_cost = (bnbF.dequantize_4bit(q, qs) - w).norm() - plain_error
    ours_dq_cost = (qlora_ext.dequantize(ours) - w).norm() - plain_error
    assert 0 < bnb_dq_cost < ours_dq_cost < 0.01 * plain_error


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_linear4bit_from_bnb_computes_bitsandbytes_output(quant_type, nested):
    torch.manual_seed(2)
    linear = torch.nn.Linear(192, 97)
    layer = _bnb_layer(linear, quant_type, nested)
    ours = Linear4bit.from_bnb(layer)
    assert (ours.in_features, ours.out_features, ours.quant_type, ours.double_quant) == (192, 97, quant_type, False)
    assert torch.equal(ours.bias, layer.bias) and not ours.bias.requires_grad
    x = torch.randn(2, 5, 192)
    torch.testing.assert_close(ours(x), layer(x), rtol=1e-6, atol=1e-6)
    assert Linear4bit.from_bnb(layer, double_quant=True).double_quant
    with pytest.raises(TypeError, match="layer must be a bitsandbytes.nn.Linear4bit, got Linear"):
        Linear4bit.from_bnb(linear)


def test_a_layer_repacked_for_bitsandbytes_cpu_kernel_is_undone():
    """bitsandbytes' first forward in eval mode without gradients on an AVX512-BF16 CPU permutes the codes and
    rounds absmax to bfloat16: the codes come back exactly, absmax as the bfloat16 values it now computes with."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(128, 64, bias=False)
    layer = _bnb_layer(linear, "nf4", nested=True)
    exact = quant_state_from_bnb_module(layer)
    layer.support_avx512bf16_for_cpu = True
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU")
    got = quant_state_from_bnb_module(layer)
    assert torch.equal(got.codes, exact.codes)
    assert torch.equal(got.absmax, exact.absmax.bfloat16().float())
    # so does the dense weight a merge takes from such a layer
    assert torch.equal(bnb_dense_weight(layer), qlora_ext.dequantize(got))


def test_bad_parts_are_refused_by_name():
    w = torch.randn(64, 128)
    q, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    args = dict(weight=q, absmax=qs.absmax, quant_map=qs.code, quant_type="nf4", blocksize=64, shape=w.shape,
                dtype=torch.float32)
    with pytest.raises(ValueError, match="quant_map is not qlora_ext's nf4 table"):
        quant_state_from_bnb(**{**args, "quant_map": qs.code.flip(0)})
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quant_state_from_bnb(**{**args, "blocksize": 32})
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quant_state_from_bnb(**{**args, "quant_type": "int4"})
    with pytest.raises(ValueError, match="weight holds 4095 bytes of codes; a \\(64, 128\\) weight needs 4096"):
        quant_state_from_bnb(**{**args, "weight": q[:-1]})
    with pytest.raises(ValueError, match="absmax has 127 values"):
        quant_state_from_bnb(**{**args, "absmax": qs.absmax[:-1]})
    with pytest.raises(ValueError, match="absmax must be uint8 codes when nested"):
        quant_state_from_bnb(**args, nested_absmax=torch.ones(1), nested_quant_map=torch.zeros(256),
                             nested_blocksize=256, nested_offset=0.0)
    with pytest.raises(ValueError, match="absmax holds inf or NaN"):
        quant_state_from_bnb(**{**args, "absmax": torch.full_like(qs.absmax, float("nan"))})


class _Block(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.up, self.down = layers

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def test_prepare_model_takes_over_bitsandbytes_layers_exactly():
    torch.manual_seed(4)
    dense = [torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)]
    model = _Block([_bnb_layer(dense[0]), _bnb_layer(dense[1], "fp4", nested=False)])
    x = torch.randn(3, 128)
    expected = model(x)
    prepare_model(model, r=4, quant_type="int4", double_quant=True)  # dense-layer settings: not applied here
    assert isinstance(model.up, LoRALinear) and isinstance(model.up.base, Linear4bit)
    assert (model.up.base.quant_type, model.down.base.quant_type) == ("nf4", "fp4")
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)  # B = 0: the model is its base
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == \
        ["down.lora_A", "down.lora_B", "up.lora_A", "up.lora_B"]
    model(x).square().sum().backward()
    assert model.up.lora_A.grad is not None


def _bnb_flat_decode(layer) -> torch.Tensor:
    """bitsandbytes' own decode of a layer's weight, asked for as one flat row: its AVX-512 CPU kernel (0.50.2)
    decodes a 2-D weight whose rows do not start blocks wrongly (its round-trip error doubles), the flat call
    goes the blocks' real way."""
    qs = layer.weight.quant_state
    flat = bnbF.QuantState(absmax=qs.absmax, shape=torch.Size([qs.shape.numel()]), code=qs.code,
                           blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype, offset=qs.offset,
                           state2=qs.state2)
    return bnbF.dequantize_4bit(layer.weight.data, flat).view(qs.shape)


def test_layers_a_linear4bit_cannot_hold_stay_dense_with_the_reason():
    """bitsandbytes' blocks run across rows and it has blocksizes qlora_ext has not: such a layer is dequantized
    into a frozen dense base (with its adapter), as a dense layer with such in_features is."""
    torch.manual_seed(7)
    dense = [torch.nn.Linear(128, 96), torch.nn.Linear(96, 64)]
    layers = [_bnb_layer(dense[0], blocksize=32), _bnb_layer(dense[1])]
    expected = [_bnb_flat_decode(m) for m in layers]
    model = _Block(layers)
    with pytest.warns(UserWarning, match=r"2 linear layer\(s\) kept dense .*up \(bitsandbytes blocksize 32 .*"
                                         r"down \(in_features 96 is not a multiple of its blocksize 64; dequantized\)"):
        prepare_model(model, r=2)
    for base, weight, bias in zip((model.up.base, model.down.base), expected, (dense[0].bias, dense[1].bias)):
        assert type(base) is torch.nn.Linear and not base.weight.requires_grad
        assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)
    # the decode is right: a round trip through bitsandbytes' quantizer loses what 4 bits lose, no more
    own = qlora_ext.dequantize(qlora_ext.quantize(dense[1].weight.detach(), 64, "nf4"))
    assert (model.down.base.weight - dense[1].weight).abs().max() <= (own - dense[1].weight).abs().max() * 1.1


def test_merge_and_unload_makes_a_bitsandbytes_model_dense():
    """Adapted and unadapted bitsandbytes layers alike become nn.Linear computing the same."""
    torch.manual_seed(8)
    model = _Block([_bnb_layer(torch.nn.Linear(64, 128)), _bnb_layer(torch.nn.Linear(128, 64), "fp4", False)])
    prepare_model(model, r=2, target_modules=["up"])
    summary = qlora_ext.model_summary(model)   # the layer left to bitsandbytes counts as what it is
    assert summary.quantized_layers == 2 and summary.trainable_params == 2 * (64 + 128)
    assert summary.total_params == 2 * 64 * 128 + 128 + 64 + summary.trainable_params
    with torch.no_grad():
        model.up.lora_B.normal_()
    x = torch.randn(3, 64)
    expected = model(x)
    merge_and_unload(model)
    assert type(model.up) is torch.nn.Linear and type(model.down) is torch.nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"8-bit layers cannot be merged .*\['down'\]"):
        merge_and_unload(_Block([torch.nn.Linear(8, 8), bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)]))


def test_a_merged_transformers_model_saves_and_loads_as_a_dense_one(tmp_path):
    """In memory, as a PEFT user would: load with BitsAndBytesConfig, adapt some layers, merge, save_pretrained:
    plain transformers loads a dense model computing the same logits, and it casts like any dense model."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama_in_bnb(tmp_path, "nf4", seed=9)
    for m in model.modules():   # bitsandbytes' CPU inference repacking would compute the reference in bfloat16
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    prepare_model(model, r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.normal_()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(is_bnb for is_bnb in (isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert model.half().model.layers[0].mlp.up_proj.weight.dtype == torch.float16


def test_prepare_model_adapts_bare_linear4bit_layers_as_they_are():
    torch.manual_seed(5)
    base = [Linear4bit.from_linear(torch.nn.Linear(64, 64), quant_type="fp4"), torch.nn.Linear(64, 64)]
    model = _Block(base)
    codes = base[0].weight_codes
    prepare_model(model, r=2, quant_type="nf4")
    assert model.up.base is base[0] and model.up.base.weight_codes is codes    # not quantized again
    assert model.down.base.quant_type == "nf4"


@pytest.mark.parametrize("kwargs,message", [
    (dict(quant_type="none"), "up is already 4-bit \\(Linear4bit\\): quant_type='none'"),
    (dict(init_lora_weights="loftq"), "up is already 4-bit \\(Linear4bit\\): LoftQ needs the dense weights"),
])
def test_prepare_model_refusals_leave_the_model_unchanged(kwargs, message):
    model = _Block([_bnb_layer(torch.nn.Linear(64, 64)), torch.nn.Linear(64, 64)])
    with pytest.raises(ValueError, match=message):
        prepare_model(model, r=2, **kwargs)
    assert isinstance(model.up, bnb.nn.Linear4bit) and model.down.weight.requires_grad


def test_prepare_model_refuses_8bit_layers():
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    with pytest.raises(ValueError, match="up is a bitsandbytes 8-bit layer"):
        prepare_model(_Block([layer, torch.nn.Linear(64, 64)]), r=2)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("nested", [False, True])
def test_cuda_layer_converts_on_the_gpu(nested):
    torch.manual_seed(6)
    linear = torch.nn.Linear(4096, 65).to(torch.bfloat16)
    layer = _bnb_layer(linear, "nf4", nested, device="cuda")
    ours = Linear4bit.from_bnb(layer)
    assert ours.weight_codes.is_cuda
    w_bnb = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(ours.dequantized_weight(torch.bfloat16), w_bnb)
    x = torch.randn(17, 4096, device="cuda", dtype=torch.bfloat16)
    reference = x.float() @ w_bnb.float().T + layer.bias.float()
    plain_error = (x @ w_bnb.T + layer.bias - reference).abs().max()
    assert (ours(x).float() - reference).abs().max() <= 2 * plain_error + 1e-6


def test_a_model_whose_bitsandbytes_layers_are_all_taken_over_trains_in_transformers_trainer(tmp_path):
    """transformers' Trainer refuses a model it loaded with BitsAndBytesConfig unless PEFT adapted it; once
    prepare_model has taken over every bitsandbytes layer the model is no longer a bitsandbytes model to it (no
    quantizer, no quantization_config saved), as after merge_and_unload. With a bitsandbytes layer left, it is."""
    pytest.importorskip("transformers")
    from transformers.trainer_utils import validate_quantization_for_training
    model = _tiny_llama_in_bnb(tmp_path, "nf4", seed=10)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    prepare_model(model, r=2)
    validate_quantization_for_training(model)
    assert not model.is_quantized and model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    partly = _tiny_llama_in_bnb(tmp_path / "partly", "nf4", seed=10)
    prepare_model(partly, r=2, target_modules=["q_proj"])
    assert partly.is_quantized and partly.config.quantization_config.load_in_4bit
