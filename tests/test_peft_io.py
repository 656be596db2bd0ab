"""Adapters in PEFT's format (qlora_ext/peft_io.py), checked against PEFT itself: a folder we write loads with
peft.PeftModel.from_pretrained and computes what our model computes; a folder PEFT writes loads into our model
and computes what PEFT's model computes; what would compute something else is refused."""
import copy
import json
import re
import warnings

import pytest
import torch

import qlora_ext
from qlora_ext.peft_io import load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qlora_ext.LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def peft_model_with_random_adapters(base, config, folder: str):
    """PEFT's model of (a copy of) base with config, its adapters random (as if trained), saved to folder."""
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(folder)
    return theirs


def trained_change_merged(base, ours):
    """A copy of the dense base with each adapted layer's W + s (B A - B0 A0): what training changed, from LoftQ's
    start."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, a in ours.named_modules():
            if isinstance(a, qlora_ext.LoRALinear):
                merged.get_submodule(name).weight += a.scaling * (a.lora_B @ a.lora_A - a.lora_B_init @ a.lora_A_init)
    return merged


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "v_proj"], ["model.layers.1.mlp.down_proj"]])
def test_peft_loads_what_we_save_and_computes_the_same(tmp_path, targets):
    base = tiny_llama()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), target_modules=targets, r=4, alpha=8.0, dropout=0.1,
                                   quant_type="none").eval()
    randomize_adapters(ours)
    folder = save_peft_adapter(ours, str(tmp_path / "adapter"), base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert config["target_modules"] == sorted(targets)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    want = logits(ours, IDS)
    assert not torch.allclose(want, logits(base, IDS), atol=1e-3)  # the adapters matter
    torch.testing.assert_close(logits(theirs, IDS), want, rtol=1e-5, atol=1e-5)


def test_we_load_what_peft_saves_and_compute_the_same(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    theirs = peft_model_with_random_adapters(base, cfg, str(tmp_path / "peft"))
    ours = qlora_ext.prepare_model(copy.deepcopy(base), target_modules=TARGETS, r=8, alpha=16.0,
                                   quant_type="none").eval()
    load_peft_adapter(ours, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(ours, IDS), logits(theirs.eval(), IDS), rtol=1e-5, atol=1e-5)
    # and back: the tensors we write are the ones we read
    save_peft_adapter(ours, str(tmp_path / "again"))
    again = qlora_ext.prepare_model(copy.deepcopy(base), target_modules=TARGETS, r=8, alpha=16.0, quant_type="none")
    load_peft_adapter(again, str(tmp_path / "again"))
    for (n, p), (_, q) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("quant_type", ["none", "nf4"])
def test_rslora_adapters_go_both_ways_with_peft(tmp_path, quant_type):
    """use_rslora scales by alpha / sqrt(r): PEFT computes what we compute, both ways, and a model prepared
    without it refuses such an adapter (the same tensors would compute another model)."""
    base = tiny_llama()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type=quant_type, use_rslora=True)
    assert {m.scaling for m in ours.modules() if isinstance(m, qlora_ext.LoRALinear)} == {4.0}   # 8 / sqrt(4)
    randomize_adapters(ours.eval())
    save_peft_adapter(ours, str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_rslora"] is True
    if quant_type == "none":
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(logits(theirs, IDS), logits(ours, IDS), rtol=1e-5, atol=1e-5)
        plain = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none")
        randomize_adapters(plain)
        assert not torch.allclose(logits(plain.eval(), IDS), logits(ours, IDS), atol=1e-3)   # the scaling matters
    again = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type=quant_type, use_rslora=True)
    load_peft_adapter(again, str(tmp_path / "ours"))
    torch.testing.assert_close(logits(again.eval(), IDS), logits(ours, IDS), rtol=0, atol=0)
    plain = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type=quant_type)
    with pytest.raises(ValueError, match="use_rslora=True, use_dora=False for layer .*, but the model's layer has .*"
                                         "use_rslora=False"):
        load_peft_adapter(plain, str(tmp_path / "ours"))

    cfg = peft.LoraConfig(r=16, lora_alpha=8, target_modules=TARGETS, use_rslora=True, task_type="CAUSAL_LM")
    theirs = peft_model_with_random_adapters(base, cfg, str(tmp_path / "peft"))
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=16, alpha=8.0, quant_type="none", use_rslora=True)
    load_peft_adapter(ours, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(ours.eval(), IDS), logits(theirs.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_a_loftq_rslora_model_exports_the_same_scaling_at_rank_2r(tmp_path):
    base = tiny_llama()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, init_lora_weights="loftq", use_rslora=True)
    randomize_adapters(ours, seed=7)
    save_peft_adapter(ours, str(tmp_path / "trained"))
    config = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_rslora"] is True
    assert abs(config["lora_alpha"] / 8 ** 0.5 - 8.0 / 4 ** 0.5) < 1e-12
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained")).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(trained_change_merged(base, ours), IDS), rtol=1e-5,
                               atol=1e-5)


def test_a_4bit_model_round_trips_its_adapters(tmp_path):
    model = qlora_ext.prepare_model(tiny_llama(), r=4, alpha=8.0, quant_type="nf4")
    randomize_adapters(model)
    save_peft_adapter(model, str(tmp_path / "a"))
    other = qlora_ext.prepare_model(tiny_llama(), r=4, alpha=8.0, quant_type="nf4")
    load_peft_adapter(other, str(tmp_path / "a"))
    torch.testing.assert_close(logits(other.eval(), IDS), logits(model.eval(), IDS), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json",
                                                                  "adapter_model.safetensors"]  # no temporaries


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "use_dora=True for layer model.layers.0.self_attn.q_proj, but the model's layer has r=4, "
                         "alpha=8.0, use_rslora=False, use_dora=False"),
    ({"use_rslora": True}, "use_rslora=True, use_dora=False for layer model.layers.0.self_attn.q_proj, but the "
                           "model's layer has r=4, alpha=8.0, use_rslora=False"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"rank_pattern": {"v_proj": 8}}, "the adapter has r=8, lora_alpha=8.0, use_rslora=False, use_dora=False for "
                                      "layer model.layers.0.self_attn.v_proj, but the model's layer has r=4"),
    ({"alpha_pattern": {"layers\\.1\\..*": 2}}, "the adapter has r=4, lora_alpha=2.0, use_rslora=False, "
                                                  "use_dora=False for layer model.layers.1.self_attn.q_proj"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer, got 0"),
    ({"alpha_pattern": {"(q_proj": 2}}, "alpha_pattern: '(q_proj' is not a regular expression"),
    ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
    ({"r": 8}, "the adapter has r=8, lora_alpha=8.0, use_rslora=False, use_dora=False for layer "
               "model.layers.0.self_attn.q_proj, but the model's layer has r=4"),
    ({"lora_bias": True}, "lora_bias=True is not supported"),
    ({"ensure_weight_tying": True}, "ensure_weight_tying=True is not supported"),
    ({"layer_replication": [[0, 2]]}, "layer_replication=[[0, 2]] is not supported"),
    ({"some_future_option": "x"}, "some_future_option='x' is not supported"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base weights"),
])
def test_what_would_compute_something_else_is_refused(tmp_path, changes, message):
    model = qlora_ext.prepare_model(tiny_llama(), r=4, alpha=8.0, quant_type="none")
    save_peft_adapter(model, str(tmp_path / "a"))
    _edit_config(tmp_path / "a", **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft_adapter(model, str(tmp_path / "a"))


def test_other_layers_or_missing_files_are_refused(tmp_path):
    small = qlora_ext.prepare_model(tiny_llama(), target_modules=["q_proj"], r=4, alpha=8.0, quant_type="none")
    save_peft_adapter(small, str(tmp_path / "a"))
    full = qlora_ext.prepare_model(tiny_llama(), r=4, alpha=8.0, quant_type="none")
    with pytest.raises(ValueError, match="does not fit the model: 24 missing tensor"):
        load_peft_adapter(full, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="adapter_config.json does not exist"):
        load_peft_adapter(full, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        save_peft_adapter(tiny_llama(), str(tmp_path / "b"))


def test_mixed_dropouts_cannot_be_written(tmp_path):
    model = qlora_ext.prepare_model(tiny_llama(), target_modules=["q_proj"], r=4, alpha=8.0, quant_type="none")
    qlora_ext.prepare_model(model, target_modules=["v_proj"], r=4, alpha=8.0, dropout=0.1, quant_type="none")
    with pytest.raises(ValueError, match="one lora_dropout for all layers"):
        save_peft_adapter(model, str(tmp_path / "a"))


PATTERNS = dict(rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                alpha_pattern={"^model\\.layers\\.0\\..*": 4.0, "up_proj": 12.0})


def _ranks_and_alphas(model):
    return {n: (m.r, m.alpha) for n, m in model.named_modules() if isinstance(m, qlora_ext.LoRALinear)}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_go_both_ways_with_peft(tmp_path, use_rslora):
    """PEFT's rank_pattern / alpha_pattern: PEFT's model with patterns loads here (prepared with the same patterns)
    and computes the same; ours is written with patterns PEFT resolves to the same layers, and computes the same
    there; a model prepared without the patterns refuses the folder."""
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=use_rslora, task_type="CAUSAL_LM",
                          **PATTERNS)
    theirs = peft_model_with_random_adapters(base, cfg, str(tmp_path / "peft")).eval()
    peft_ranks = {n.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
                  for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none", use_rslora=use_rslora,
                                   **PATTERNS).eval()
    assert _ranks_and_alphas(ours) == peft_ranks
    assert len(set(peft_ranks.values())) == 6   # (4, 8), (2, 4), (2, 8), (4, 4), (6, 8), (4, 12): first key wins
    load_peft_adapter(ours, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=1e-5, atol=1e-5)

    save_peft_adapter(ours, str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(back, IDS), logits(ours, IDS), rtol=1e-5, atol=1e-5)
    again = qlora_ext.prepare_model(copy.deepcopy(base), r=config["r"], alpha=config["lora_alpha"],
                                    quant_type="none", use_rslora=use_rslora, rank_pattern=config["rank_pattern"],
                                    alpha_pattern=config["alpha_pattern"])
    assert _ranks_and_alphas(again) == _ranks_and_alphas(ours)
    plain = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none", use_rslora=use_rslora)
    with pytest.raises(ValueError, match="the adapter has r=4, lora_alpha=4.0, .* for layer "
                                         "model.layers.0.self_attn.q_proj, but the model's layer has r=4, alpha=8.0"):
        load_peft_adapter(plain, str(tmp_path / "peft"))


def test_per_layer_values_are_written_as_patterns_whose_order_cannot_matter(tmp_path):
    """Layers of one name that agree get one pattern for the name; the others each the shortest ending of their
    path that names them alone; the commonest value is the default. PEFT computes the same whatever the patterns'
    order (PEFT 0.21 saves them sorted)."""
    base = tiny_llama()
    model = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none",
                                    rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                                    alpha_pattern={"k_proj": 16, "v_proj": 16, "o_proj": 16, "gate_proj": 16,
                                                   "layers\\.0\\.mlp\\.up_proj": 3})
    randomize_adapters(model.eval())
    save_peft_adapter(model, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16.0)   # alpha 16 on 4 of the 7 layer names
    assert config["rank_pattern"] == {"q_proj": 8, "layers\\.1\\.mlp\\.down_proj": 2}
    assert config["alpha_pattern"] == {"q_proj": 8.0, "layers\\.0\\.mlp\\.up_proj": 3.0,
                                       "layers\\.1\\.mlp\\.up_proj": 8.0, "down_proj": 8.0}
    for order in (sorted, lambda keys: sorted(keys, reverse=True)):   # (PEFT 0.21 saves them sorted)
        _edit_config(tmp_path / "a", **{k: {key: config[k][key] for key in order(config[k])}
                                        for k in ("rank_pattern", "alpha_pattern")})
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
        torch.testing.assert_close(logits(theirs, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


def test_patterns_match_the_paths_peft_sees_on_a_compiled_model(tmp_path):
    base = tiny_llama()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, quant_type="none",
                                   rank_pattern={"model.layers.1.mlp.down_proj": 2})
    randomize_adapters(ours)
    save_peft_adapter(ours, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    compiled = torch.compile(copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "select none of the layers"
        qlora_ext.prepare_model(compiled, r=config["r"], alpha=config["lora_alpha"], quant_type="none",
                                rank_pattern=config["rank_pattern"], alpha_pattern={"^model\\.layers\\.0\\..*": 2})
    assert compiled._orig_mod.model.layers[1].mlp.down_proj.r == 2
    other = torch.compile(copy.deepcopy(base))   # full paths in target_modules, as PEFT writes them, match too
    qlora_ext.prepare_model(other, target_modules=["model.layers.1.mlp.down_proj"], quant_type="none")
    assert [n for n, m in other.named_modules() if isinstance(m, qlora_ext.LoRALinear)] == [
        "_orig_mod.model.layers.1.mlp.down_proj"]
    assert compiled._orig_mod.model.layers[0].mlp.down_proj.alpha == 2
    with pytest.raises(ValueError, match="lora_alpha=8.0, .* for layer model.layers.0.self_attn.q_proj, but the "
                                         "model's layer has r=4, alpha=2"):
        load_peft_adapter(compiled, str(tmp_path / "a"))


def test_a_loftq_model_with_patterns_exports_each_layers_scaling_at_rank_2r(tmp_path):
    base = tiny_llama()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, init_lora_weights="loftq",
                                   rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0})
    assert {n: m.lora_A.shape[0] for n, m in ours.named_modules()
            if isinstance(m, qlora_ext.LoRALinear) and n.endswith("down_proj")} == {
        "model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 2}
    randomize_adapters(ours, seed=7)
    save_peft_adapter(ours, str(tmp_path / "trained"))
    config = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        8, 16.0, {"down_proj": 4}, {"q_proj": 6.0})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained")).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(trained_change_merged(base, ours), IDS), rtol=1e-5,
                               atol=1e-5)


def test_a_loftq_model_exports_what_training_changed_for_the_dense_weights(tmp_path):
    """LoftQ's start stands in for the quantization error of the 4-bit base: for PEFT (dense weights) the adapter
    is the change s (B A - B0 A0), rank 2r. Right after the start that change is zero (PEFT's model is the dense
    one); after training it is the dense model with each layer's W + s (B A - B0 A0)."""
    base = tiny_llama()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), r=4, alpha=8.0, init_lora_weights="loftq")
    save_peft_adapter(ours, str(tmp_path / "start"))
    config = json.loads((tmp_path / "start" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "start")).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(base, IDS), rtol=1e-5, atol=1e-5)

    randomize_adapters(ours, seed=7)  # as if trained
    save_peft_adapter(ours, str(tmp_path / "trained"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained")).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(trained_change_merged(base, ours), IDS), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="prepared with init_lora_weights='loftq'"):
        load_peft_adapter(ours, str(tmp_path / "trained"))


class Classifier(torch.nn.Module):
    """Not a causal LM, with a non-Linear module named like a Linear target ("gate")."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.ModuleDict({"gate": torch.nn.Linear(64, 64), "proj": torch.nn.Linear(64, 64)})
        self.router = torch.nn.ModuleDict({"gate": torch.nn.Softmax(dim=-1)})

    def forward(self, x):
        return self.router["gate"](self.body["proj"](torch.relu(self.body["gate"](x))))


def test_other_models_wrappers_and_names_that_peft_would_misread(tmp_path):
    torch.manual_seed(0)
    base = Classifier().eval()
    ours = qlora_ext.prepare_model(copy.deepcopy(base), target_modules=["body.gate", "body.proj"], r=4, alpha=8.0,
                                   quant_type="none").eval()
    randomize_adapters(ours)
    # through torch.compile's wrapper: the names are the module's own
    save_peft_adapter(torch.compile(ours), str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] is None  # not a causal LM: PEFT's plain PeftModel
    assert config["target_modules"] == ["body.gate", "body.proj"]  # "gate" alone would also hit the Softmax
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)
    again = qlora_ext.prepare_model(copy.deepcopy(base), target_modules=["body.gate", "body.proj"], r=4, alpha=8.0,
                                    quant_type="none")
    load_peft_adapter(torch.nn.DataParallel(again), str(tmp_path / "a"))
    assert torch.equal(again.body["gate"].lora_B, ours.body["gate"].lora_B)


def test_the_adapter_names_the_folder_its_base_was_loaded_from(tmp_path):
    """As PEFT writes base_model_name_or_path: AutoPeftModelForCausalLM then loads base and adapter from the adapter
    folder alone (offline: no hub lookup of a missing name)."""
    tiny_llama().save_pretrained(tmp_path / "base")
    ours = qlora_ext.prepare_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), r=4,
                                   quant_type="none").eval()
    randomize_adapters(ours)
    folder = save_peft_adapter(ours, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(ours, IDS), rtol=1e-5, atol=1e-5)
    for given, written in (("org/model", "org/model"), (None, None)):
        saved = save_peft_adapter(ours, str(tmp_path / "named"), base_model_name_or_path=given)
        assert json.loads(open(saved + "/adapter_config.json").read())["base_model_name_or_path"] == written
    # a model read from a save_4bit folder names the dense model that folder was made from (PEFT loads that)
    qlora_ext.save_4bit(qlora_ext.load_4bit(str(tmp_path / "base")), str(tmp_path / "base4"))
    four = qlora_ext.prepare_model(qlora_ext.load_4bit(str(tmp_path / "base4")), r=4)
    config = json.loads(open(save_peft_adapter(four, str(tmp_path / "four")) + "/adapter_config.json").read())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
