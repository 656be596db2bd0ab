#!/usr/bin/env python3
"""CUDA benchmark: qlora_ext NF4 quantize/dequantize against the GPU's copy bandwidth and bitsandbytes.

Side by side in one run, on a --size x --size bfloat16 matrix (default 8192 x 8192, random normal, fixed seed),
blocksize 64, double quantization on. Every figure is the median over --reps runs of CUDA-event time, with
the L2 cache flushed before each timed run (a 256 MB buffer is read, outside the timed region). By default
the stream is also padded with a short device-side spin (torch.cuda._sleep) after the flush, so the host has
queued the whole timed region before it starts: the figures are device time, free of Python launch overhead
(except where the host must wait on the device, as the Python quantize() does). --no-pad turns that off.

  copy          dst.copy_(src) of a ~1 GiB tensor: bytes read + written; the ceiling every % refers to
  DQ  ours      qlora_ext.dequantize(q) to bf16; bytes = numel * (0.5 + 1/64 + 2) + 4 * nchunks + 4
                (codes, FP8 absmax, bf16 out, the per-256-block fp32 scales and the mean)
  Q   ours raw  torch.ops.qlora_ext.quantize_4bit + quantize_absmax_fp8 (no host sync); bytes =
                numel * (2 + 0.5 + 4/64) for the first pass (bf16 in, codes, fp32 absmax) plus the
                double-quant pass (fp32 absmax read twice, FP8 written: 9 B per block, + 12 B per 256 blocks)
  Q   ours      qlora_ext.quantize(w): the same two ops plus one device->host read of the non-finite count
                (it synchronizes between them); same byte count
  bnb           bitsandbytes.functional.dequantize_4bit / quantize_4bit with compress_statistics=True
                (if bitsandbytes is importable); same byte counts for comparison

Goals (printed as met / NOT met): dequantize >= 90% of copy bandwidth; quantize (raw ops) >= 80% of copy
bandwidth; dequantize >= 1.5x faster than bitsandbytes.
Also checked: CUDA codes/absmax equal the CPU kernels' (bit-exact by design), and how many NF4 codes differ
from bitsandbytes' CUDA kernel without double quantization.

Run (needs a CUDA GPU of compute capability 8.0+ and qlora_ext built with CUDA):
    python bench/bench_quantize_cuda.py
    python bench/bench_quantize_cuda.py --reps 100 --json /tmp/cuda_bench.json
Exits with status 2 and a message when no CUDA device is present.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from types import SimpleNamespace

import torch

from cuda_bench import FLUSH_BYTES, HostTimer, Timer, cuda_unavailable_reason  # bench/ is on sys.path as a script

DQ_GOAL_PCT = 90.0
Q_GOAL_PCT = 80.0
DQ_VS_BNB_GOAL = 1.5
BLOCKSIZE = 64
ABSMAX_CHUNK = 256

COPY_BYTES = 2**30


def _load_bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbF
    except Exception as e:  # noqa: BLE001  (missing, or a binary that does not load)
        return None, None, f"{type(e).__name__}: {e}"
    return bnbF, getattr(bitsandbytes, "__version__", "?"), None


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:numel]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="matrix is size x size bf16 (default 8192)")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up calls (default 5)")
    ap.add_argument("--no-pad", action="store_true",
                    help="do not pad the stream before each timed run: figures then include host launch gaps")
    ap.add_argument("--no-check", action="store_true", help="skip the CPU and bitsandbytes code cross-checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    # a debug run of this script's own code on the CPU (the CPU ops, wall-clock times): tests/ use it
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--size and --reps must be positive, --warmup non-negative")

    cuda = args.device == "cuda"
    reason = cuda_unavailable_reason("bench_quantize_cuda") if cuda else None
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import qlora_ext

    info = qlora_ext.build_info()
    dev = torch.device(args.device)
    props = (torch.cuda.get_device_properties(dev) if cuda else
             SimpleNamespace(name="CPU (debug run: times mean nothing)", major=0, minor=0, total_memory=0))

    bnbF, bnb_version, bnb_err = _load_bnb()
    ops = torch.ops.qlora_ext

    n = args.size
    numel = n * n
    nblocks = (numel + BLOCKSIZE - 1) // BLOCKSIZE
    nchunks = (nblocks + ABSMAX_CHUNK - 1) // ABSMAX_CHUNK
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    w = torch.randn(n, n, generator=gen, device=dev, dtype=torch.float32).to(torch.bfloat16)

    # Bytes each operation has to move (the model the % of copy bandwidth refers to).
    dq_bytes = numel * 0.5 + nblocks * 1 + numel * 2 + nchunks * 4 + 4
    q_first_bytes = numel * 2 + numel * 0.5 + nblocks * 4
    q_dq_pass_bytes = nblocks * (4 + 4 + 1) + nchunks * (8 + 8 + 4) + 4  # sums, mean, encode (+scales)
    q_bytes = q_first_bytes + q_dq_pass_bytes

    timer = Timer(args.reps, args.warmup, pad=not args.no_pad) if cuda else HostTimer(args.reps, args.warmup)
    print(f"CUDA NF4 benchmark: {n}x{n} bf16 ({numel / 1e6:.1f} M elements), blocksize {BLOCKSIZE}, double quant; "
          f"median of {args.reps} reps (CUDA events, L2 flushed by reading {FLUSH_BYTES >> 20} MB before each"
          f"{'' if args.no_pad else ', stream padded'})")
    print(f"  {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}, qlora_ext {qlora_ext.__version__} "
          f"(built for {info.get('cuda_arch_list')})")
    print(f"  bitsandbytes: {bnb_version}" if bnbF is not None else
          f"  bitsandbytes: NOT importable ({bnb_err}); reporting ours without it")
    print()

    T = {}

    # ---- ceiling: device-to-device copy of ~1 GiB
    copy_elems = COPY_BYTES // 2 if cuda else min(COPY_BYTES // 2, 4 * numel)  # the CPU run: small
    src = torch.empty(copy_elems, dtype=torch.bfloat16, device=dev).normal_(generator=gen)
    dst = torch.empty_like(src)
    T["copy"] = timer(lambda: dst.copy_(src))
    copy_bytes = 2 * 2 * copy_elems
    del src, dst
    if cuda:
        torch.cuda.empty_cache()

    # ---- ours
    q = qlora_ext.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    T["ours_dequantize"] = timer(lambda: qlora_ext.dequantize(q, torch.bfloat16))

    def raw_quantize():
        codes, absmax, nonfinite = ops.quantize_4bit(w, BLOCKSIZE, "nf4")
        return codes, ops.quantize_absmax_fp8(absmax), nonfinite

    T["ours_quantize_raw"] = timer(raw_quantize)
    T["ours_quantize_4bit_op"] = timer(lambda: ops.quantize_4bit(w, BLOCKSIZE, "nf4"))
    _, absmax32, _ = ops.quantize_4bit(w, BLOCKSIZE, "nf4")
    T["ours_absmax_fp8_op"] = timer(lambda: ops.quantize_absmax_fp8(absmax32))
    T["ours_quantize_py"] = timer(lambda: qlora_ext.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                                             double_quant=True))

    # ---- bitsandbytes
    if bnbF is not None:
        try:
            bp, bs = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            T["bnb_dequantize"] = timer(lambda: bnbF.dequantize_4bit(bp, bs))
            T["bnb_quantize"] = timer(lambda: bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                                                 compress_statistics=True))
        except Exception as e:  # noqa: BLE001
            bnb_err = f"failed at run time: {type(e).__name__}: {e}"
            print(f"  bitsandbytes: {bnb_err}")
            bnbF = None

    # ---- report
    copy_bw = copy_bytes / T["copy"]["median_s"]

    def bw(name, nbytes):
        return nbytes / T[name]["median_s"] if name in T else None

    rows = [
        ("copy (ceiling, 1 GiB)", "copy", copy_bytes),
        ("dequantize ours", "ours_dequantize", dq_bytes),
        ("dequantize bnb", "bnb_dequantize", dq_bytes),
        ("quantize ours raw ops", "ours_quantize_raw", q_bytes),
        ("  quantize_4bit op", "ours_quantize_4bit_op", q_first_bytes),
        ("  quantize_absmax_fp8 op", "ours_absmax_fp8_op", q_dq_pass_bytes),
        ("quantize ours quantize()", "ours_quantize_py", q_bytes),
        ("quantize bnb", "bnb_quantize", q_bytes),
    ]
    print(f"{'':<28}{'median us':>11}{'min us':>9}{'MB moved':>10}{'GB/s':>9}{'% copy':>8}")
    for label, key, nbytes in rows:
        if key not in T:
            continue
        r = T[key]
        b = bw(key, nbytes)
        print(f"{label:<28}{r['median_s'] * 1e6:11.1f}{r['min_s'] * 1e6:9.1f}{nbytes / 1e6:10.1f}"
              f"{b / 1e9:9.0f}{100 * b / copy_bw:7.1f}%")
    print("  (MB moved: the bytes each operation must read + write, the same model for ours and bnb)")
    print()

    def ratio(a, b):
        return T[a]["median_s"] / T[b]["median_s"] if a in T and b in T else None

    dq_pct = 100 * bw("ours_dequantize", dq_bytes) / copy_bw
    q_pct = 100 * bw("ours_quantize_raw", q_bytes) / copy_bw
    q_py_pct = 100 * bw("ours_quantize_py", q_bytes) / copy_bw
    ratios = {
        "bnb_over_ours_dequantize": ratio("bnb_dequantize", "ours_dequantize"),
        "bnb_over_ours_quantize_raw": ratio("bnb_quantize", "ours_quantize_raw"),
        "bnb_over_ours_quantize_py": ratio("bnb_quantize", "ours_quantize_py"),
        "quantize_py_over_raw": ratio("ours_quantize_py", "ours_quantize_raw"),
    }
    goals = {
        "dequantize_pct_of_copy": {"goal": DQ_GOAL_PCT, "value": dq_pct, "met": dq_pct >= DQ_GOAL_PCT},
        "quantize_raw_pct_of_copy": {"goal": Q_GOAL_PCT, "value": q_pct, "met": q_pct >= Q_GOAL_PCT},
    }
    print(f"GOAL dequantize >= {DQ_GOAL_PCT:.0f}% of copy bandwidth: {dq_pct:.1f}% -> "
          f"{'met' if goals['dequantize_pct_of_copy']['met'] else 'NOT met'}")
    print(f"GOAL quantize (raw ops) >= {Q_GOAL_PCT:.0f}% of copy bandwidth: {q_pct:.1f}% -> "
          f"{'met' if goals['quantize_raw_pct_of_copy']['met'] else 'NOT met'}"
          f"   (Python quantize(), with its host sync: {q_py_pct:.1f}%, "
          f"{ratios['quantize_py_over_raw']:.2f}x the raw ops' time)")
    if ratios["bnb_over_ours_dequantize"] is not None:
        r = ratios["bnb_over_ours_dequantize"]
        goals["dequantize_vs_bnb"] = {"goal": DQ_VS_BNB_GOAL, "value": r, "met": r >= DQ_VS_BNB_GOAL}
        print(f"GOAL dequantize >= {DQ_VS_BNB_GOAL}x faster than bitsandbytes: {r:.2f}x -> "
              f"{'met' if r >= DQ_VS_BNB_GOAL else 'NOT met'}")
        print(f"  (info) quantize vs bitsandbytes: raw ops {ratios['bnb_over_ours_quantize_raw']:.2f}x, "
              f"quantize() {ratios['bnb_over_ours_quantize_py']:.2f}x faster")
    else:
        print("GOAL dequantize vs bitsandbytes: not evaluated (bitsandbytes not importable)")

    # ---- cross-checks
    checks = {}
    if not args.no_check:
        print()
        print("checks:")
        q1 = qlora_ext.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=False)
        wc = w.cpu()
        qc = qlora_ext.quantize(wc, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
        checks["cuda_vs_cpu_codes_equal"] = bool(torch.equal(q.codes.cpu(), qc.codes))
        checks["cuda_vs_cpu_absmax_fp8_equal"] = bool(torch.equal(q.absmax.cpu().view(torch.uint8),
                                                                  qc.absmax.view(torch.uint8)))
        checks["cuda_vs_cpu_scale_mean_equal"] = bool(torch.equal(q.absmax_scale.cpu(), qc.absmax_scale)
                                                      and torch.equal(q.absmax_mean.cpu(), qc.absmax_mean))
        d_gpu = qlora_ext.dequantize(q, torch.bfloat16)
        checks["cuda_vs_cpu_dequantize_equal"] = bool(torch.equal(d_gpu.cpu(), qlora_ext.dequantize(qc)))
        print(f"  CUDA vs CPU kernels: codes {'equal' if checks['cuda_vs_cpu_codes_equal'] else 'DIFFER'}, "
              f"FP8 absmax {'equal' if checks['cuda_vs_cpu_absmax_fp8_equal'] else 'DIFFER'}, "
              f"scales/mean {'equal' if checks['cuda_vs_cpu_scale_mean_equal'] else 'DIFFER'}, "
              f"dequantized {'equal' if checks['cuda_vs_cpu_dequantize_equal'] else 'DIFFER'}")
        del wc, qc
        if bnbF is not None:
            bp1, bs1 = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
            diff = int((unpack_codes(q1.codes, numel) != unpack_codes(bp1, numel)).sum().item())
            checks["bnb_codes_differ_no_dq"] = diff
            checks["bnb_absmax_maxabs_diff_no_dq"] = (q1.absmax - bs1.absmax.float()).abs().max().item()
            checks["maxabs_ours_vs_bnb_dq"] = (d_gpu.float() - bnbF.dequantize_4bit(bp, bs).float()).abs().max().item()
            print(f"  no double quant: NF4 codes differing from bitsandbytes (CUDA): {diff} of {numel}; absmax "
                  f"max diff {checks['bnb_absmax_maxabs_diff_no_dq']:.3g}")
            print(f"  max |ours - bnb| dequantized with double quant (different absmax schemes): "
                  f"{checks['maxabs_ours_vs_bnb_dq']:.6g}")
            del bp1, bs1
        del q1, d_gpu

    if args.json:
        result = {
            "benchmark": "bench_quantize_cuda",
            "size": [n, n], "dtype": "bfloat16", "blocksize": BLOCKSIZE, "quant_type": "nf4", "double_quant": True,
            "reps": args.reps, "warmup": args.warmup, "padded": not args.no_pad, "seed": args.seed,
            "device": {"name": props.name, "capability": [props.major, props.minor],
                       "memory_bytes": props.total_memory},
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "qlora_ext": qlora_ext.__version__,
                         "bitsandbytes": bnb_version if bnbF is not None else None},
            "unavailable": {"bitsandbytes": bnb_err} if bnb_err else {},
            "bytes": {"copy": copy_bytes, "dequantize": dq_bytes, "quantize": q_bytes,
                      "quantize_first_pass": q_first_bytes, "quantize_double_quant_pass": q_dq_pass_bytes},
            "copy_bandwidth_Bps": copy_bw,
            "timings": T, "ratios": ratios, "goals": goals, "checks": checks,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
