"""qlora_ext.load_4bit: a Hugging Face checkpoint read one tensor at a time, the chosen linear layers quantized as
they arrive. The model must be the one from_pretrained + prepare_model builds, bit for bit (safetensors shards and
.bin, tied embeddings, biases, a layer that cannot be quantized, a subset of targets), and bad checkpoints must
give clear errors. On CUDA the peak memory must stay below the dense model's."""
import json
import os
import shutil

import pytest
import torch

import qlora_ext
from qlora_ext.load_4bit import checkpoint_files, load_4bit, load_4bit_problem
from tests.conftest import cuda_only

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _save_tiny(path, safe=True, tie=True, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # attention biases (the quantized layers' biases arrive as separate tensors); intermediate 96: down_proj's
    # in_features is not a multiple of 64, so it stays dense; tied embeddings: lm_head shares the embedding
    cfg = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=tie)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(path, safe_serialization=safe, max_shard_size="40KB")
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("load4bit")
    return {"safetensors": _save_tiny(root / "st"), "bin": _save_tiny(root / "bin", safe=False),
            "untied": _save_tiny(root / "untied", tie=False)}


def _dense_then_prepare(path, dtype, device, **kw):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    with pytest.warns(UserWarning, match="kept dense"):
        return qlora_ext.prepare_model(model, r=4, **kw)


def _load_then_prepare(path, dtype, device, **kw):
    model = load_4bit(path, dtype=dtype, device=device, **kw)
    with pytest.warns(UserWarning, match="kept dense"):
        return qlora_ext.prepare_model(model, r=4, **kw)


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if "lora_A" in key:  # drawn at random by each prepare_model
            continue
        assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device, key
        assert torch.equal(sa[key], sb[key]), key
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        assert na == nb and type(ma) is type(mb), na
        if isinstance(ma, qlora_ext.Linear4bit):
            assert (ma.compute_dtype, ma.weight_dtype, ma.double_quant) == (mb.compute_dtype, mb.weight_dtype,
                                                                            mb.double_quant)
    ids = torch.randint(0, 160, (2, 9), device=next(a.parameters()).device)
    with torch.no_grad():
        assert torch.equal(a.eval()(ids).logits, b.eval()(ids).logits)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_model_as_loading_dense_and_quantizing(checkpoints, fmt, dtype):
    path = checkpoints[fmt]
    assert len(checkpoint_files(path)) > 1  # sharded: the index is read
    loaded = _load_then_prepare(path, dtype, "cpu")
    _assert_same_model(loaded, _dense_then_prepare(path, dtype, "cpu"))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.base, qlora_ext.Linear4bit)
    assert loaded.model.layers[0].self_attn.q_proj.base.bias is not None
    assert isinstance(loaded.model.layers[0].mlp.down_proj.base, torch.nn.Linear)  # 96 inputs: not quantized
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (fmt != "untied")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_other_settings_and_a_subset_of_targets(checkpoints):
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"], quant_type="fp4", double_quant=False,
              compute_dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM
    loaded = load_4bit(checkpoints["untied"], dtype=torch.bfloat16, **kw)
    kinds = {n.split(".")[-1]: type(m).__name__ for n, m in loaded.named_modules()
             if n.startswith("model.layers.0.")}
    assert kinds["q_proj"] == kinds["v_proj"] == "Linear4bit"
    assert kinds["k_proj"] == kinds["o_proj"] == kinds["gate_proj"] == kinds["up_proj"] == "Linear"
    assert kinds["down_proj"] == "Linear"  # a target, but in_features 96 is not a multiple of blocksize 64
    with pytest.warns(UserWarning, match="kept dense"):
        prepared = qlora_ext.prepare_model(loaded, r=4, **kw)
    dense = AutoModelForCausalLM.from_pretrained(checkpoints["untied"], dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="kept dense"):
        dense = qlora_ext.prepare_model(dense, r=4, **kw)
    _assert_same_model(prepared, dense)


def test_the_4bit_model_is_marked_quantized_for_transformers_flash_attention(checkpoints):
    loaded = load_4bit(checkpoints["untied"])
    assert loaded.config._is_quantized and not getattr(loaded, "is_quantized", False)


def test_bad_checkpoints_and_targets_give_clear_errors(checkpoints, tmp_path):
    path = checkpoints["safetensors"]
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no nn.Linear"):
        load_4bit(path, target_modules=["qkv"])
    with pytest.raises(ValueError, match="quant_type must be"):
        load_4bit(path, quant_type="nf5")
    # a quantized checkpoint
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    quantized_config = dict(config, quantization_config={"quant_method": "bitsandbytes"})
    (quantized / "config.json").write_text(json.dumps(quantized_config))
    assert "quantized checkpoint (bitsandbytes)" in load_4bit_problem(str(quantized))
    with pytest.raises(ValueError, match="is a quantized checkpoint"):
        load_4bit(str(quantized))
    # no weights
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    assert "holds no model.safetensors" in load_4bit_problem(str(empty))
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        load_4bit(str(empty))
    assert load_4bit_problem(path) is None
    # a tensor missing; tensors renamed (as transformers maps some models' checkpoints at load)
    from safetensors.torch import load_file, save_file
    tensors = {}
    for file in checkpoint_files(path):
        tensors.update(load_file(file))
    for name, match in (("missing", "lacks 1 tensor"), ("renamed", "names transformers maps at load")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        bad = {k.replace("input_layernorm", "ln_1") if name == "renamed" else k: v for k, v in tensors.items()
               if name == "renamed" or "layers.1.input_layernorm" not in k}
        save_file(bad, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            load_4bit(str(folder))


def test_save_pretrained_of_a_prepared_model_is_refused_with_what_to_do_instead(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(checkpoints["safetensors"], dtype=torch.float32)
    with pytest.warns(UserWarning, match="kept dense"):
        qlora_ext.prepare_model(model, r=4)
    model.save_pretrained(str(tmp_path / "prepared"))
    dense = AutoModelForCausalLM.from_pretrained(checkpoints["safetensors"], dtype=torch.float32)
    qlora_ext.prepare_model(dense, r=4, quant_type="none").save_pretrained(str(tmp_path / "dense"))
    load_4bit(checkpoints["safetensors"]).save_pretrained(str(tmp_path / "bare"))
    for folder in ("prepared", "dense", "bare"):
        with pytest.raises(ValueError, match="holds qlora_ext's own modules .* save the 4-bit base with "
                                             "qlora_ext.save_4bit and the adapters with save_peft_adapter"):
            load_4bit(str(tmp_path / folder))


def test_tensors_that_are_not_the_models_are_skipped_as_from_pretrained_skips_them(checkpoints, tmp_path):
    # e.g. older Llama conversions' rotary inv_freq (a non-persistent buffer now) and a stray tensor
    from safetensors.torch import load_file, save_file
    path = checkpoints["safetensors"]
    tensors = {}
    for file in checkpoint_files(path):
        tensors.update(load_file(file))
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8, dtype=torch.bfloat16)
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    folder = tmp_path / "extra"
    shutil.copytree(path, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.json"))
    shutil.copy(os.path.join(path, "config.json"), folder / "config.json")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.warns(UserWarning, match="2 tensor.s. of .* are not the model's and were not loaded"):
        loaded = _load_then_prepare(str(folder), torch.float32, "cpu")
    _assert_same_model(loaded, _dense_then_prepare(str(folder), torch.float32, "cpu"))


def test_a_checkpoint_of_the_base_model_without_its_prefix(checkpoints, tmp_path):
    # LlamaModel.save_pretrained writes "layers.0...." where LlamaForCausalLM has "model.layers.0....": from_pretrained
    # adds the base model's prefix, and so does load_4bit (the tied lm_head takes the embedding)
    from transformers import LlamaModel
    path = tmp_path / "base"
    LlamaModel.from_pretrained(checkpoints["safetensors"]).save_pretrained(path)
    with open(os.path.join(checkpoints["safetensors"], "config.json")) as f:
        config = json.load(f)
    (path / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
    from safetensors.torch import load_file
    assert not any(k.startswith("model.") for file in checkpoint_files(str(path)) for k in load_file(file))
    _assert_same_model(_load_then_prepare(str(path), torch.float32, "cpu"),
                       _dense_then_prepare(checkpoints["safetensors"], torch.float32, "cpu"))


def test_a_tied_lm_head_as_a_target_is_quantized_by_prepare_model(checkpoints):
    # lm_head shares the embedding's weight: load_4bit loads it tied, prepare_model quantizes a copy of it,
    # as after from_pretrained
    kw = dict(target_modules=["q_proj", "lm_head"], exclude=())
    loaded = qlora_ext.prepare_model(load_4bit(checkpoints["safetensors"], dtype=torch.float32, **kw), r=4, **kw)
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(checkpoints["safetensors"], dtype=torch.float32)
    _assert_same_model(loaded, qlora_ext.prepare_model(dense, r=4, **kw))
    assert isinstance(loaded.lm_head.base, qlora_ext.Linear4bit)


def test_modules_kept_in_float32_are_refused(checkpoints, monkeypatch):
    from transformers import LlamaForCausalLM
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["mlp.gate_proj"], raising=False)
    with pytest.raises(ValueError, match=r"keeps \['mlp.gate_proj'\] in float32 when loaded in torch.bfloat16"):
        load_4bit(checkpoints["safetensors"], dtype=torch.bfloat16)
    load_4bit(checkpoints["safetensors"], dtype=torch.float32)  # the strict list applies to 16-bit loads only


@cuda_only
def test_cuda_same_model_and_peak_below_the_dense_model(tmp_path):
    # LLaMA-shaped layers big enough that the dense model dwarfs one layer: 4 layers of hidden 1024, ffn 2816
    path = _save_tiny(tmp_path / "m", vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, attention_bias=False, tie=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_4bit(path, dtype=torch.bfloat16, device="cuda", compute_dtype=torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - before
    # the dense bf16 model: the parameters left dense plus the quantized layers' weights at 2 bytes each
    dense_bytes = 2 * sum(p.numel() for p in loaded.parameters())
    dense_bytes += sum(2 * m.in_features * m.out_features for m in loaded.modules()
                       if isinstance(m, qlora_ext.Linear4bit))
    assert peak < 0.5 * dense_bytes, (peak, dense_bytes)
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    a = qlora_ext.prepare_model(loaded, r=4, compute_dtype=torch.bfloat16)
    b = qlora_ext.prepare_model(dense, r=4, compute_dtype=torch.bfloat16)
    _assert_same_model(a, b)


def test_safetensors_are_read_in_spans_of_bounded_size(tmp_path, monkeypatch):
    # every tensor once, in file order, each opening reading at most _SPAN_BYTES unless one tensor is larger
    from safetensors.torch import save_file
    import importlib
    module = importlib.import_module("qlora_ext.load_4bit")   # (the package's load_4bit is the function)
    tensors = {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate([10, 300, 5, 1000, 7, 7, 7, 260])}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(module, "_SPAN_BYTES", 1200)   # bytes: 300 float32 values
    spans = module._safetensors_spans(str(tmp_path / "x.safetensors"))
    assert sorted(k for span in spans for k in span) == sorted(tensors)
    for span in spans:
        assert len(span) == 1 or sum(tensors[k].numel() * 4 for k in span) <= 1200
    assert len(spans) < len(tensors)   # small neighbours share an opening
    read = dict(module._tensors([str(tmp_path / "x.safetensors")]))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
