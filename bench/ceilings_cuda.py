#!/usr/bin/env python3
"""The GPU's two ceilings, measured as every benchmark's yardstick: device-to-device copy bandwidth (a 1 GiB
tensor copied, bytes read + written) and the dense bf16 matrix-product rate (8192 x 8192 x 8192 through
torch.matmul on random normal data). Each is the median of --reps runs timed with CUDA events after 3
warm-ups. A few seconds.

    python bench/ceilings_cuda.py [--reps 10] [--json PATH]

Exits with status 2 and a one-line message when no CUDA device is present.
"""
import argparse
import json
import statistics
import sys

import torch

COPY_BYTES = 1 << 30
MATMUL_N = 8192


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def measure(reps: int = 10) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_(generator=g)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), reps)
    n = MATMUL_N
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    mm_ms = _median_ms(lambda: torch.matmul(a, b), reps)
    props = torch.cuda.get_device_properties(0)
    return {"benchmark": "ceilings_cuda", "device": props.name, "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "reps": reps,
            "copy_bytes_moved": 2 * COPY_BYTES, "copy_ms": copy_ms,
            "copy_GB_per_s": 2 * COPY_BYTES / (copy_ms / 1e3) / 1e9,
            "bf16_matmul_n": n, "bf16_matmul_ms": mm_ms,
            "bf16_matmul_TFLOP_per_s": 2 * n ** 3 / (mm_ms / 1e3) / 1e12}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--reps", type=int, default=10, help="timed runs of each (default 10)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be positive")
    if not torch.cuda.is_available():
        print("ceilings_cuda: no CUDA device is available (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    r = measure(args.reps)
    print(f"{r['device']}: device copy {r['copy_GB_per_s']:.0f} GB/s (1 GiB, read + write), "
          f"bf16 matmul {r['bf16_matmul_TFLOP_per_s']:.0f} TFLOP/s ({MATMUL_N}^3, random data)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
