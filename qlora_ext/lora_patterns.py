"""Per-layer rank and alpha, as PEFT's rank_pattern / alpha_pattern give them: a mapping from a regular expression
to a value, where a layer takes the value of the first key (in the mapping's order) that matches the end of its
module path at a name boundary (`re.match(rf"(.*\\.)?({key})$", name)`, PEFT's get_pattern_key), and the default
otherwise. So {"q_proj": 64} sets every q_proj, {"model.layers.0.mlp.down_proj": 8} one layer, and
{"layers\\.(0|1)\\..*": 4} a range of blocks.

prepare_model resolves the patterns it is given; qlora_ext.peft_io writes a model's per-layer values back as the
shortest patterns that give them (one per layer name where all layers of that name agree, else one per layer)."""
from __future__ import annotations

import collections
import numbers
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple


def check_patterns(patterns: Optional[Mapping], what: str, integer: bool) -> Dict[str, float]:
    """The patterns as a plain dict (empty for None), after checking that each key is a regular expression and
    each value a positive number (an int when `integer`); ValueError naming `what` otherwise."""
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise ValueError(f"{what} must be a mapping from a module-name pattern to a value, got "
                         f"{type(patterns).__name__}")
    out = {}
    for key, value in patterns.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: keys must be non-empty strings (module-name patterns), got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{what}: {key!r} is not a regular expression ({e})") from e
        wanted = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted) or not value > 0:
            raise ValueError(f"{what}[{key!r}] must be a positive {'integer' if integer else 'number'}, got "
                             f"{value!r}")
        out[key] = int(value) if integer else float(value)
    return out


def matching_key(patterns: Iterable[str], name: str) -> Optional[str]:
    """The first pattern that selects the module path `name` (PEFT's rule, above), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def value_for(patterns: Mapping[str, float], name: str, default):
    """The value the patterns give the layer at `name`, or `default` when none selects it."""
    key = matching_key(patterns, name)
    return default if key is None else patterns[key]


def unmatched(patterns: Mapping[str, float], names: Iterable[str]) -> list:
    """The patterns that select none of `names` (a typo, or a layer the targets leave out)."""
    names = list(names)
    return [key for key in patterns if not any(re.match(rf"(.*\.)?({key})$", n) for n in names)]


def as_patterns(values: Mapping[str, float]) -> Tuple[float, Dict[str, float]]:
    """A default and patterns that give each layer (name -> value) its value under PEFT's rule: the default is
    the commonest value, each layer name (its last component) whose commonest value is another gets one pattern,
    and the layers that differ from their name's commonest value one pattern each, anchored and escaped so that it
    selects that layer only, and placed first (the first matching key wins). Ties go to the default, then to the
    value seen first."""
    default = _commonest(list(values.values()))
    by_leaf = collections.defaultdict(dict)
    for name, value in values.items():
        by_leaf[name.split(".")[-1]][name] = value
    layers, leaves = {}, {}
    for leaf, named in by_leaf.items():
        usual = _commonest(list(named.values()), prefer=default)
        if usual != default:
            leaves[re.escape(leaf)] = usual
        # "^": the whole path (a nested model may hold the same path under a longer prefix)
        layers.update({"^" + re.escape(n): v for n, v in named.items() if v != usual})
    return default, {**layers, **leaves}


def _commonest(values: list, prefer=None):
    """The value seen most often; among equals `prefer`, then the first seen."""
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v == prefer, -values.index(v)))
