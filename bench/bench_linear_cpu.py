#!/usr/bin/env python3
"""CPU benchmark: decode-sized 4-bit linear layers (a few rows of x, as in generation), qlora_ext vs bitsandbytes
and a dense layer, side by side in one run.

For each weight shape (default: LLaMA-7B's 4096 x 4096, 11008 x 4096 and 4096 x 11008, NF4 with double
quantization, blocksize 64), x dtype (float32, bfloat16) and number of rows M (default 1, 4, 8, 9, 16), the medians
of wall-clock time over --reps rounds, each round calling every contender once (round-robin, so background load
hits them alike), with 2 threads:

  ours         qlora_ext.linear_4bit(x, q): up to 8 rows the fused path (W decoded in registers, AVX-512),
               beyond it dequantize a tile of rows + ATen GEMM
  dense        torch.nn.functional.linear(x, w) on the weight dequantized to x's dtype (the memory-bound floor
               a 4-bit layer is meant to beat by reading a quarter or an eighth of the bytes)
  bnb          bitsandbytes.nn.Linear4bit (nf4, compress_statistics) in eval mode without gradients: its CPU
               inference path as installed (with AVX512-BF16 it repacks the weight on the first call)
  bnb_matmul   bitsandbytes.matmul_4bit on the unpacked weight (the path its training forward takes)

Each contender's output is checked against a float64 product with qlora_ext's dequantized weight (the same
4-bit values: bitsandbytes quantizes to the same codes; its double quantization gives slightly different
absmax, so its error includes that) and reported as a relative error. No goal is set for this benchmark (the
issues set none for CPU inference); it reports ratios.

Run (from the repository root, qlora_ext installed; bitsandbytes optional):
    python bench/bench_linear_cpu.py                       # all shapes, 20 rounds
    python bench/bench_linear_cpu.py --shapes 4096x4096 --ms 1,8 --reps 10 --json /tmp/linear_cpu.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch / bnb load their OpenMP runtimes

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

THREADS = 2


def _load_bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional hub kernel's import warning
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception:  # not installed, or no backend for this machine
        return None


def _median_ms(times):
    return 1e3 * statistics.median(times)


def bench_shape(n, k, dtype, ms, reps, bnb):
    import qlora_ext

    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    q = qlora_ext.quantize(w, 64, "nf4", double_quant=True)
    w_dq = qlora_ext.dequantize(q, dtype)
    layers = {}
    if bnb is not None:
        module = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        module.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        layers["bnb"] = module.to("cpu").eval()
        unpacked = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to("cpu")
        layers["bnb_matmul"] = unpacked
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(dtype)
        ref = x.double() @ w_dq.double().t()
        contenders = {"ours": lambda: qlora_ext.linear_4bit(x, q), "dense": lambda: F.linear(x, w_dq)}
        if "bnb" in layers:
            contenders["bnb"] = lambda: layers["bnb"](x)
            p = layers["bnb_matmul"]
            contenders["bnb_matmul"] = lambda: bnb.matmul_4bit(x, p.t(), quant_state=p.quant_state)
        errors = {}
        with torch.no_grad():
            for name, fn in contenders.items():
                for _ in range(3):  # warm-up (bitsandbytes repacks on its first inference call)
                    out = fn()
                errors[name] = ((out.double() - ref).norm() / ref.norm()).item()
            times = {name: [] for name in contenders}
            for _ in range(reps):
                for name, fn in contenders.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        med = {name: _median_ms(t) for name, t in times.items()}
        row = {"n": n, "k": k, "dtype": str(dtype).replace("torch.", ""), "m": m, "ms": med, "rel_err": errors,
               "ours_path": "fused" if m <= 8 and qlora_ext.build_info()["cpu_avx512"] else "tiled"}
        row["speedup_vs"] = {name: med[name] / med["ours"] for name in med if name != "ours"}
        rows.append(row)
        print(f"{n:>6} x {k:<6} {row['dtype']:>9} M={m:<3} ours({row['ours_path']}) {med['ours']:8.3f} ms  "
              + "  ".join(f"{name} {med[name]:8.3f} ms ({med[name] / med['ours']:.2f}x)" for name in med
                          if name != "ours")
              + "  | rel err " + " ".join(f"{name} {e:.1e}" for name, e in errors.items()), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="N x K of each weight")
    p.add_argument("--ms", default="1,4,8,9,16", help="rows of x")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    import qlora_ext

    bnb = _load_bnb()
    load = os.getloadavg()[0]
    print(f"qlora_ext {qlora_ext.__version__}, torch {torch.__version__}, bitsandbytes "
          f"{getattr(bnb, '__version__', 'absent')}, {THREADS} threads, {platform.processor() or platform.machine()}, "
          f"AVX-512 {'on' if qlora_ext.build_info()['cpu_avx512'] else 'off'}; load average {load:.2f}"
          + ("  WARNING: the machine is busy, rerun when it is idle" if load > 0.5 else ""))
    ms = [int(v) for v in args.ms.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        for dtype_name in args.dtypes.split(","):
            rows += bench_shape(n, k, getattr(torch, dtype_name), ms, args.reps, bnb)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": THREADS, "torch": torch.__version__, "load_average": load, "rows": rows,
                       "bitsandbytes": getattr(bnb, "__version__", None)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
