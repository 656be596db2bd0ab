"""Per-layer rank and alpha (qlora_ext/lora_patterns.py, prepare_model's rank_pattern / alpha_pattern): the
matching rule is PEFT's (checked against peft.utils.other.get_pattern_key where PEFT is installed), the patterns
written for a model's layers give back every layer's value, and bad patterns are refused by name."""
import random
import re
import warnings

import pytest
import torch

import qlora_ext
from qlora_ext.lora_patterns import as_patterns, check_patterns, matching_key, unmatched, value_for

NAMES = [f"model.layers.{i}.{part}" for i in range(12) for part in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")] + [
    # the same paths under a longer prefix (a vision tower), and a name that is another's suffix
    "vision.model.layers.1.mlp.up_proj", "vision.model.layers.11.mlp.up_proj", "proj", "head.proj"]

PATTERNS = ["q_proj", "model.layers.1.mlp.up_proj", "^model.layers.1.mlp.up_proj", "layers\\.1\\..*", "proj",
            "layers.1", "mlp\\.(up|down)_proj", ".*", "^vision\\..*", "model\\.layers\\.11\\.mlp\\.up_proj"]


def test_the_matching_rule_is_peft_s():
    other = pytest.importorskip("peft.utils.other")
    rng = random.Random(0)
    names = NAMES + ["heads.a+b", "heads.aab"]   # a path with regex characters: PEFT's exact-name fallback
    for _ in range(200):
        keys = rng.sample(PATTERNS + ["heads.a+b"], rng.randint(1, 4))
        patterns = {k: i + 1 for i, k in enumerate(keys)}
        for name in names:
            assert value_for(patterns, name, 0) == patterns.get(other.get_pattern_key(keys, name), 0), (keys, name)


def test_matching_selects_at_a_name_boundary_and_the_first_key_wins():
    assert matching_key(["proj"], "model.layers.0.self_attn.q_proj") is None   # "q_proj" is not "proj"
    assert matching_key(["proj"], "head.proj") == "proj"
    assert matching_key(["^model\\.layers\\.1\\.mlp\\.up_proj"], "vision.model.layers.1.mlp.up_proj") is None
    assert matching_key(["model\\.layers\\.1\\.mlp\\.up_proj"], "vision.model.layers.1.mlp.up_proj") is not None
    assert value_for({"up_proj": 2, "layers\\.1\\..*": 3}, "model.layers.1.mlp.up_proj", 7) == 2
    assert value_for({"layers\\.1\\..*": 3, "up_proj": 2}, "model.layers.1.mlp.up_proj", 7) == 3
    assert value_for({"layers\\.1\\..*": 3}, "model.layers.11.mlp.up_proj", 7) == 7
    assert value_for({"heads.a+b": 3}, "heads.a+b", 7) == 3   # no regex match, but the path itself is a key
    assert unmatched({"q_proj": 2, "qkv": 3, "layers\\.99\\..*": 4}, NAMES) == ["qkv", "layers\\.99\\..*"]


def _old_peft_value(patterns, name, default):
    """PEFT before 0.15: the first key with re.match(f".*\\.{key}$", name)."""
    for key in patterns:
        if re.match(rf".*\.{key}$", name):
            return patterns[key]
    return default


@pytest.mark.parametrize("seed", range(8))
def test_the_patterns_written_for_any_values_give_them_back_in_any_order(seed):
    rng = random.Random(seed)
    values = {n: 8 for n in NAMES}
    for leaf in rng.sample(["q_proj", "v_proj", "up_proj", "down_proj", "proj"], 2):   # whole layer names
        for n in NAMES:
            if n.split(".")[-1] == leaf:
                values[n] = 16
    for n in rng.sample(NAMES, rng.randint(0, 12)):   # and single layers, the nested twins included
        values[n] = rng.choice([2, 4, 32])
    default, patterns = as_patterns(values, NAMES + ["model", "model.layers", "model.layers.0"])
    assert default == 8
    for order in range(3):   # PEFT saves them sorted: the order must not matter
        keys = list(patterns)
        rng.shuffle(keys)
        shuffled = {k: patterns[k] for k in keys}
        assert {n: value_for(shuffled, n, default) for n in NAMES} == values
        for n in NAMES:   # PEFT 0.14 reads them the same, but for a whole path (it wants a "." before a key)
            key = matching_key(shuffled, n)
            if key is None or not (key.startswith("^") or key == re.escape(n)):
                assert _old_peft_value(shuffled, n, default) == values[n], (n, patterns)


def test_one_pattern_per_agreeing_name_else_the_layer_s_own_ending():
    values = {"a.q_proj": 4, "b.q_proj": 4, "a.v_proj": 8, "b.v_proj": 8, "c.v_proj": 8, "a.o_proj": 2,
              "b.o_proj": 8}
    assert as_patterns(values, values) == (8, {"q_proj": 4, "a\\.o_proj": 2})
    assert as_patterns({"a.q": 1.5, "a.k": 2.0}, []) == (1.5, {"k": 2.0})   # a tie: the first value seen
    layers = {f"model.layers.{i}.mlp.down_proj": 4 for i in range(12)}
    layers["model.layers.1.mlp.down_proj"] = 2   # "1.mlp.down_proj" would do, but an index does not start it
    assert as_patterns(layers, layers)[1] == {"layers\\.1\\.mlp\\.down_proj": 2}
    nested = {"model.layers.1.mlp.up_proj": 2, "vision.model.layers.1.mlp.up_proj": 4, "x.up_proj": 4}
    assert as_patterns(nested, nested)[1] == {"^model\\.layers\\.1\\.mlp\\.up_proj": 2}


@pytest.mark.parametrize("patterns,integer,message", [
    ([("q_proj", 8)], True, "rank_pattern must be a mapping"),
    ({"": 8}, True, "keys must be non-empty strings"),
    ({3: 8}, True, "keys must be non-empty strings"),
    ({"q_proj[": 8}, True, "'q_proj[' is not a regular expression"),
    ({"q_proj": 0}, True, "rank_pattern['q_proj'] must be a positive integer, got 0"),
    ({"q_proj": 8.0}, True, "must be a positive integer, got 8.0"),
    ({"q_proj": True}, True, "must be a positive integer, got True"),
    ({"q_proj": "8"}, True, "must be a positive integer, got '8'"),
    ({"q_proj": -1.0}, False, "rank_pattern['q_proj'] must be a positive finite number, got -1.0"),
    ({"q_proj": float("nan")}, False, "must be a positive finite number, got nan"),
    ({"q_proj": float("inf")}, False, "must be a positive finite number, got inf"),
])
def test_bad_patterns_are_refused_by_name(patterns, integer, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_patterns(patterns, "rank_pattern", integer=integer)


def test_checked_patterns_keep_their_order_and_take_numpy_numbers():
    np = pytest.importorskip("numpy")
    assert list(check_patterns({"b": np.int64(2), "a": 3}, "rank_pattern", integer=True).items()) == [("b", 2),
                                                                                                     ("a", 3)]
    assert check_patterns(None, "alpha_pattern", integer=False) == {}


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 32),
                                                               "down_proj": torch.nn.Linear(128, 64)})
                                          for _ in range(3))
        self.lm_head = torch.nn.Linear(64, 10)


def _layer_values(model):
    return {n: (m.r, m.alpha, m.lora_A.shape[0], m.lora_B.shape[1], m.scaling)
            for n, m in model.named_modules() if isinstance(m, qlora_ext.LoRALinear)}


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_prepare_model_gives_each_layer_its_rank_and_alpha(quant_type):
    torch.manual_seed(0)
    model = qlora_ext.prepare_model(Blocks(), r=4, alpha=8.0, quant_type=quant_type,
                                    rank_pattern={"layers\\.2\\..*": 2, "down_proj": 16},
                                    alpha_pattern={"^layers\\.0\\.q_proj": 1.0})
    assert _layer_values(model) == {
        "layers.0.q_proj": (4, 1.0, 4, 4, 0.25), "layers.0.down_proj": (16, 8.0, 16, 16, 0.5),
        "layers.1.q_proj": (4, 8.0, 4, 4, 2.0), "layers.1.down_proj": (16, 8.0, 16, 16, 0.5),
        "layers.2.q_proj": (2, 8.0, 2, 2, 4.0), "layers.2.down_proj": (2, 8.0, 2, 2, 4.0)}
    x = torch.randn(3, 64)
    y = model.layers[0]["q_proj"](x)   # B = 0: the base's output, whatever the rank
    torch.testing.assert_close(y, model.layers[0]["q_proj"].base(x))


def test_a_pattern_that_selects_no_adapted_layer_is_warned_about():
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['qkv'\] and alpha_pattern keys \['lm_head'\] select "
                                         r"none of the 6 layer\(s\) adapted here"):
        qlora_ext.prepare_model(Blocks(), r=4, quant_type="none", rank_pattern={"qkv": 2, "q_proj": 8},
                                alpha_pattern={"lm_head": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qlora_ext.prepare_model(Blocks(), r=4, quant_type="none", rank_pattern={"q_proj": 8})


def test_loftq_starts_each_layer_at_its_own_rank():
    torch.manual_seed(0)
    model = qlora_ext.prepare_model(Blocks(), r=4, alpha=8.0, init_lora_weights="loftq",
                                    rank_pattern={"down_proj": 8}, alpha_pattern={"q_proj": 2.0})
    for name, m in model.named_modules():
        if isinstance(m, qlora_ext.LoRALinear):
            want = 8 if name.endswith("down_proj") else 4
            assert m.lora_A_init.shape[0] == want and m.lora_B.shape[1] == want, name
            assert m.scaling == (1.0 if name.endswith("down_proj") else 0.5)


def test_bad_patterns_leave_the_model_as_it_was():
    model = Blocks()
    with pytest.raises(ValueError, match=re.escape("alpha_pattern['q_proj'] must be a positive finite number")):
        qlora_ext.prepare_model(model, r=4, quant_type="none", alpha_pattern={"q_proj": 0})
    assert not any(isinstance(m, qlora_ext.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
