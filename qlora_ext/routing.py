"""The "auto" linear_4bit backend's routing table: which backend serves a call on CUDA, by GPU, direction and M.

The table is measured, not guessed: bench/bench_linear_cuda.py times every fixed backend (dequantize + cuBLAS and
the fused kernels) side by side and suggests, per direction and M, the fastest one that passed its checks;
`python bench/routing_from_bench.py RESULT.json` turns that suggestion into this GPU's entry of
qlora_ext/auto_routing.json, which qlora_ext loads at import (`python -m qlora_ext.info` shows it). A GPU,
direction or M the table does not cover runs dequantize + cuBLAS (what bitsandbytes does for training). Users can
measure their own GPU the same way and point QLORA_AUTO_ROUTING at the file (QLORA_AUTO_ROUTING=none: dequantize +
cuBLAS everywhere).

File format:
    {"about": "...",
     "gpus": {"sm_90": {"measured": {"gpu": ..., "bench": ..., "versions": ..., "shapes": ..., "min_speedup": ...,
                                     "fused_large_kernel": ...},
                        "fwd": [{"max_m": 16, "backend": "fused"}, {"max_m": 16384, "backend": "dequant"}],
                        "bwd": [...]}}}
A direction's rules are ordered by max_m; a rule covers M above the previous rule's max_m up to its own, and the
last rule also covers every larger M.
"""
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

from . import _C
from ._files import atomic_write_text

BACKENDS = ("dequant", "fused", "fused_tn128", "fused_grid", "fused_mma")  # bench_linear_cuda's fixed backends
DIRECTIONS = ("fwd", "bwd")
PACKAGED_TABLE = Path(__file__).with_name("auto_routing.json")
ENV_VAR = "QLORA_AUTO_ROUTING"
DEFAULT_MIN_SPEEDUP = 1.03  # below this gain over dequantize + cuBLAS, keep dequantize + cuBLAS (timing noise)


def gpu_key(major: int, minor: int) -> str:
    """A GPU's key in the table: "sm_90" for compute capability 9.0, "sm_100" for 10.0."""
    return f"sm_{major}{minor}"


def _capability(key: str, where: str) -> int:
    m = re.fullmatch(r"sm_(\d{1,2})(\d)", key)  # the last digit is the minor version: sm_90, sm_100, sm_120
    if m is None:
        raise ValueError(f"{where}: GPU key must look like 'sm_90' (sm_ + compute capability), got {key!r}")
    return int(m.group(1)) * 10 + int(m.group(2))


def rules_of(table: dict, where: str = "routing table") -> list:
    """The table as _C.set_auto_routing's rules [(capability, direction, max_m, backend)], checking its shape
    (the C++ side checks the values: backends, increasing max_m)."""
    if not isinstance(table, dict) or not isinstance(table.get("gpus"), dict):
        raise ValueError(f"{where}: expected an object with a 'gpus' object, got {type(table).__name__}")
    rules = []
    for key, entry in table["gpus"].items():
        cap = _capability(key, where)
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: gpus[{key!r}] must be an object, got {type(entry).__name__}")
        unknown = set(entry) - set(DIRECTIONS) - {"measured"}
        if unknown:
            raise ValueError(f"{where}: gpus[{key!r}] has unknown keys {sorted(unknown)} (expected 'fwd', 'bwd', "
                             "'measured')")
        for d in DIRECTIONS:
            for i, rule in enumerate(entry.get(d, [])):
                if not (isinstance(rule, dict) and isinstance(rule.get("max_m"), int)
                        and isinstance(rule.get("backend"), str)):
                    raise ValueError(f"{where}: gpus[{key!r}][{d!r}][{i}] must be {{'max_m': int, 'backend': str}}, "
                                     f"got {rule!r}")
                rules.append((cap, d, rule["max_m"], rule["backend"]))
    return rules


def load_table(path: Union[str, os.PathLike]) -> dict:
    """Reads and checks a routing table file (ValueError naming the file if it is not one)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"routing table {path}: not valid JSON ({e})") from None
    try:
        _C.check_auto_routing(rules_of(table, f"routing table {path}"))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("routing table") else f"routing table {path}: {msg}") from None
    return table


def set_auto_routing(table: Union[None, dict, str, os.PathLike] = None) -> None:
    """Installs a routing table for "auto": a table (dict in the file format), a file, or None for the default:
    the file QLORA_AUTO_ROUTING names ('none': an empty table), else the packaged qlora_ext/auto_routing.json."""
    if table is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env.lower() == "none":
            table = {"gpus": {}}
        elif env:
            table = env
        elif PACKAGED_TABLE.exists():
            table = PACKAGED_TABLE
        else:  # an install that left out the package data: still usable, the path that needs no measurement
            warnings.warn(f"{PACKAGED_TABLE} is missing from this install: 'auto' runs dequantize + cuBLAS "
                          "everywhere", stacklevel=2)
            table = {"gpus": {}}
    if not hasattr(_C, "set_auto_routing"):  # Python files newer than the compiled extension
        warnings.warn("qlora_ext's compiled extension predates its routing table: rebuild it (pip install "
                      "--no-build-isolation -e . in the source folder); until then 'auto' is dequantize + cuBLAS",
                      stacklevel=2)
        return
    if not isinstance(table, dict):
        table = load_table(table)
    _C.set_auto_routing(rules_of(table))


def auto_routing() -> dict:
    """The installed table: {"sm_90": {"fwd": [{"max_m": ..., "backend": ...}, ...], "bwd": [...]}, ...}."""
    gpus: dict = {}
    for cap, d, max_m, backend in _C.auto_routing():
        entry = gpus.setdefault(gpu_key(cap // 10, cap % 10), {})
        entry.setdefault(d, []).append({"max_m": max_m, "backend": backend})
    return gpus


def entry_from_bench(result: dict, min_speedup: float = DEFAULT_MIN_SPEEDUP, source: Optional[str] = None):
    """(GPU key, table entry) from a bench_linear_cuda.py JSON result: per direction and measured M, the fastest
    backend ("auto_routing_by_m"), dequant where a fused one gains less than `min_speedup` over dequantize +
    cuBLAS at that M, then neighbouring Ms with one backend merged into a rule. A run whose "fused" large-M
    kernel was mma.sync (QLORA_DISABLE_WGMMA=1 after a failed wgmma smoke test, or no sm_90a image) routes its
    "fused" choices to "fused_mma": what was measured, not the kernel "fused" would run elsewhere. Refuses a run
    whose checks failed, that checked nothing, stopped early or ran on the CPU: a kernel that computed a wrong
    result anywhere is fixed before anything is routed to it."""
    if result.get("benchmark") != "bench_linear_cuda":
        raise ValueError("not a bench_linear_cuda.py result (its 'benchmark' field is "
                         f"{result.get('benchmark')!r})")
    checks = result.get("checks") or {}
    if not checks.get("results"):
        raise ValueError("the benchmark checked no outputs (--no-check): nothing is routed to unchecked kernels")
    if checks.get("ok") is not True:
        failures = checks.get("failures") or ["?"]
        raise ValueError(f"the benchmark's checks did not pass ({len(failures)} failed, first: {failures[0]}); fix "
                         "the kernels before routing to them")
    if result.get("interrupted") or result.get("aborted"):
        raise ValueError("the benchmark stopped early (interrupted or aborted): its suggestion covers part of the "
                         "shapes; measure again")
    by_m = result.get("auto_routing_by_m") or []
    if not by_m:
        raise ValueError("the benchmark has no per-M choice ('auto_routing_by_m': no M was measured for every "
                         "backend and shape)")
    major, minor = result["device"]["capability"]
    if major < 1:
        raise ValueError(f"device capability {major}.{minor} is not a GPU's (a --device cpu debug run?)")
    large_kernel = result.get("fused_large_kernel")
    entry: dict = {"measured": {"gpu": result["device"].get("name"), "bench": source,
                                "versions": result.get("versions"), "shapes": result.get("shapes"),
                                "min_speedup": min_speedup, "fused_large_kernel": large_kernel}}
    for d in DIRECTIONS:
        rules: list = []
        for c in sorted((c for c in by_m if c["direction"] == d), key=lambda c: c["m"]):
            backend = c["backend"]
            if backend not in BACKENDS:
                raise ValueError(f"choice {c!r}: unknown backend {backend!r}")
            if backend != "dequant" and c["speedup_vs_dequant"] < min_speedup:
                backend = "dequant"
            if backend == "fused" and large_kernel != "wgmma":
                backend = "fused_mma"  # the same small-M kernels; mma.sync above M = 64, as measured
            if rules and rules[-1]["backend"] == backend:
                rules[-1]["max_m"] = c["m"]
            else:
                rules.append({"max_m": c["m"], "backend": backend})
        if rules:
            entry[d] = rules
    return gpu_key(major, minor), entry


def write_table(table: dict, path: Union[str, os.PathLike]) -> None:
    """Writes a table atomically (a temporary file in the same folder, then renamed over the old one)."""
    _C.check_auto_routing(rules_of(table))
    atomic_write_text(str(path), json.dumps(table, indent=2) + "\n")


def describe(entry: dict) -> str:
    """One line for a GPU's entry: 'fwd: M <= 16 fused, M <= 16384 dequant; bwd: ...'."""
    parts = [f"{d}: " + ", ".join(f"M <= {r['max_m']} {r['backend']}" for r in entry[d])
             for d in DIRECTIONS if entry.get(d)]
    return "; ".join(parts) if parts else "no rules (dequantize + cuBLAS)"
