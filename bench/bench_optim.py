"""Benchmark of PagedAdamW's and PagedAdamW8bit's steps against torch.optim.AdamW (and bitsandbytes' PagedAdamW /
PagedAdamW8bit when installed), on two parameter sets: (a) the LoRA adapters of a LLaMA-7B-shaped model (r=64 on the 7 linear layers of 32
blocks: 448 tensors, ~160M parameters) and (b) one 1B-parameter tensor.

    python3 bench/bench_optim.py --device cpu            # this machine: CPU step vs AdamW(foreach=True)
    python3 bench/bench_optim.py --device cuda --json out.json

CUDA (bf16 parameters unless said): resident step time and its bandwidth against the measured device copy
bandwidth (fp32 states with bf16 params move 22 bytes per parameter: read p, g, m, v = 2+2+4+4, write p, m, v
= 2+4+4; fp32 params 28; torch's bf16 states 14), the first step after page_out() (migration of the states
back to the GPU: GB/s), torch.optim.AdamW(fused=True), bitsandbytes.optim.PagedAdamW (32-bit states).
PagedAdamW8bit (8-bit states, one fp32 absmax per 256) moves 10 bytes per bf16 parameter (p, g, 2 codes read;
p, 2 codes written) and 16 per fp32 one, plus 1/32 byte of absmax.
Goals (issue 4): resident >= 85% of copy bandwidth for its bytes; >= 1.0x torch fused with fp32 params on both
sets; >= 2x bitsandbytes PagedAdamW on (a), >= 1.0x on (b). CPU: >= 1.0x torch foreach, fp32 params.
"""
import argparse
import gc
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from qlora_ext import PagedAdamW, PagedAdamW8bit  # noqa: E402


def lora_shapes(blocks=32, r=64, d=4096, ffn=11008):
    """A [r, in] and B [out, r] for q, k, v, o (d->d), gate, up (d->ffn) and down (ffn->d) of each block."""
    shapes = []
    for _ in range(blocks):
        for fan_in, fan_out in [(d, d)] * 4 + [(d, ffn)] * 2 + [(ffn, d)]:
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


def make_params(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.empty(s, dtype=dtype, device=device)
        p.normal_(generator=g)
        p.requires_grad_()
        p.grad = torch.empty_like(p).normal_(generator=g)
        params.append(p)
    return params


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, device, reps, warmup=2):
    """Median seconds per step (CPU: each step timed; CUDA: reps steps between two events, averaged)."""
    for _ in range(warmup):
        opt.step()
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            start.record()
            for _ in range(reps):
                opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / reps)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device="cuda", nbytes=1 << 31):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        seconds = time.perf_counter() - t0
    del a, b
    return 2 * nbytes * 10 / seconds


def run_one(name, make_opt, shapes, dtype, device, reps, results, key, bytes_per_param=None, page=False):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    params = make_params(shapes, dtype, device)
    n = sum(p.numel() for p in params)
    try:
        opt = make_opt(params)
    except Exception as e:  # a peer missing or failing is reported, not fatal
        print(f"  {name:<44} skipped: {type(e).__name__}: {e}")
        return
    try:
        t = time_steps(opt, device, reps)
    except Exception as e:  # noqa: BLE001  (reported; the other rows and the JSON still come)
        print(f"  {name:<44} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        results.setdefault("errors", {})[f"{key}: {name}"] = f"{type(e).__name__}: {e}"[:500]
        return
    row = {"name": name, "params": n, "tensors": len(params), "step_ms": t * 1e3}
    if bytes_per_param:
        row["GB_per_s"] = bytes_per_param * n / t / 1e9
    if page and hasattr(opt, "page_out"):
        moves = []
        for _ in range(2):
            if not opt.page_out():
                break
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            moves.append(time.perf_counter() - t0)
        if moves:
            tp = min(moves)
            row["after_page_out_ms"] = tp * 1e3
            row["migration_GB_per_s"] = opt.state_bytes() / max(tp - t, 1e-9) / 1e9
    results.setdefault(key, []).append(row)
    extra = "".join(f"  {k}={v:.3g}" for k, v in row.items() if k not in ("name", "params", "tensors", "step_ms"))
    print(f"  {name:<44} {t * 1e3:9.2f} ms/step{extra}", flush=True)
    del opt, params
    gc.collect()


def bnb_paged_adamw():
    import bitsandbytes as bnb  # noqa: F401  (ImportError -> skipped)

    return lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-4, weight_decay=1e-2, optim_bits=32)


def bnb_paged_adamw8bit():
    import bitsandbytes as bnb  # noqa: F401  (ImportError -> skipped)

    return lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4, weight_decay=1e-2)


def bench_cuda(args, results, device="cuda"):
    """The CUDA sets (a) and (b) and their goals. device="cpu" is a debug run of this code on the CPU (tests/
    use it with small sets; its figures mean nothing)."""
    cuda = device == "cuda"
    bw = copy_bandwidth(device, 1 << 31 if cuda else 1 << 24)
    results["copy_GB_per_s"] = bw / 1e9
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s "
          f"({torch.cuda.get_device_name() if cuda else 'CPU debug run: figures mean nothing'})")
    sets = {"a_lora_7b_r64": lora_shapes(blocks=args.blocks), "b_one_1b": [(args.big,)]}
    try:
        _bench_cuda_sets(args, results, sets, device)
    except KeyboardInterrupt:  # bench/gpu_check.sh's time limit (SIGINT): report what was measured
        print("interrupted (time limit): the goals below use the rows measured so far")
        results["interrupted"] = True
    return cuda_goals(results)


def _bench_cuda_sets(args, results, sets, device):
    for key, shapes in sets.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        if device == "cuda":
            free, _ = torch.cuda.mem_get_info()
            assert 8 * n < free // 2, f"the arena ({8 * n / 1e9:.1f} GB) must stay far below free GPU memory"
        print(f"set {key}: {len(shapes)} tensors, {n / 1e6:.0f}M parameters")
        reps = args.reps if len(shapes) > 1 else max(3, args.reps // 4)
        bf, f32 = torch.bfloat16, torch.float32
        run_one("PagedAdamW bf16 (paged, resident)", lambda ps: PagedAdamW(ps, lr=1e-4), shapes, bf, device, reps,
                results, key, 22, page=True)
        run_one("PagedAdamW bf16 (paged, prefetch after page_out)",
                lambda ps: PagedAdamW(ps, lr=1e-4, prefetch_every_step=False), shapes, bf, device, reps, results,
                key, 22)
        run_one("PagedAdamW bf16 (unpaged)", lambda ps: PagedAdamW(ps, lr=1e-4, paged=False), shapes, bf, device,
                reps, results, key, 22)
        run_one("torch AdamW fused bf16 (bf16 states)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
                shapes, bf, device, reps, results, key, 14)
        try:
            make_bnb = bnb_paged_adamw()
            run_one("bitsandbytes PagedAdamW bf16 (32-bit states)", make_bnb, shapes, bf, device, reps, results,
                    key, 22)
        except Exception as e:  # noqa: BLE001  (ImportError, or bitsandbytes failing to load its library)
            print(f"  bitsandbytes PagedAdamW: not importable ({type(e).__name__}: {e})")
        run_one("PagedAdamW8bit bf16 (paged, resident)", lambda ps: PagedAdamW8bit(ps, lr=1e-4), shapes, bf, device,
                reps, results, key, 10, page=True)
        run_one("PagedAdamW8bit bf16 (unpaged)", lambda ps: PagedAdamW8bit(ps, lr=1e-4, paged=False), shapes, bf,
                device, reps, results, key, 10)
        try:
            make_bnb8 = bnb_paged_adamw8bit()
            run_one("bitsandbytes PagedAdamW8bit bf16", make_bnb8, shapes, bf, device, reps, results, key, 10)
        except Exception as e:  # noqa: BLE001
            print(f"  bitsandbytes PagedAdamW8bit: not importable ({type(e).__name__}: {e})")
        run_one("PagedAdamW8bit fp32", lambda ps: PagedAdamW8bit(ps, lr=1e-4), shapes, f32, device, reps, results,
                key, 16)
        run_one("PagedAdamW fp32", lambda ps: PagedAdamW(ps, lr=1e-4), shapes, f32, device, reps, results, key, 28)
        run_one("torch AdamW fused fp32", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), shapes, f32,
                device, reps, results, key, 28)


RESIDENT_GOAL_PCT, VS_TORCH_GOAL = 85.0, 1.0
VS_BNB_GOAL = {"a": 2.0, "b": 1.0}  # by set: (a) the LoRA adapters, (b) one 1B tensor


def cuda_goals(results: dict) -> dict:
    """Prints the goals of the CUDA rows in results (bench_cuda's dict: copy_GB_per_s and one list of rows
    per set) and returns them as {name: {"goal", "value", "met"}} (the format bench/gpu_report.py reads;
    "value" None when a row is missing)."""
    goals = {}

    def goal(name, target, value, label):
        goals[name] = {"goal": target, "value": value, "met": value is not None and value >= target}
        shown = f"{value:.2f}" if value is not None else "not measured"
        print(f"GOAL {label} >= {target}: {shown} -> {'met' if goals[name]['met'] else 'NOT met'}")

    copy = results.get("copy_GB_per_s")
    for key, rows in results.items():
        if not isinstance(rows, list):
            continue
        by = {r["name"]: r for r in rows}
        ours = by.get("PagedAdamW bf16 (paged, resident)")
        pct = 100 * ours["GB_per_s"] / copy if ours and copy else None
        goal(f"{key}_resident_bf16_pct_of_copy", RESIDENT_GOAL_PCT, pct,
             f"{key}: resident bf16 step, % of copy bandwidth")
        f32, tf32 = by.get("PagedAdamW fp32"), by.get("torch AdamW fused fp32")
        goal(f"{key}_fp32_vs_torch_fused", VS_TORCH_GOAL, tf32["step_ms"] / f32["step_ms"] if f32 and tf32 else None,
             f"{key}: fp32 step, torch fused time / ours")
        bnb_row = by.get("bitsandbytes PagedAdamW bf16 (32-bit states)")
        goal(f"{key}_bf16_vs_bnb_paged_adamw", VS_BNB_GOAL[key[0]],
             bnb_row["step_ms"] / ours["step_ms"] if ours and bnb_row else None,
             f"{key}: bf16 step, bitsandbytes PagedAdamW time / ours")
        ours8 = by.get("PagedAdamW8bit bf16 (paged, resident)")
        if ours8 and copy:
            print(f"{key}: 8-bit resident bf16 step at {ours8['GB_per_s'] / copy:.0%} of copy bandwidth"
                  + (f"; {ours['step_ms'] / ours8['step_ms']:.2f}x the 32-bit step" if ours else ""))
        bnb8 = by.get("bitsandbytes PagedAdamW8bit bf16")
        if ours8 and bnb8:
            print(f"{key}: 8-bit bf16 vs bitsandbytes PagedAdamW8bit: {bnb8['step_ms'] / ours8['step_ms']:.2f}x")
    return goals


def bench_cpu(args, results):
    torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads")
    sets = {f"a_lora_7b_r64_{args.cpu_blocks}blocks": lora_shapes(blocks=args.cpu_blocks),
            f"b_one_{args.cpu_big // 10**6}M": [(args.cpu_big,)]}
    for key, shapes in sets.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"set {key}: {len(shapes)} tensors, {n / 1e6:.0f}M parameters")
        for dtype, bpp in ((torch.float32, 28), (torch.bfloat16, 22)):
            d = str(dtype).split(".")[1]
            run_one(f"PagedAdamW {d}", lambda ps: PagedAdamW(ps, lr=1e-4), shapes, dtype, "cpu", args.cpu_reps,
                    results, key, bpp)
            run_one(f"PagedAdamW8bit {d}", lambda ps: PagedAdamW8bit(ps, lr=1e-4), shapes, dtype, "cpu",
                    args.cpu_reps, results, key, 16 if dtype == torch.float32 else 10)
            run_one(f"torch AdamW foreach {d}", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True), shapes,
                    dtype, "cpu", args.cpu_reps, results, key, 28 if dtype == torch.float32 else 14)
        by = {r["name"]: r for r in results[key]}
        for d in ("float32", "bfloat16"):
            torch_ms = by[f"torch AdamW foreach {d}"]["step_ms"]
            speedup = torch_ms / by[f"PagedAdamW {d}"]["step_ms"]
            print(f"{key}: {d} vs torch foreach: {speedup:.2f}x" + (" (goal >= 1.0x)" if d == "float32" else ""))
            ms8 = by[f"PagedAdamW8bit {d}"]["step_ms"]
            print(f"{key}: {d} 8-bit vs torch foreach: {torch_ms / ms8:.2f}x, vs our 32-bit: "
                  f"{by[f'PagedAdamW {d}']['step_ms'] / ms8:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "both"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", type=int, default=32, help="transformer blocks of set (a) on CUDA")
    ap.add_argument("--big", type=int, default=10**9, help="elements of set (b) on CUDA")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--cpu-blocks", type=int, default=8, help="blocks of set (a) on CPU (memory and time)")
    ap.add_argument("--cpu-big", type=int, default=64 * 10**6, help="elements of set (b) on CPU")
    ap.add_argument("--cpu-reps", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results = {"benchmark": "bench_optim", "torch": torch.__version__}
    try:
        if args.device in ("cpu", "both"):
            results["cpu"] = {}
            bench_cpu(args, results["cpu"])
        if args.device in ("cuda", "both"):
            results["cuda"] = {}
            results["goals"] = bench_cuda(args, results["cuda"])
    finally:  # also after a failure: what was measured is kept
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
