"""Modules trained whole beside the adapters (prepare_model(modules_to_save=...), qlora_ext/modules_to_save.py),
checked against PEFT's modules_to_save both ways: the trained copy is what runs and what is exported, the original
is what adapters_disabled runs, merging keeps the trained copy (untied from tied embeddings), and misuse is
refused by name."""
import copy
import json
import pickle
import re
import warnings

import pytest
import torch

import qlora_ext
from qlora_ext.modules_to_save import ModuleToSave
from qlora_ext.peft_io import load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def tiny_llama(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_a_little(model, seed=1):
    """Random changes to every trainable tensor, as if trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def prepared(tied, modules_to_save, quant_type="none", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (the tied-weights warning, tested below)
        return qlora_ext.prepare_model(tiny_llama(tied), r=4, alpha=8.0, quant_type=quant_type,
                                       modules_to_save=modules_to_save, **kw).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_the_copy_trains_the_original_stays_and_disabling_gives_the_base(tied):
    base = tiny_llama(tied)
    if tied:
        with pytest.warns(UserWarning, match=r"modules_to_save: \['lm_head'\] share weights with "
                                             r"\['model.embed_tokens'\] \(tied embeddings\)"):
            model = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none",
                                            modules_to_save=["lm_head"]).eval()
    else:
        model = prepared(tied, ["lm_head"])
    head = model.lm_head
    assert isinstance(head, ModuleToSave) and head.weight is head.trained_module.weight   # attributes: the copy's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.trained_module.weight" in trainable and "lm_head.original_module.weight" not in trainable
    assert len(trainable) == 2 * 14 + 1
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)   # B = 0 and an exact copy
    train_a_little(model)
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)
    with qlora_ext.adapters_disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    assert head.enabled
    # gradients reach the copy (and the embeddings stay frozen, tied or not)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert head.trained_module.weight.grad is not None and model.model.embed_tokens.weight.grad is None


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("to_save", [["lm_head"], ["embed_tokens"], ["lm_head", "model.embed_tokens"]])
def test_merged_model_keeps_the_trained_copies_and_reloads_untied(tmp_path, tied, to_save):
    model = prepared(tied, to_save)
    train_a_little(model)
    want = logits(model)
    merged = qlora_ext.merge_and_unload(model)
    assert not any(isinstance(m, ModuleToSave) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)
    assert merged.config.tie_word_embeddings is False   # a copy trained on its own: untied (or never tied)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant_type", ["none", "nf4"])
def test_peft_loads_what_we_save_and_we_load_what_peft_saves(tmp_path, tied, quant_type):
    to_save = ["lm_head", "embed_tokens"]
    ours = prepared(tied, to_save, quant_type=quant_type)
    train_a_little(ours)
    save_peft_adapter(ours, str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    again = prepared(tied, to_save, quant_type=quant_type)
    load_peft_adapter(again, str(tmp_path / "ours"))
    torch.testing.assert_close(logits(again), logits(ours), rtol=0, atol=0)
    if quant_type == "none":   # PEFT computes ours from the same dense base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(tiny_llama(tied), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"],
                              task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(tiny_llama(tied), cfg)
        train_a_little(theirs, seed=5)
        theirs.save_pretrained(str(tmp_path / "peft"))
        mine = prepared(tied, ["lm_head"])
        load_peft_adapter(mine, str(tmp_path / "peft"))
        torch.testing.assert_close(logits(mine), logits(theirs.eval()), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=re.escape("modules_to_save=['lm_head'] (the folder holds ['lm_head'] "
                                                       "trained whole), but the model trains no module whole")):
            load_peft_adapter(prepared(tied, None), str(tmp_path / "peft"))
        with pytest.raises(ValueError, match="modules_to_save=\\['lm_head'\\] .*, but the model trains "
                                             "\\['lm_head', 'model.embed_tokens'\\] whole"):
            load_peft_adapter(prepared(tied, to_save), str(tmp_path / "peft"))


def test_misuse_is_refused_before_anything_changes():
    model = tiny_llama(False)
    with pytest.raises(ValueError, match=re.escape("modules_to_save ['lm_hed'] match no module")):
        qlora_ext.prepare_model(model, quant_type="none", modules_to_save=["lm_hed"])
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj is both a LoRA target"):
        qlora_ext.prepare_model(model, quant_type="none", modules_to_save=["down_proj"])
    with pytest.raises(ValueError, match="lm_head is both a LoRA target"):
        qlora_ext.prepare_model(model, quant_type="none", exclude=(), modules_to_save="lm_head")
    assert not any(isinstance(m, (ModuleToSave, qlora_ext.LoRALinear)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    qlora_ext.prepare_model(model, target_modules=["q_proj"], quant_type="none")
    with pytest.raises(ValueError, match="model.layers.0.self_attn holds LoRA adapters, quantized weights"):
        qlora_ext.prepare_model(model, target_modules=["up_proj"], quant_type="none", modules_to_save=["self_attn"])
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj is both a LoRA target .* \\(or inside one\\)"):
        qlora_ext.prepare_model(model, target_modules=["up_proj"], quant_type="none", modules_to_save=["mlp"])


def test_applying_prepare_model_again_keeps_the_copies_training_and_never_adapts_them():
    model = prepared(False, ["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qlora_ext.prepare_model(model, target_modules="all-linear", exclude=(), quant_type="none",
                                modules_to_save=["lm_head"])
    assert isinstance(model.lm_head, ModuleToSave)
    assert type(model.lm_head.trained_module) is torch.nn.Linear   # not wrapped in a LoRA adapter
    assert model.lm_head.trained_module.weight.requires_grad


def test_a_prepared_model_copies_and_pickles():
    model = prepared(True, ["lm_head"])
    train_a_little(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)
        assert other.lm_head.trained_module.weight.requires_grad


def test_exported_names_select_the_same_modules_in_peft(tmp_path):
    """PEFT 0.21 trains every module whose path ends with a modules_to_save name, by characters ("norm" is also
    "input_layernorm"): the names written select exactly the modules trained here, and a PEFT folder loads into a
    model that trains the modules its tensors hold whole (and is refused, naming them, by one that does not)."""
    base = tiny_llama(False)
    ours = prepared(False, ["norm", "layers.1.mlp"], target_modules=["q_proj"])
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, ModuleToSave)) == [
        "model.layers.1.mlp", "model.norm"]
    train_a_little(ours)
    save_peft_adapter(ours, str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["layers.1.mlp", "model.norm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    theirs.save_pretrained(str(tmp_path / "peft"))
    peft_whole = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if type(m).__name__ == "ModulesToSaveWrapper")
    # PEFT 0.21 trains every module whose path ends with "norm" by characters; the folder's tensors say which
    mine = prepared(False, peft_whole, target_modules=["q_proj"])
    load_peft_adapter(mine, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(mine), logits(theirs.eval()), rtol=1e-5, atol=1e-5)
    if peft_whole != ["model.norm"]:
        with pytest.raises(ValueError, match=re.escape(f"modules_to_save=['norm'] (the folder holds {peft_whole} "
                                                       "trained whole), but the model trains ['model.norm'] whole")):
            load_peft_adapter(prepared(False, ["norm"], target_modules=["q_proj"]), str(tmp_path / "peft"))


def assert_save_4bit_writes_the_base(model, folder, ids=IDS):
    """save_4bit of a prepared tied model writes what it computes with its adapters disabled, still tied."""
    with qlora_ext.adapters_disabled(model):
        want = logits(model, ids)
    qlora_ext.save_4bit(model, folder)
    with open(f"{folder}/config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is True
    again = qlora_ext.load_4bit(folder).eval()
    torch.testing.assert_close(logits(again, ids), want, rtol=0, atol=0)


def test_save_4bit_writes_the_originals_of_modules_trained_whole(tmp_path):
    model = prepared(True, ["lm_head"], quant_type="nf4")
    train_a_little(model)
    assert_save_4bit_writes_the_base(model, str(tmp_path / "q4"))


def test_a_module_holding_a_module_trained_whole_is_refused():
    model = prepared(False, ["layers.1.mlp.down_proj"], target_modules=["q_proj"])
    with pytest.raises(ValueError, match="model.layers.1.mlp holds LoRA adapters, quantized weights, trainable "
                                         "tokens or a module trained whole already"):
        qlora_ext.prepare_model(model, target_modules=["k_proj"], quant_type="none", modules_to_save=["mlp"])


def test_both_tied_modules_trained_whole_warn():
    with pytest.warns(UserWarning, match="share weights with .*lm_head.*model.embed_tokens"):
        qlora_ext.prepare_model(tiny_llama(True), quant_type="none", modules_to_save=["lm_head", "embed_tokens"])
