"""Sets a GPU's entry of the "auto" backend's routing table from a bench_linear_cuda.py result.

    python bench/routing_from_bench.py RESULT.json [--min-speedup 1.03] [--table qlora_ext/auto_routing.json]

RESULT.json is what `bench/bench_linear_cuda.py --json` wrote (bench/gpu_check.sh: bench_linear_cuda.json) on
the GPU the entry is for (its compute capability names the entry, e.g. sm_90). The run's checks must all have
passed. Per direction and measured M the fastest fixed backend, dequantize + cuBLAS where a fused one gains less
than --min-speedup there, and neighbouring Ms with one backend make one rule (qlora_ext.routing.entry_from_bench);
the table is rewritten atomically. The default table is the one qlora_ext ships; point
--table elsewhere (and QLORA_AUTO_ROUTING at it) to keep a table of your own GPU's measurements.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlora_ext import routing  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="the JSON file bench/bench_linear_cuda.py --json wrote")
    ap.add_argument("--min-speedup", type=float, default=routing.DEFAULT_MIN_SPEEDUP,
                    help="keep dequantize + cuBLAS where a fused backend gains less (default %(default)s)")
    ap.add_argument("--table", default=str(routing.PACKAGED_TABLE),
                    help="the table file to update (default: the packaged one, %(default)s)")
    args = ap.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    try:
        key, entry = routing.entry_from_bench(result, args.min_speedup, source=os.path.basename(args.result))
    except ValueError as e:
        print(f"{args.result}: {e}", file=sys.stderr)
        return 1
    table = routing.load_table(args.table) if os.path.exists(args.table) else {"gpus": {}}
    table["gpus"][key] = entry
    routing.write_table(table, args.table)
    print(f"{args.table}: {key} <- " + routing.describe(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
