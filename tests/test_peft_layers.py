"""PEFT's get_peft_model on qlora_ext's 4-bit layers (qlora_ext.peft_layers): the registered LoRA layer computes
what prepare_model's LoRALinear computes on the same base and adapters, trains only the adapters, saves a PEFT
folder that both PEFT and load_peft_adapter read back, merges into a requantized base, and refuses what it does not
do."""

import pytest
import torch

import qlora_ext
from qlora_ext import register_peft_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "up_proj"]
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("peft_layers") / "dense"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _peft_model(checkpoint, **kw):
    config = register_peft_layers(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))
    return peft.get_peft_model(qlora_ext.load_4bit(checkpoint), config)


def _same_adapters(peft_model, ours, seed=1):
    """Random adapters, the same in both models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, qlora_ext.LoRALinear):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
                theirs = peft_model.base_model.model.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(layer.lora_A)
                theirs.lora_B["default"].weight.copy_(layer.lora_B)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_peft_layers_compute_what_prepare_model_computes_and_train_only_the_adapters(checkpoint):
    model = _peft_model(checkpoint)
    ours = qlora_ext.prepare_model(qlora_ext.load_4bit(checkpoint), r=4, alpha=8, target_modules=TARGETS)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LoraLinear4bit" and isinstance(layer.base_layer, qlora_ext.Linear4bit)
    base = _logits(model)
    torch.testing.assert_close(base, _logits(qlora_ext.load_4bit(checkpoint)), rtol=0, atol=0)   # B = 0
    _same_adapters(model, ours)
    model.eval(), ours.eval()
    torch.testing.assert_close(_logits(model), _logits(ours), rtol=1e-6, atol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    codes = layer.base_layer.weight_codes.clone()
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained) and len(trained) == 2 * 2 * 3
    assert torch.equal(layer.base_layer.weight_codes, codes)


def test_the_peft_folder_reads_back_in_peft_and_in_qlora_ext(checkpoint, tmp_path):
    model = _peft_model(checkpoint)
    ours = qlora_ext.prepare_model(qlora_ext.load_4bit(checkpoint), r=4, alpha=8, target_modules=TARGETS).eval()
    _same_adapters(model, ours)
    model.save_pretrained(tmp_path / "adapter")
    want = _logits(ours)
    config = register_peft_layers(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    again = peft.PeftModel.from_pretrained(qlora_ext.load_4bit(checkpoint), tmp_path / "adapter", config=config)
    torch.testing.assert_close(_logits(again.eval()), want, rtol=1e-6, atol=1e-6)
    fresh = qlora_ext.prepare_model(qlora_ext.load_4bit(checkpoint), r=4, alpha=8, target_modules=TARGETS).eval()
    qlora_ext.load_peft_adapter(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(fresh), want, rtol=1e-6, atol=1e-6)


def test_merging_requantizes_the_merged_weight_and_unmerging_restores_the_base_exactly(checkpoint):
    model = _peft_model(checkpoint)
    ours = qlora_ext.prepare_model(qlora_ext.load_4bit(checkpoint), r=4, alpha=8, target_modules=TARGETS)
    _same_adapters(model, ours)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    base = layer.base_layer
    codes = base.weight_codes.clone()
    plain = _logits(model.eval())
    with model.disable_adapter():
        unadapted = _logits(model)
    expected = qlora_ext.dequantize(qlora_ext.quantize(
        base.dequantized_weight(torch.float32) + layer.get_delta_weight("default"), base.blocksize, base.quant_type,
        base.double_quant), torch.float32)
    with pytest.warns(UserWarning, match="quantizes W \\+ delta again"):
        model.merge_adapter()
    assert torch.equal(layer.base_layer.dequantized_weight(torch.float32), expected)
    model.unmerge_adapter()   # the base as it was, not a second rounding
    assert layer.base_layer is base and torch.equal(base.weight_codes, codes)
    torch.testing.assert_close(_logits(model), plain, rtol=0, atol=0)
    with pytest.warns(UserWarning):
        model.merge_adapter()
    with model.disable_adapter():   # (unmerges)
        torch.testing.assert_close(_logits(model), unadapted, rtol=0, atol=0)
    with pytest.warns(UserWarning):
        merged = model.merge_and_unload()
    up = merged.model.layers[1].mlp.up_proj
    assert isinstance(up, qlora_ext.Linear4bit) and (up.quant_type, up.double_quant) == (base.quant_type, True)
    assert torch.equal(up.dequantized_weight(torch.float32), expected)


def test_two_adapters_merge_in_one_rounding(checkpoint):
    model = _peft_model(checkpoint)
    model.add_adapter("other", register_peft_layers(peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    base = layer.base_layer
    both = base.dequantized_weight(torch.float32) + layer.get_delta_weight("default") + \
        layer.get_delta_weight("other")
    with pytest.warns(UserWarning):
        layer.merge(adapter_names=["default", "other"])
    assert torch.equal(layer.base_layer.dequantized_weight(torch.float32), qlora_ext.dequantize(
        qlora_ext.quantize(both, base.blocksize, base.quant_type, base.double_quant), torch.float32))


def test_what_it_does_not_do_is_refused(checkpoint):
    with pytest.raises(ValueError, match="DoRA on qlora_ext's 4-bit layers is not supported"):
        register_peft_layers(peft.LoraConfig(use_dora=True))
    with pytest.raises(TypeError, match="takes a peft.LoraConfig"):
        register_peft_layers({"r": 4})
    for init, extra in (("pissa", {}), ("pissa_niter_4", {}), ("olora", {}),
                        ("loftq", {"loftq_config": peft.LoftQConfig(loftq_bits=4)})):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' reads the dense base weight"):
            register_peft_layers(peft.LoraConfig(init_lora_weights=init, **extra))
    # one kind of adapter per model: PEFT on prepare_model's layers
    prepared = qlora_ext.prepare_model(qlora_ext.load_4bit(checkpoint), r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="has qlora_ext's own LoRA adapter"):
        peft.get_peft_model(prepared, register_peft_layers(peft.LoraConfig(r=2, target_modules=["q_proj"])))
    # qlora_ext's dense merge does not half-convert a PEFT model
    model = _peft_model(checkpoint)
    with pytest.raises(ValueError, match="is a PEFT LoRA layer: merge a PEFT model with its own merge_and_unload"):
        qlora_ext.merge_and_unload(model)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, qlora_ext.Linear4bit)
