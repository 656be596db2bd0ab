#!/usr/bin/env python3
"""CUDA benchmark: qlora_ext 4-bit linear, forward y = x W^T and backward dx = dy W, vs cuBLAS bf16 and bitsandbytes.

W [N, K] is a random normal bfloat16 matrix (fixed seed) quantized to NF4, blocksize 64, double quantization.
Shapes (N, K): (8192, 8192) and the Llama-7B MLP (11008, 4096) and (4096, 11008); M in {1, 16, 128, 4096,
16384}. x [M, K] and dy [M, N] are random normal bfloat16. For every (shape, M, direction) side by side:

  cuBLAS bf16       torch.matmul with the dense bf16 weight: x @ w.t() forward, dy @ w backward
  ours auto         torch.ops.qlora_ext.linear_4bit / linear_4bit_grad_input (the raw ops: no autograd
                    overhead) with qlora_ext._C.set_linear_backend("auto"), the dispatcher's own choice
  ours fused        the same with backend "fused": the fused small-M kernels for M <= 64, the fused large-M
                    kernels (128 x 128 tiles, weight tiles decoded into shared memory) above: wgmma on Hopper
                    with an sm_90a build (qlora_ext.fused_large_kernel() says which), mma.sync elsewhere
  ours fused_mma    the same with backend "fused_mma": the mma.sync large-M kernels on any GPU (M > 64 only)
  ours fused_tn128  on a GPU where "fused" runs wgmma (M > 64 only): "fused" with the 128-column tile forced
                    (qlora_ext._C.set_hopper_tile_n(128)); "fused" itself takes 256 columns here
  ours fused_grid   M <= 64 only: "fused" with the small-M kernels' reduction split over the grid alone (fp32
                    partial sums + a reduce kernel: qlora_ext._C.set_fused_split("grid")); "fused" itself
                    splits among a CTA's warps first (one launch where that fills half a wave)
  ours dequant      the same with backend "dequant" (dequantize to bf16, then cuBLAS)
  ours tune         the same with backend "tune": the fastest of the above for the shape, measured by the op the
                    first time (in the check before timing); qlora_ext._C.linear_tuning_cache() is saved too
  bnb               bitsandbytes (if importable), weight from bnb.functional.quantize_4bit(w, blocksize=64,
                    quant_type="nf4", compress_statistics=True); forward bnb.matmul_4bit(x, w4.t(),
                    quant_state=qs); backward bnb's training path: dy @ bnb.functional.dequantize_4bit(w4, qs)

Every figure is the median over --reps runs of CUDA-event time, with the L2 cache flushed before each timed run
(a 256 MB buffer is read, outside the timed region: the 35 MB NF4 weight of an 8192^2 layer would otherwise
stay in the 60 MB L2) and, unless --no-pad, the stream padded with a ~1 ms device spin so the host has queued
the timed region before it starts (device time, free of Python launch overhead).
Per row: median us, TFLOP/s = 2*M*N*K / t, GB/s = bytes / t with bytes = the weight (4-bit rows: 0.5 + 1/64 B
per weight; cuBLAS: 2 B per weight) + activations in and out (bf16), and the speed-ups cuBLAS time / t and
bnb time / t.

Goals (N = K = 8192; ratio = cuBLAS bf16 time / ours under "auto", and again under "tune" as information on
what a measuring dispatcher would reach; printed as met / NOT met, with the ratio's
fraction of its ceiling: 3.88 for small M (4.127 vs 16 bits per weight), 1.46 at M = 128, 1.0 for M >= 4096):
  forward   M = 1 >= 3.3, M = 16 >= 3.0, M = 128 >= 1.3, M = 4096 >= 0.95, M = 16384 >= 0.97
  backward  >= 0.95 at M = 4096 and M = 16384
  must      at every M, forward and backward, "auto" at least as fast as bitsandbytes and as our own
            "dequant" (value = the smallest other_time / auto_time; met at >= 0.98, since "auto" may be the
            very code path of "dequant" and identical code differs by timing noise)
Routing: per direction and M, the fixed backend (dequant, fused, fused_tn128, fused_grid, fused_mma) fastest over
the shapes (geometric mean against dequant) and passed its checks, as rules "M <= max_m: backend" (printed,
and "auto_routing_suggestion" in the JSON): bench/routing_from_bench.py writes them into the table "auto"
follows (qlora_ext/auto_routing.json; "auto_routing_in_use" in the JSON is the one this run's "auto" followed).
Checks (once per shape and M, before timing it): the relative Frobenius error of our output under each backend
against an fp32 reference computed from the dequantized weight must be <= 2x the error of the plain bf16 matmul
with the bf16 dequantized weight. Failures are printed loudly, recorded in the JSON "checks", and make the
exit status 1.

Run (needs a CUDA GPU of compute capability 8.0+ and qlora_ext built with CUDA; the defaults are sized
for well under 90 s on an H200, an estimated 20-30 s):
    python bench/bench_linear_cuda.py
    python bench/bench_linear_cuda.py --quick                      # only N = K = 8192
    python bench/bench_linear_cuda.py --shapes 11008x4096 --reps 20 --json /tmp/bench_linear_cuda.json
Exits with status 2 and a one-line message when no CUDA device is present.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from types import SimpleNamespace

import torch

from cuda_bench import FLUSH_BYTES, HostTimer, Timer, cuda_unavailable_reason  # bench/ is on sys.path as a script

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
FUSED_MAX_M = 64  # cuda::kFusedMaxM: the "fused" backend's small-M kernels up to it, its large-M kernels above

DEFAULT_SHAPES = ((8192, 8192), (11008, 4096), (4096, 11008))
DEFAULT_MS = (1, 16, 128, 4096, 16384)
BACKENDS = ("auto", "fused", "fused_mma", "dequant", "tune")
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64  # 4-bit codes + one FP8 absmax per 64 weights
BF16_BYTES = 2

GOAL_SHAPE = (8192, 8192)
FWD_GOALS = {1: 3.3, 16: 3.0, 128: 1.3, 4096: 0.95, 16384: 0.97}  # cuBLAS time / auto time
BWD_GOALS = {4096: 0.95, 16384: 0.95}
MUST_GOAL = 0.98  # "auto at least as fast as X": X time / auto time, less timing noise
ERR_FACTOR = 2.0  # our error may be at most this times the plain bf16 matmul's

# Ceilings of cuBLAS time / ours for N = K = 8192 on the H200 (shared/KERNELS.md); other shapes and M use the
# roofline model below with the same measured constants.
STATED_CEILINGS = {1: 3.88, 16: 3.88, 128: 1.46, 4096: 1.0, 16384: 1.0}
COPY_BPS = 4.3e12
BF16_FLOPS = 790e12


def ceiling(n: int, k: int, m: int) -> float:
    if (n, k) == GOAL_SHAPE and m in STATED_CEILINGS:
        return STATED_CEILINGS[m]
    act = BF16_BYTES * m * (n + k)
    flop_s = 2 * m * n * k / BF16_FLOPS
    t_nf4 = max((n * k * NF4_BYTES_PER_WEIGHT + act) / COPY_BPS, flop_s)
    t_bf16 = max((n * k * BF16_BYTES + act) / COPY_BPS, flop_s)
    return t_bf16 / t_nf4


def _load_bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbF
    except Exception as e:  # noqa: BLE001  (missing, or a binary that does not load)
        return None, None, None, f"{type(e).__name__}: {e}"
    return bitsandbytes, bnbF, getattr(bitsandbytes, "__version__", "?"), None


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            n, k = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not NxK (e.g. 8192x8192)") from None
        if n < 1 or k < 1 or k % BLOCKSIZE:
            raise argparse.ArgumentTypeError(f"shape {item!r}: N and K must be positive, K a multiple of {BLOCKSIZE}")
        shapes.append((n, k))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_ms(text: str):
    try:
        ms = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ms {text!r} is not a comma-separated list of integers") from None
    if not ms or min(ms) < 1:
        raise argparse.ArgumentTypeError("--ms must list positive integers")
    return ms


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def summarize(T: dict, shapes, ms) -> dict:
    """Prints the speed-up table and the goals from the measured times T[(n, k, direction, m, method)]
    (median seconds; methods "cuBLAS bf16", "ours <backend>", "bnb"; missing ones show as "-") and returns
    the goals {name: {"goal", "value", "met", ...}}. A function of its own so tests drive it with made-up
    times."""
    # ---- summary: speed-ups over cuBLAS and the ceilings
    def t_of(n, k, d, m, method):
        return T.get((n, k, d, m, method))

    def speedup(n, k, d, m, method):
        a, b = t_of(n, k, d, m, "cuBLAS bf16"), t_of(n, k, d, m, method)
        return a / b if a is not None and b is not None else None

    def fmt(v, width=8):
        return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}"

    print("Summary: cuBLAS bf16 time / time (above 1: faster than cuBLAS); ceil = the ceiling of that ratio")
    print(f"  {'shape':<12}{'dir':<5}{'M':>6}{'auto':>8}{'fused':>8}{'tn128':>8}{'grid':>8}{'mma':>8}{'dequant':>8}"
          f"{'tune':>8}"
          f"{'bnb':>8}{'ceil':>8}{'auto/ceil':>10}")
    for n, k in shapes:
        for d in ("fwd", "bwd"):
            for m in ms:
                a = speedup(n, k, d, m, "ours auto")
                c = ceiling(n, k, m)
                others = "".join(fmt(speedup(n, k, d, m, method)) for method in (
                    "ours fused", "ours fused_tn128", "ours fused_grid", "ours fused_mma", "ours dequant",
                    "ours tune", "bnb"))
                print(f"  {f'{n}x{k}':<12}{d:<5}{m:>6}{fmt(a)}{others}{c:8.2f}"
                      f"{fmt(a / c if a is not None else None, 10)}")
    print()

    # ---- goals (N = K = 8192)
    goals = {}

    def goal(name, label, target, value, ceil=None):
        met = value is not None and value >= target
        goals[name] = {"goal": target, "value": value, "met": met}
        extra = ""
        if ceil is not None:
            goals[name]["ceiling"] = ceil
            goals[name]["fraction_of_ceiling"] = value / ceil if value is not None else None
            extra = f"   (ceiling {ceil:.2f}: {100 * value / ceil:.0f}% of it)" if value is not None else ""
        shown = f"{value:.2f}" if value is not None else "not measured"
        print(f"GOAL {label} >= {target}: {shown} -> {'met' if met else 'NOT met'}{extra}")

    gn, gk = GOAL_SHAPE

    def dispatch_goals(disp):
        """The goals for one dispatching backend: "auto" (what ships) or "tune" (what auto could become)."""
        key = f"ours {disp}"
        for m, target in FWD_GOALS.items():
            if m in ms:
                goal(f"fwd_M{m}_cublas_over_{disp}", f"forward  M={m:<5} cuBLAS/{disp}", target,
                     speedup(gn, gk, "fwd", m, key), ceiling(gn, gk, m))
        for m, target in BWD_GOALS.items():
            if m in ms:
                goal(f"bwd_M{m}_cublas_over_{disp}", f"backward M={m:<5} cuBLAS/{disp}", target,
                     speedup(gn, gk, "bwd", m, key), ceiling(gn, gk, m))
        for m in ms:  # the backward ratios without a goal, for information
            if m not in BWD_GOALS and speedup(gn, gk, "bwd", m, key) is not None:
                v, c = speedup(gn, gk, "bwd", m, key), ceiling(gn, gk, m)
                print(f"  (info) backward M={m:<5} cuBLAS/{disp}: {v:.2f}   "
                      f"(ceiling {c:.2f}: {100 * v / c:.0f}% of it)")
        for other, okey in (("bitsandbytes", "bnb"), ('our "dequant"', "ours dequant")):
            for d, dname in (("fwd", "forward "), ("bwd", "backward")):
                pairs = [(t_of(gn, gk, d, m, okey) / t_of(gn, gk, d, m, key), m) for m in ms
                         if t_of(gn, gk, d, m, okey) is not None and t_of(gn, gk, d, m, key) is not None]
                name = f"must_{d}_{disp}_vs_{'bnb' if okey == 'bnb' else 'dequant'}"
                if not pairs:
                    print(f"GOAL must: {dname} {disp} at least as fast as {other} at every M: not evaluated "
                          f"({'bitsandbytes not importable' if okey == 'bnb' else 'backend switch missing'})")
                    continue
                worst, worst_m = min(pairs)
                goal(name, f"must: {dname} {disp} at least as fast as {other} at every M "
                     f"({other} time / {disp} time, worst at M={worst_m})", MUST_GOAL, worst)

    if GOAL_SHAPE in shapes:
        dispatch_goals("auto")
        if any(t_of(gn, gk, d, m, "ours tune") is not None for d in ("fwd", "bwd") for m in ms):
            print('The same goals for backend "tune" (what "auto" would reach by measuring; not what ships):')
            dispatch_goals("tune")
    else:
        print(f"goals: not evaluated (they are about N = K = {gn}, which was not measured)")
    # The "must" on the other shapes, for information.
    for n, k in shapes:
        if (n, k) == GOAL_SHAPE:
            continue
        for key in ("bnb", "ours dequant"):
            for d in ("fwd", "bwd"):
                for m in ms:
                    a, o = t_of(n, k, d, m, "ours auto"), t_of(n, k, d, m, key)
                    if a is not None and o is not None and o / a < MUST_GOAL:
                        print(f"  WARNING {n}x{k} {d} M={m}: auto is slower than {key} ({o / a:.2f}x)")
    return goals


FIXED_BACKENDS = ("dequant", "fused", "fused_tn128", "fused_grid", "fused_mma")


def fastest_backend_by_m(T: dict, shapes, ms, failed=frozenset()) -> list:
    """Per direction and M (ascending), the fixed backend (dequant, fused, fused_tn128, fused_grid, fused_mma)
    with the smallest geometric mean of its time over dequant's across the shapes, among those measured on every
    shape and never failing a check there (`failed`: (n, k, direction, m, backend)), as
    [{"direction", "m", "backend", "speedup_vs_dequant"}] ("auto_routing_by_m" in the JSON: what
    bench/routing_from_bench.py reads)."""
    choices = []
    for d in ("fwd", "bwd"):
        for m in sorted(ms):
            best = None
            for b in FIXED_BACKENDS:
                pairs = [(T.get((n, k, d, m, f"ours {b}")), T.get((n, k, d, m, "ours dequant"))) for n, k in shapes]
                if any(t is None or t0 is None for t, t0 in pairs) or any((n, k, d, m, b) in failed
                                                                         for n, k in shapes):
                    continue
                geo = math.exp(sum(math.log(t / t0) for t, t0 in pairs) / len(pairs))
                if best is None or geo < best[1]:
                    best = (b, geo)
            if best is not None:
                choices.append({"direction": d, "m": m, "backend": best[0], "speedup_vs_dequant": 1.0 / best[1]})
    return choices


def suggest_auto_routing(T: dict, shapes, ms, failed=frozenset()) -> list:
    """What "auto" should route to, by these measurements (fastest_backend_by_m): consecutive Ms with one choice
    make one rule "M <= max_m". Printed, and returned as [{"direction", "max_m", "backend",
    "speedup_vs_dequant"}] (the worst speed-up within the range)."""
    rules = []
    for c in fastest_backend_by_m(T, shapes, ms, failed):
        rule = {"direction": c["direction"], "max_m": c["m"], "backend": c["backend"],
                "speedup_vs_dequant": c["speedup_vs_dequant"]}
        if rules and rules[-1]["direction"] == rule["direction"] and rules[-1]["backend"] == rule["backend"]:
            rule["speedup_vs_dequant"] = min(rules[-1]["speedup_vs_dequant"], rule["speedup_vs_dequant"])
            rules[-1] = rule
        else:
            rules.append(rule)
    if rules:
        print('Routing these measurements suggest for "auto" (per direction, the fastest fixed backend that passed '
              "its checks, geometric mean over the shapes; the worst speed-up over dequant within each range):")
        for d in ("fwd", "bwd"):
            parts = [f"M <= {r['max_m']}: {r['backend']} ({r['speedup_vs_dequant']:.2f}x dequant)"
                     for r in rules if r["direction"] == d]
            if parts:
                print(f"  {d}: " + "; ".join(parts))
    return rules


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES), metavar="NxK[,NxK...]",
                       help="weight shapes [out_features N, in_features K] (default 8192x8192,11008x4096,4096x11008)")
    which.add_argument("--quick", action="store_true", help="only N = K = 8192 (the shape the goals are about)")
    ap.add_argument("--ms", type=parse_ms, default=list(DEFAULT_MS), metavar="M[,M...]",
                    help="token counts M (default 1,16,128,4096,16384)")
    ap.add_argument("--reps", type=int, default=40, help="timed repetitions per measurement (default 40)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per measurement (default 3)")
    ap.add_argument("--no-pad", action="store_true",
                    help="do not pad the stream before each timed run: figures then include host launch gaps")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks against an fp32 reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    # a debug run of this script's own code on the CPU (the CPU ops, wall-clock times): tests/ use it
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be positive, --warmup non-negative")
    shapes = [GOAL_SHAPE] if args.quick else args.shapes

    cuda = args.device == "cuda"
    reason = cuda_unavailable_reason("bench_linear_cuda") if cuda else None
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import qlora_ext

    info = qlora_ext.build_info()
    dev = torch.device(args.device)
    props = (torch.cuda.get_device_properties(dev) if cuda else
             SimpleNamespace(name="CPU (debug run: times mean nothing)", major=0, minor=0, multi_processor_count=0,
                             total_memory=0))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    empty_cache = torch.cuda.empty_cache if cuda else (lambda: None)

    set_backend = getattr(qlora_ext._C, "set_linear_backend", None)
    get_backend = getattr(qlora_ext._C, "linear_backend", None)
    backends = BACKENDS if set_backend is not None else ("auto",)
    initial_backend = get_backend() if get_backend is not None else "auto"
    bnb, bnbF, bnb_version, bnb_err = _load_bnb()
    ops = torch.ops.qlora_ext
    t_start = time.perf_counter()

    timer = Timer(args.reps, args.warmup, pad=not args.no_pad) if cuda else HostTimer(args.reps, args.warmup)
    print(f"CUDA 4-bit linear benchmark: NF4, blocksize {BLOCKSIZE}, double quant, bf16 activations; shapes "
          f"{', '.join(f'{n}x{k}' for n, k in shapes)} (N x K); M {', '.join(map(str, args.ms))}")
    print(f"  median of {args.reps} reps (CUDA events, L2 flushed by reading {FLUSH_BYTES >> 20} MB before each"
          f"{'' if args.no_pad else ', stream padded'}); our ops timed raw (torch.ops.qlora_ext), no autograd")
    print(f"  {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"qlora_ext {qlora_ext.__version__} (built for {info.get('cuda_arch_list')})")
    large_kernel = (qlora_ext.fused_large_kernel() if cuda and hasattr(qlora_ext, "fused_large_kernel")
                    else "mma.sync" if cuda else "no (CPU)")
    print(f"  backend \"fused\" runs the {large_kernel} large-M kernels on this GPU")
    if set_backend is None:
        print("  qlora_ext._C.set_linear_backend is missing (older build): only the default backend is measured")
    print(f"  bitsandbytes: {bnb_version}" if bnb is not None else
          f"  bitsandbytes: NOT importable ({bnb_err}); reporting ours without it")
    print()

    rows = []     # one per (shape, direction, M, method)
    checks = {"failures": [], "results": []}
    T = {}        # (n, k, direction, m, method) -> median seconds

    set_tile = getattr(qlora_ext._C, "set_hopper_tile_n", None)
    set_split = getattr(qlora_ext._C, "set_fused_split", None)

    def run_backend(name):
        if set_backend is not None:
            set_backend("fused" if name in ("fused_tn128", "fused_grid") else name)
        if set_tile is not None:
            set_tile(128 if name == "fused_tn128" else 0)
        if set_split is not None:
            set_split("grid" if name == "fused_grid" else "auto")

    gen = torch.Generator(device=dev).manual_seed(args.seed)
    prec = torch.get_float32_matmul_precision()
    interrupted, aborted = False, None
    try:
        with torch.no_grad():
            for n, k in shapes:
                w = torch.randn(n, k, generator=gen, device=dev, dtype=torch.float32).to(torch.bfloat16)
                q = qlora_ext.quantize(w, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True)
                qargs = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)
                w4 = qs = None
                if bnb is not None:
                    try:
                        w4, qs = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE,
                                                    compress_statistics=True)
                    except Exception as e:  # noqa: BLE001
                        bnb_err = f"quantize_4bit failed at run time: {type(e).__name__}: {e}"
                        print(f"  bitsandbytes: {bnb_err}")
                        bnb = None
                w_ref = None if args.no_check else qlora_ext.dequantize(q, torch.float32)
                w_deq16 = None if args.no_check else qlora_ext.dequantize(q, torch.bfloat16)
                print(f"=== N = {n}, K = {k}  (NF4 weight {n * k * NF4_BYTES_PER_WEIGHT / 1e6:.1f} MB, "
                      f"bf16 {n * k * BF16_BYTES / 1e6:.1f} MB)")

                for m in args.ms:
                    x = torch.randn(m, k, generator=gen, device=dev, dtype=torch.float32).to(torch.bfloat16)
                    dy = torch.randn(m, n, generator=gen, device=dev, dtype=torch.float32).to(torch.bfloat16)
                    # "fused" covers every M (small-M and large-M kernels); "fused_mma" differs above FUSED_MAX_M
                    ours = [b for b in backends if b != "fused_mma" or m > FUSED_MAX_M]
                    if large_kernel == "wgmma" and set_tile is not None and m > FUSED_MAX_M:
                        ours.append("fused_tn128")
                    if set_split is not None and m <= FUSED_MAX_M and "fused" in ours:
                        ours.append("fused_grid")

                    fwd = lambda: ops.linear_4bit(x, *qargs, None, BLOCKSIZE, QUANT_TYPE, n)  # noqa: E731
                    bwd = lambda: ops.linear_4bit_grad_input(dy, *qargs, BLOCKSIZE, QUANT_TYPE, k)  # noqa: E731

                    # ---- correctness, before timing: error vs an fp32 reference from the dequantized weight
                    if not args.no_check:
                        torch.set_float32_matmul_precision("highest")
                        for direction, op, ref_fn, bf16_fn in (
                                ("fwd", fwd, lambda: x.float() @ w_ref.t(), lambda: x @ w_deq16.t()),
                                ("bwd", bwd, lambda: dy.float() @ w_ref, lambda: dy @ w_deq16)):
                            ref = ref_fn()
                            e16 = rel_err(bf16_fn(), ref)
                            limit = ERR_FACTOR * max(e16, 1e-6)
                            parts = []
                            for b in ours:
                                run_backend(b)
                                try:
                                    y = op()
                                    sync()  # a kernel fault is this backend's, not the next op's
                                except Exception as exc:  # noqa: BLE001  (recorded as a failure, the run goes on)
                                    y, raised = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                    try:  # a fault inside the kernel is sticky: then nothing more can run
                                        sync()
                                    except Exception:  # noqa: BLE001
                                        checks["failures"].append(f"{n}x{k} M={m} {direction} backend {b}: "
                                                                  f"device fault: {raised}")
                                        raise
                                shape_ok = (y is not None and tuple(y.shape) == tuple(ref.shape)
                                            and y.dtype == torch.bfloat16)
                                e = rel_err(y, ref) if shape_ok else float("nan")
                                ok = shape_ok and math.isfinite(e) and e <= limit
                                checks["results"].append({"shape": [n, k], "m": m, "direction": direction,
                                                          "backend": b, "rel_err": e, "bf16_rel_err": e16,
                                                          "limit": limit, "ok": ok})
                                parts.append(f"{b} {e:.2e}{'' if ok else ' FAIL'}")
                                if not ok:
                                    where = f"{n}x{k} M={m} {direction} backend {b}"
                                    if y is None:
                                        msg = f"{where}: raised {raised}"
                                    elif not shape_ok:
                                        msg = (f"{where}: output {tuple(y.shape)} {y.dtype}, expected "
                                               f"{tuple(ref.shape)} torch.bfloat16")
                                    else:
                                        msg = (f"{where}: relative error {e:.3e} > {ERR_FACTOR:g} x the plain "
                                               f"bf16 matmul's {e16:.3e}")
                                    checks["failures"].append(msg)
                                    print(f"!!!!! CHECK FAILED: {msg}")
                                del y
                            print(f"  check M={m} {direction}: rel. error vs fp32 ref: bf16 matmul {e16:.2e}; "
                                  + ", ".join(parts))
                            del ref
                        torch.set_float32_matmul_precision(prec)
                        empty_cache()

                    # ---- timing
                    for direction, op in (("fwd", fwd), ("bwd", bwd)):
                        meas = {}
                        if direction == "fwd":
                            meas["cuBLAS bf16"] = timer(lambda: torch.matmul(x, w.t()))
                        else:
                            meas["cuBLAS bf16"] = timer(lambda: torch.matmul(dy, w))
                        for b in ours:
                            run_backend(b)
                            try:
                                meas[f"ours {b}"] = timer(op)
                            except Exception as exc:  # noqa: BLE001  (recorded as a failure, the run goes on)
                                msg = (f"{n}x{k} M={m} {direction} backend {b}: raised while timing: "
                                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                                checks["failures"].append(msg)
                                print(f"!!!!! FAILED: {msg}")
                                sync()  # raises after a device fault: the run stops there
                        run_backend("auto")
                        if bnb is not None:
                            try:
                                if direction == "fwd":
                                    meas["bnb"] = timer(lambda: bnb.matmul_4bit(x, w4.t(), quant_state=qs))
                                else:
                                    meas["bnb"] = timer(lambda: torch.matmul(dy, bnbF.dequantize_4bit(w4, qs)))
                            except Exception as e:  # noqa: BLE001
                                bnb_err = f"failed at run time: {type(e).__name__}: {e}"
                                print(f"  bitsandbytes: {bnb_err}")
                                bnb = None
                        flops = 2 * m * n * k
                        act = BF16_BYTES * m * (n + k)
                        t_cublas = meas["cuBLAS bf16"]["median_s"]
                        t_bnb = meas["bnb"]["median_s"] if "bnb" in meas else None
                        what = "y = x W^T" if direction == "fwd" else "dx = dy W"
                        print(f"  M = {m}, {'forward ' if direction == 'fwd' else 'backward'} {what}  "
                              f"(ceiling of cuBLAS/ours: {ceiling(n, k, m):.2f})")
                        print(f"    {'':<16}{'median us':>11}{'min us':>9}{'TFLOP/s':>9}{'GB/s':>8}"
                              f"{'cuBLAS/t':>10}{'bnb/t':>8}")
                        for method, r in meas.items():
                            t = r["median_s"]
                            nbytes = act + n * k * (BF16_BYTES if method == "cuBLAS bf16" else NF4_BYTES_PER_WEIGHT)
                            row = {"shape": [n, k], "direction": direction, "m": m, "method": method,
                                   "flops": flops, "bytes": nbytes, "tflops": flops / t / 1e12,
                                   "gbps": nbytes / t / 1e9, "cublas_over_this": t_cublas / t,
                                   "bnb_over_this": t_bnb / t if t_bnb is not None else None, **r}
                            rows.append(row)
                            T[(n, k, direction, m, method)] = t
                            bnb_col = f"{row['bnb_over_this']:8.2f}" if t_bnb is not None else f"{'-':>8}"
                            print(f"    {method:<16}{t * 1e6:11.1f}{r['min_s'] * 1e6:9.1f}{row['tflops']:9.1f}"
                                  f"{row['gbps']:8.0f}{row['cublas_over_this']:10.2f}{bnb_col}")
                    del x, dy
                    empty_cache()
                print()
                del w, q, qargs, w4, qs, w_ref, w_deq16
                empty_cache()
    except KeyboardInterrupt:  # bench/gpu_check.sh's time limit (SIGINT): summarise what was measured
        interrupted = True
        print("\n!!!!! interrupted (time limit): the summary and goals below cover what was measured so far")
    except Exception as exc:  # noqa: BLE001  a device fault is sticky: no more GPU work, but keep what was measured
        aborted = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        checks["failures"].append(f"aborted: {aborted}")
        print(f"\n!!!!! aborted ({aborted}): the summary and goals below cover what was measured so far")
    finally:
        torch.set_float32_matmul_precision(prec)
        if set_backend is not None:
            set_backend(initial_backend)
        if set_tile is not None:
            set_tile(0)
        if set_split is not None:
            set_split("auto")

    goals = summarize(T, shapes, args.ms)
    failed = {(r["shape"][0], r["shape"][1], r["direction"], r["m"], r["backend"])
              for r in checks["results"] if not r["ok"]}
    routing = suggest_auto_routing(T, shapes, args.ms, failed)

    if checks["failures"]:
        print()
        print(f"!!!!! {len(checks['failures'])} CHECK(S) FAILED (wrong results, or an op that raised):")
        for msg in checks["failures"]:
            print(f"!!!!!   {msg}")
    elif not args.no_check:
        print(f"checks: all {len(checks['results'])} outputs within {ERR_FACTOR:g}x the bf16 matmul's error")
    checks["ok"] = not checks["failures"]
    wall = time.perf_counter() - t_start
    print(f"total {wall:.1f} s")

    if args.json:
        result = {
            "benchmark": "bench_linear_cuda",
            "shapes": [list(s) for s in shapes], "ms": args.ms, "dtype": "bfloat16", "blocksize": BLOCKSIZE,
            "quant_type": QUANT_TYPE, "double_quant": True, "backends": list(backends),
            "fused_max_m": FUSED_MAX_M, "fused_large_kernel": large_kernel, "reps": args.reps,
            "warmup": args.warmup, "padded": not args.no_pad, "seed": args.seed,
            "tuning_cache": [[key, name, us] for key, (name, us) in
                             (qlora_ext._C.linear_tuning_cache() if hasattr(qlora_ext._C, "linear_tuning_cache")
                              else [])],
            "wall_s": wall, "interrupted": interrupted, "aborted": aborted,
            "device": {"name": props.name, "capability": [props.major, props.minor],
                       "memory_bytes": props.total_memory, "sms": props.multi_processor_count},
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "qlora_ext": qlora_ext.__version__,
                         "bitsandbytes": bnb_version if bnb is not None else None},
            "unavailable": {"bitsandbytes": bnb_err} if bnb_err else {},
            "bytes_model": {"nf4_bytes_per_weight": NF4_BYTES_PER_WEIGHT, "bf16_bytes_per_weight": BF16_BYTES,
                            "activations": "2 * M * (N + K)"},
            "ceilings": {f"{n}x{k}": {str(m): ceiling(n, k, m) for m in args.ms} for n, k in shapes},
            "rows": rows, "goals": goals, "checks": checks, "auto_routing_suggestion": routing,
            "auto_routing_by_m": fastest_backend_by_m(T, shapes, args.ms, failed),
            "auto_routing_in_use": qlora_ext.auto_routing(),  # what "ours auto" followed
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if checks["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
