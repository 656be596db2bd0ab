"""Per-layer rank and alpha, as PEFT's rank_pattern / alpha_pattern give them: a mapping from a regular expression
to a value, where a layer takes the value of the first key (in the mapping's order) that matches the end of its
module path at a name boundary (`re.match(rf"(.*\\.)?({key})$", name)`, PEFT's get_pattern_key; a path that is
itself a key but matches none takes that key's value), and the default otherwise. So {"q_proj": 64} sets every
q_proj, {"model.layers.0.mlp.down_proj": 8} one layer, and {"layers\\.(0|1)\\..*": 4} a range of blocks. Paths
are those of the model PEFT sees: without torch.compile's or DataParallel's wrapper.

prepare_model resolves the patterns it is given; qlora_ext.peft_io writes a model's per-layer values back as
patterns that select disjoint sets of layers (so their order cannot matter: PEFT saves them sorted): one per layer
name whose layers all take the same value other than the default, else one per such layer, the shortest ending of
its path that names it alone. (PEFT 0.15 and later read them so; older versions matched keys otherwise.)"""

from __future__ import annotations

import collections
import math
import numbers
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple


def check_patterns(patterns: Optional[Mapping], what: str, integer: bool) -> Dict[str, float]:
    """The patterns as a plain dict (empty for None), after checking that each key is a regular expression and
    each value a positive finite number (an int when `integer`); ValueError naming `what` otherwise."""
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
        if isinstance(value, bool) or not isinstance(value, wanted) or not 0 < value < math.inf:
            raise ValueError(f"{what}[{key!r}] must be a positive {'integer' if integer else 'finite number'}, got "
                             f"{value!r}")
        out[key] = int(value) if integer else float(value)
    return out


def matching_key(patterns: Iterable[str], name: str) -> Optional[str]:
    """The first pattern that selects the module path `name` (PEFT's rule, above), or None."""
    patterns = list(patterns)
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name if name in patterns else None


def value_for(patterns: Mapping[str, float], name: str, default):
    """The value the patterns give the layer at `name`, or `default` when none selects it."""
    key = matching_key(patterns, name)
    return default if key is None else patterns[key]


def unmatched(patterns: Mapping[str, float], names: Iterable[str]) -> list:
    """The patterns that select none of `names` (a typo, or a layer the targets leave out)."""
    names = list(names)
    return [key for key in patterns if not any(matching_key([key], n) for n in names)]


def as_patterns(values: Mapping[str, float], paths: Iterable[str]) -> Tuple[float, Dict[str, float]]:
    """A default and patterns that give each layer (path -> value) its value under PEFT's rule, whatever their
    order. The default is the commonest value (among equals, the first seen); a layer name (the path's last
    component) whose layers all take one other value gets one pattern; a layer whose name's layers disagree
    gets one of its own, the shortest ending of its path that no other of `paths` (every module of the model)
    ends with (_own_pattern), anchored with "^" only where its whole path is another's ending."""
    counts = collections.Counter(values.values())
    order = list(values.values())
    default = max(counts, key=lambda v: (counts[v], -order.index(v)))
    paths = set(paths) | set(values)
    by_leaf = collections.defaultdict(dict)
    for name, value in values.items():
        by_leaf[name.split(".")[-1]][name] = value
    patterns = {}
    for leaf, layers in by_leaf.items():
        distinct = set(layers.values())
        if distinct == {default}:
            continue
        if len(distinct) == 1:
            patterns[re.escape(leaf)] = distinct.pop()
            continue
        for name, value in layers.items():
            if value != default:
                patterns[_own_pattern(name, paths)] = value
    return default, patterns


def _own_pattern(name: str, paths: set) -> str:
    """unique_ending's ending of `name`, escaped; "^" and the whole path where another module's path ends with
    it (a nested look-alike)."""
    ending = unique_ending(name, paths)
    return re.escape(ending) if ending is not None else "^" + re.escape(name)


def unique_ending(name: str, paths: Iterable[str], by_characters: bool = False) -> Optional[str]:
    """The shortest ending of module path `name` (whole components) that no other of `paths` ends with, at a
    name boundary or, by_characters, as PEFT 0.21 matches modules_to_save ("norm" ends "input_layernorm"); one
    that starts with a name rather than an index ("layers.1.mlp.down_proj", not "1.mlp.down_proj"). None when
    even the whole path ends another."""
    paths = [p for p in paths if p != name]
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        ending = ".".join(parts[k:])
        if k and parts[k].isdigit():
            continue
        if not any(p.endswith(ending) if by_characters else (p == ending or p.endswith("." + ending))
                   for p in paths):
            return ending
    return None
