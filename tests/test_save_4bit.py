"""qlora_ext.save_4bit and load_4bit's reading of what it wrote: a 4-bit model saved as a Hugging Face directory
must come back bit for bit (codes, constants, every other tensor, the logits) without requantizing, whatever its
formats, shards, tied embeddings and adapters; a checkpoint that does not fit its model must give a clear error."""
import json
import os

import pytest
import torch

import qlora_ext
from qlora_ext.load_4bit import is_4bit_checkpoint, load_4bit, load_4bit_problem
from qlora_ext.save_4bit import save_4bit
from tests.conftest import cuda_only

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _dense(path, tie=True, **overrides):
    """A tiny llama saved dense (hidden 256: every blocksize fits); intermediate 96: down_proj's in_features is not a multiple of 64 (stays dense)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=160, hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=tie)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("save4bit")
    return {"tied": _dense(root / "tied"), "untied": _dense(root / "untied", tie=False)}


def _ids():
    return torch.randint(0, 160, (2, 11), generator=torch.Generator().manual_seed(1))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _load_quiet(path, **kw):
    return load_4bit(path, **kw)


@pytest.mark.parametrize("fmt", [dict(quant_type="nf4", double_quant=True, blocksize=64),
                                 dict(quant_type="fp4", double_quant=False, blocksize=128),
                                 dict(quant_type="int4", double_quant=True, blocksize=256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(dense_dirs, tmp_path, fmt, dtype):
    model = load_4bit(dense_dirs["untied"], dtype=dtype, **fmt)
    assert save_4bit(model, str(tmp_path / "q")) == str(tmp_path / "q")
    assert is_4bit_checkpoint(str(tmp_path / "q")) and load_4bit_problem(str(tmp_path / "q")) is None
    assert not is_4bit_checkpoint(dense_dirs["untied"])
    spec = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert spec["quant_method"] == "qlora_ext" and spec["format_version"] == 1
    dtype_name = str(dtype).removeprefix("torch.")
    assert len(spec["layers"]) == 12   # 6 per block, no down_proj
    assert all(v == dict(fmt, weight_dtype=dtype_name) for v in spec["layers"].values())
    assert spec["source"] == os.path.abspath(dense_dirs["untied"])   # the dense base, for PEFT adapters
    # asked for other settings, the checkpoint's own format wins (as prepare_model keeps a 4-bit layer's format)
    back = load_4bit(str(tmp_path / "q"), dtype=dtype, quant_type="nf4", double_quant=not fmt["double_quant"],
                     blocksize=64, target_modules=["q_proj"])
    _assert_same_state(back, model)
    assert not hasattr(back.config, "quantization_config")   # a plain model holding Linear4bit layers
    layer = back.model.layers[1].self_attn.k_proj
    assert isinstance(layer, qlora_ext.Linear4bit) and (layer.quant_type, layer.blocksize, layer.double_quant) == \
        (fmt["quant_type"], fmt["blocksize"], fmt["double_quant"]) and layer.weight_dtype == dtype
    assert isinstance(back.model.layers[0].mlp.down_proj, torch.nn.Linear)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # without a dtype, everything comes back in the dtypes it was saved in
    _assert_same_state(load_4bit(str(tmp_path / "q")), model)


def test_each_layer_keeps_the_weight_dtype_it_dequantizes_to(dense_dirs, tmp_path):
    # a model loaded in float32 and cast to bfloat16: its 4-bit layers dequantize to bfloat16 (as the dense
    # layers' weights were cast; the format's constants are not), and so they do after the round trip
    model = load_4bit(dense_dirs["untied"], dtype=torch.float32).to(torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight_dtype == torch.bfloat16
    model.model.layers[1].self_attn.q_proj.float()   # one layer on its own
    save_4bit(model, str(tmp_path / "q"))
    back = load_4bit(str(tmp_path / "q"))
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert back.model.layers[0].self_attn.q_proj.weight_dtype == torch.bfloat16
    assert back.model.layers[1].self_attn.q_proj.weight_dtype == torch.float32
    for name, layer in model.named_modules():
        if isinstance(layer, qlora_ext.Linear4bit):
            assert torch.equal(back.get_submodule(name).dequantized_weight(), layer.dequantized_weight()), name
    # (the logits are not compared: .to(bfloat16) also cast the model's rotary frequencies, a load does not)


def test_a_prepared_model_saves_its_base_and_trains_on_as_before(dense_dirs, tmp_path):
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"])
    model = load_4bit(dense_dirs["untied"], dtype=torch.float32, **kw)
    with pytest.warns(UserWarning, match="kept dense"):
        model = qlora_ext.prepare_model(model, r=4, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()   # trained-looking adapters: the saved base must not include them
    save_4bit(model, str(tmp_path / "q"), max_shard_size="20KB")
    files = os.listdir(tmp_path / "q")
    assert "qlora_ext_4bit.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    index = json.loads((tmp_path / "q" / "qlora_ext_4bit.safetensors.index.json").read_text())["weight_map"]
    assert not any("lora_" in k or ".base." in k for k in index)
    assert "model.layers.0.self_attn.q_proj.weight_codes" in index and "model.layers.0.mlp.down_proj.weight" in index
    back = load_4bit(str(tmp_path / "q"), dtype=torch.float32)
    with pytest.warns(UserWarning, match="kept dense"):
        back = qlora_ext.prepare_model(back, r=4, **kw)
    back.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    _assert_same_state(back, model)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_tied_embeddings(dense_dirs, tmp_path):
    # lm_head not quantized: it shares the embedding, written once, tied again on load
    model = load_4bit(dense_dirs["tied"], dtype=torch.float32)
    save_4bit(model, str(tmp_path / "plain"))
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "plain" / "qlora_ext_4bit.safetensors")).keys()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    back = load_4bit(str(tmp_path / "plain"), dtype=torch.float32)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    _assert_same_state(back, model)
    # lm_head quantized (a copy of the embedding, by prepare_model): untied on load, both weights as saved
    kw = dict(target_modules=["q_proj", "lm_head"], exclude=())
    model = qlora_ext.prepare_model(load_4bit(dense_dirs["tied"], dtype=torch.float32, **kw), r=4, **kw)
    assert isinstance(model.lm_head.base, qlora_ext.Linear4bit)
    save_4bit(model, str(tmp_path / "head"))
    back = load_4bit(str(tmp_path / "head"), dtype=torch.float32)
    assert isinstance(back.lm_head, qlora_ext.Linear4bit) and back.config.tie_word_embeddings is False
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # lm_head adapted on a dense base that is still the embedding's weight (a second prepare_model, 16-bit): tied
    model = load_4bit(dense_dirs["tied"], dtype=torch.float32, target_modules=["q_proj"])
    qlora_ext.prepare_model(model, r=4, target_modules=["q_proj"])
    qlora_ext.prepare_model(model, r=4, target_modules=["lm_head"], exclude=(), quant_type="none")
    assert model.lm_head.base.weight is model.model.embed_tokens.weight
    save_4bit(model, str(tmp_path / "adapted_head"))
    back = load_4bit(str(tmp_path / "adapted_head"), dtype=torch.float32)
    assert back.config.tie_word_embeddings is True and back.lm_head.weight is back.model.embed_tokens.weight


def test_a_config_that_says_tied_with_two_different_weights_keeps_both(tmp_path):
    # transformers keeps such a checkpoint's lm_head (it warns and does not tie): so must both loaders, and the
    # saved config must no longer say tied
    from transformers import AutoModelForCausalLM
    dense = _dense(tmp_path / "dense", tie=False)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "dense" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert reference.lm_head.weight is not reference.model.embed_tokens.weight
    model = load_4bit(dense, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    save_4bit(model, str(tmp_path / "q"))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    back = load_4bit(str(tmp_path / "q"))
    assert torch.equal(back.lm_head.weight, reference.lm_head.weight)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_bad_models_and_targets_are_refused(dense_dirs, tmp_path):
    with pytest.raises(ValueError, match="must be a transformers PreTrainedModel"):
        save_4bit(torch.nn.Sequential(qlora_ext.Linear4bit(64, 8)), str(tmp_path / "a"))
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match="has no Linear4bit layers"):
        save_4bit(AutoModelForCausalLM.from_pretrained(dense_dirs["untied"]), str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        save_4bit(load_4bit(dense_dirs["untied"], dtype=torch.float32), str(tmp_path / "c"))
    assert os.listdir(tmp_path / "c") == ["keep.txt"]
    assert not any(n.startswith("b") or n.startswith("a") for n in os.listdir(tmp_path))   # nothing half-written


@pytest.fixture
def saved(dense_dirs, tmp_path):
    path = tmp_path / "q"
    save_4bit(load_4bit(dense_dirs["untied"], dtype=torch.float32), str(path))
    return path


def _edit(path, change_tensors=None, change_spec=None):
    from safetensors.torch import load_file, save_file
    if change_tensors:
        tensors = load_file(str(path / "qlora_ext_4bit.safetensors"))
        change_tensors(tensors)
        save_file(tensors, str(path / "qlora_ext_4bit.safetensors"), metadata={"format": "pt"})
    if change_spec:
        config = json.loads((path / "config.json").read_text())
        change_spec(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change_tensors,change_spec,message", [
    (lambda t: t.update({f"{Q}.weight_codes": t[f"{Q}.weight_codes"][:-1]}), None,
     rf"{Q}.weight_codes must be torch.uint8 \[32768\] for a \[256, 256\] weight .* got torch.uint8 \[32767\]"),
    (lambda t: t.pop(f"{Q}.weight_absmax_scale"), None, rf"the checkpoint lacks {Q}.weight_absmax_scale"),
    (lambda t: t.update({f"{Q}.weight_absmax": t[f"{Q}.weight_absmax"].float()}), None,
     rf"{Q}.weight_absmax must be torch.uint8 \[1024\]"),
    (lambda t: t.pop(f"{Q}.bias"), None, rf"lacks 1 tensor\(s\) of the model, e.g. \['{Q}.bias'\]"),
    (None, lambda s: s["layers"][Q].update(double_quant=False),
     r"do not belong to a 4-bit layer with double_quant=False|must be torch.float32"),
    (lambda t: t.update({f"{Q}.bias": t[f"{Q}.bias"][:-1]}), None,
     rf"{Q}.bias must be a floating tensor \[256\] for the \[256, 256\] layer, got torch.float32 \[255\]"),
    (lambda t: t.update({f"{Q}.bias": t[f"{Q}.bias"].int()}), None, rf"{Q}.bias must be a floating tensor"),
    (None, lambda s: s["layers"][Q].update(blocksize=100), r"blocksize an int in \(64, 128, 256\)"),
    (None, lambda s: s["layers"][Q].update(blocksize=64.0), r"blocksize an int in"),
    (None, lambda s: s["layers"][Q].update(double_quant=1), r"double_quant a bool"),
    (None, lambda s: s["layers"][Q].update(weight_dtype="float64"), r"weight_dtype in"),
    (None, lambda s: s["layers"][Q].pop("weight_dtype"), r"must give exactly"),
    (None, lambda s: s.update(format_version=True), "of format version True"),
    (None, lambda s: s.update(format_version=1.0), "of format version 1.0"),
    (None, lambda s: s["layers"].update({"model.layers.0.input_layernorm": s["layers"][Q]}),
     r"4-bit layers \['model.layers.0.input_layernorm'\] are not linear layers of LlamaForCausalLM"),
    (None, lambda s: s["layers"].update({"model.layers.9.mlp.up_proj": s["layers"][Q]}),
     r"4-bit layers \['model.layers.9.mlp.up_proj'\] are not linear layers"),
    (None, lambda s: s.update(format_version=2), "of format version 2; this qlora_ext reads version 1"),
    (None, lambda s: s.update(quant_method="bitsandbytes"), r"is a quantized checkpoint \(bitsandbytes\)"),
])
def test_checkpoints_that_do_not_fit_give_clear_errors(saved, change_tensors, change_spec, message):
    _edit(saved, change_tensors, change_spec)
    with pytest.raises(ValueError, match=message):
        load_4bit(str(saved), dtype=torch.float32)


def test_from_pretrained_refuses_the_folder_instead_of_loading_random_layers(saved):
    # transformers skips a quant_method it does not know and would initialize the 4-bit layers at random: the
    # weights are named so that it finds none and refuses; the folder's README says how to load it
    from transformers import AutoModelForCausalLM
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(saved))
    assert "qlora_ext.load_4bit(" in (saved / "README.md").read_text()


@cuda_only
def test_cuda_round_trip(dense_dirs, tmp_path):
    model = load_4bit(dense_dirs["untied"], dtype=torch.bfloat16, device="cuda", compute_dtype=torch.bfloat16)
    save_4bit(model, str(tmp_path / "q"))
    back = load_4bit(str(tmp_path / "q"), dtype=torch.bfloat16, device="cuda", compute_dtype=torch.bfloat16)
    assert back.model.layers[0].self_attn.q_proj.weight_codes.is_cuda
    _assert_same_state(back, model)
    # the same bits as quantizing on the CPU and saving there (CPU and CUDA quantize identically)
    cpu = load_4bit(str(tmp_path / "q"), dtype=torch.bfloat16)
    _assert_same_state(cpu.to("cuda"), back)
    ids = _ids().cuda()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
