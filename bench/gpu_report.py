"""Writes the GPU check's report (gpu_check.md + gpu_check.json) from what bench/gpu_check.sh left in
its scratch folder (env.txt, status/<part> = "rc seconds [limit]" or "skipped 0 [limit]", junit_*.xml,
ceilings.json, study/study.{md,json}) and its output folder (gpu_check.log, bench_*.json, each with a
"goals" dict of {name: {"goal", "value", "met"}}).

Any subset of these may be missing or damaged (a failed build, a part stopped at its time limit, a run of
only some parts): each section then says what it lacks, and the report is written all the same."""
import argparse
import glob
import json
import os
import re
import sys
import traceback
import xml.etree.ElementTree as ET

TIMED_OUT = (124, 137)  # timeout's exit status, and 128 + SIGKILL


def read_env(scratch):
    env = {}
    path = os.path.join(scratch, "env.txt")
    if os.path.exists(path):
        for line in open(path, errors="replace"):
            if ":" in line:
                k, v = line.split(":", 1)
                env.setdefault(k.strip(), v.strip())
    return env


def read_parts(scratch):
    """{part: {"rc": int or None, "seconds", "limit", "state"}} in the order the parts started."""
    parts = {}
    paths = glob.glob(os.path.join(scratch, "status", "*"))
    for path in sorted(paths, key=os.path.getmtime):
        fields = open(path, errors="replace").read().split()
        name = os.path.basename(path)
        rc = int(fields[0]) if fields and fields[0].lstrip("-").isdigit() else None
        seconds = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
        limit = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else None
        if fields and fields[0] == "skipped":
            state = "skipped: time budget spent"
        elif fields and fields[0] == "running":
            state = "did not finish (still running when the report was written)"
        elif rc is None:
            state = f"unreadable status {' '.join(fields)!r}"
        elif rc == 0:
            state = "ok"
        elif rc in TIMED_OUT:
            state = "TIMED OUT"
        else:
            state = "FAILED"
        parts[name] = {"rc": rc, "seconds": seconds, "limit": limit, "state": state}
    return parts


def part_logs(out):
    """{part: [lines]} of gpu_check.log, split at the '=== part (' headers."""
    path = os.path.join(out, "gpu_check.log")
    if not os.path.exists(path):
        return {}
    logs, part = {}, None
    for line in open(path, errors="replace"):
        m = re.match(r"=== (\S+) \(", line)
        if m:
            part = m.group(1)
            logs.setdefault(part, [])
            continue
        if part is not None:
            logs[part].append(line.rstrip("\n"))
    return logs


def read_junit(path):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # pytest's placeholder for the test running when it was interrupted
            counts["interrupted"] = counts.get("interrupted", 0) + 1
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "").strip()[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failures": failures}


def read_tests(scratch):
    """{suite: result} for junit_<suite>.xml (junit.xml counts as suite 'tests')."""
    suites = {}
    for path in sorted(glob.glob(os.path.join(scratch, "junit*.xml"))):
        base = os.path.basename(path)[:-4]
        suite = "tests" if base == "junit" else base[len("junit_"):]
        try:
            suites[suite] = read_junit(path)
        except (ET.ParseError, OSError) as e:
            suites[suite] = {"error": f"unreadable {base}.xml: {e}"}
    return suites


def read_sanitizer(logs):
    """Each compute-sanitizer part's ERROR SUMMARY (or why there is none) and its first findings."""
    found = {}
    for part, lines in logs.items():
        if not part.startswith(("memcheck", "racecheck")):
            continue
        summary, details = None, []
        for line in lines:
            m = re.search(r"ERROR SUMMARY: (\d+) error", line)
            if m:
                summary = int(m.group(1))
            if "Device not supported" in line:
                summary = "device not supported"
            if line.startswith("========= ") and re.search(r"Invalid|Race|hazard|Error:|out of bounds", line) \
                    and len(details) < 5:
                details.append(line[10:].strip()[:200])
        found[part] = {"errors": summary if summary is not None else "no ERROR SUMMARY in the log", "first": details}
    return found


def read_goals(out):
    goals, problems = {}, []
    for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
        bench = os.path.basename(path)[len("bench_"):-len(".json")]
        try:
            data = json.load(open(path))
        except (OSError, ValueError) as e:
            problems.append(f"{os.path.basename(path)}: unreadable ({e})")
            continue
        for name, g in (data.get("goals") or {}).items():
            goals[f"{bench}: {name}"] = g if isinstance(g, dict) else {"goal": None, "value": g, "met": None}
        if data.get("interrupted"):
            problems.append(f"{os.path.basename(path)}: the benchmark was interrupted at its time limit")
        if data.get("aborted"):
            problems.append(f"{os.path.basename(path)}: the benchmark stopped early: {data['aborted']}")
    return goals, problems


def read_routing(out):
    """bench_linear_cuda's suggested routing for "auto": [{"direction", "max_m", "backend", "speedup_vs_dequant"}]."""
    path = os.path.join(out, "bench_linear_cuda.json")
    if not os.path.exists(path):
        return []
    return json.load(open(path)).get("auto_routing_suggestion") or []


def read_routing_entry(out):
    """What bench/routing_from_bench.py would write from this run's bench_linear_cuda.json (the GPU's key and
    its rules in one line), or why it would refuse the run; None without the file."""
    path = os.path.join(out, "bench_linear_cuda.json")
    if not os.path.exists(path):
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from qlora_ext import routing  # after the build (the report is also written when it failed: then _safe says so)
    try:
        key, entry = routing.entry_from_bench(json.load(open(path)), source=os.path.basename(path))
    except ValueError as e:
        return {"refused": str(e)}
    return {"key": key, "rules": routing.describe(entry)}


def read_ceilings(scratch, out):
    """Measured copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s), by where they were measured."""
    c = {"copy_GB_per_s": {}, "bf16_matmul_TFLOP_per_s": {}}

    def load(path):
        try:
            return json.load(open(path))
        except (OSError, ValueError):
            return None

    d = load(os.path.join(scratch, "ceilings.json"))
    if d:
        c["copy_GB_per_s"]["ceilings_cuda.py (1 GiB copy)"] = d.get("copy_GB_per_s")
        c["bf16_matmul_TFLOP_per_s"]["ceilings_cuda.py (8192^3, random)"] = d.get("bf16_matmul_TFLOP_per_s")
    d = load(os.path.join(out, "bench_quantize_cuda.json"))
    if d and d.get("copy_bandwidth_Bps"):
        c["copy_GB_per_s"]["bench_quantize_cuda (1 GiB copy, L2 flushed)"] = d["copy_bandwidth_Bps"] / 1e9
    d = load(os.path.join(out, "bench_optim.json"))
    if d and (d.get("cuda") or {}).get("copy_GB_per_s"):
        c["copy_GB_per_s"]["bench_optim (2 GiB copy)"] = d["cuda"]["copy_GB_per_s"]
    d = load(os.path.join(out, "bench_linear_cuda.json"))
    if d:
        rates = [r.get("tflops") for r in d.get("rows", []) if r.get("method") == "cuBLAS bf16" and r.get("tflops")]
        if rates:
            c["bf16_matmul_TFLOP_per_s"]["bench_linear_cuda (best cuBLAS bf16 row)"] = max(rates)
    return c


def read_study(scratch):
    path = os.path.join(scratch, "study", "study.json")
    return json.load(open(path)) if os.path.exists(path) else None


def _fmt(v):
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.3g}"
    return str(v)


def _safe(fn, *args, default=None, errors=None):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001  (a damaged input must not cost the whole report)
        errors.append(f"{fn.__name__}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")
        return default


def build_report(out, scratch, commit):
    errors = []
    logs = _safe(part_logs, out, default={}, errors=errors)
    goals, goal_problems = _safe(read_goals, out, default=({}, []), errors=errors)
    return {"commit": commit, "env": _safe(read_env, scratch, default={}, errors=errors),
            "parts": _safe(read_parts, scratch, default={}, errors=errors),
            "tests": _safe(read_tests, scratch, default={}, errors=errors),
            "sanitizer": _safe(read_sanitizer, logs, default={}, errors=errors),
            "goals": goals, "goal_problems": goal_problems,
            "auto_routing": _safe(read_routing, out, default=[], errors=errors),
            "routing_entry": _safe(read_routing_entry, out, errors=errors),
            "ceilings": _safe(read_ceilings, scratch, out, default={}, errors=errors),
            "study": _safe(read_study, scratch, errors=errors),
            "log_tails": {p: lines[-15:] for p, lines in logs.items()}, "report_errors": errors}


def markdown(report, scratch):
    env, parts = report["env"], report["parts"]
    lines = [f"# GPU check: {env.get('gpu', 'no GPU found')}", "",
             f"- commit: `{report['commit']}`", f"- date: {env.get('date', '?')}",
             f"- GPU: {env.get('gpu', '?')}; driver {env.get('driver', '?')}; {env.get('gpu_memory', '?')}",
             f"- torch: {env.get('torch', '?')}; python {env.get('python', '?')}; nvcc {env.get('nvcc', '?')}",
             f"- parts asked for: {env.get('only', '?')}; time budget {env.get('budget', '?')} s", "",
             "## Parts", "", "| part | result | exit code | seconds | limit |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['state']} | {_fmt(v['rc'])} | {_fmt(v['seconds'])} | {_fmt(v['limit'])} |"
              for k, v in parts.items()]
    if not parts:
        lines.append("| (none ran) | | | | |")
    for name, v in parts.items():
        if v["state"] not in ("ok", "skipped: time budget spent") and report["log_tails"].get(name):
            lines += ["", f"End of the log of `{name}` ({v['state']}):", "", "```"]
            lines += report["log_tails"][name] + ["```"]

    lines += ["", "## Tests", ""]
    if not report["tests"]:
        ran = [p for p in parts if p.startswith("tests")]
        lines.append("no junit results: " + (f"{', '.join(ran)} ran but wrote none (killed?)" if ran else "not run"))
    for suite, t in report["tests"].items():
        state = parts.get(suite, {}).get("state", "?")
        if "error" in t:
            lines.append(f"- {suite}: {t['error']}")
            continue
        c = t["counts"]
        note = "" if state == "ok" or (state == "FAILED" and c["failed"]) else f" (part {state}: results up to the stop)"
        stop = ", stopped during one more" if c.get("interrupted") else ""
        lines.append(f"- {suite}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped{stop}{note}")
        lines += [f"  - FAILED `{f['test']}`: {f['message']}" for f in t["failures"][:40]]
        if len(t["failures"]) > 40:
            lines.append(f"  - ... and {len(t['failures']) - 40} more (gpu_check.json)")

    lines += ["", "## compute-sanitizer", ""]
    for k, v in report["sanitizer"].items():
        e = v["errors"]
        lines.append(f"- {k}: {e} errors" if isinstance(e, int) else f"- {k}: {e}")
        lines += [f"  - {d}" for d in v["first"]]
    if not report["sanitizer"]:
        lines.append(env.get("sanitizer", "not run"))

    lines += ["", "## Ceilings (measured here)", ""]
    c = report["ceilings"] or {}
    for key, label, unit in (("copy_GB_per_s", "device copy bandwidth", "GB/s"),
                             ("bf16_matmul_TFLOP_per_s", "dense bf16 matmul", "TFLOP/s")):
        got = {k: v for k, v in (c.get(key) or {}).items() if v}
        lines.append(f"- {label}: " + ("; ".join(f"{v:.0f} {unit} ({k})" for k, v in got.items())
                                       if got else "not measured"))

    lines += ["", "## Benchmark goals", "", "| goal | measured | target | met |", "| --- | --- | --- | --- |"]
    for k, g in report["goals"].items():
        value = g.get("value")
        met = "met" if g.get("met") else ("not evaluated" if value is None else "NOT met")
        if g.get("info"):  # a figure shown beside the goals, for information
            met = f"information only: {g['info']}"
        extra = ""
        if g.get("fraction_of_ceiling") is not None:
            extra = f" ({100 * g['fraction_of_ceiling']:.0f}% of the ceiling {_fmt(g.get('ceiling'))})"
        why = f" ({g['not_evaluated']})" if g.get("not_evaluated") else ""
        lines.append(f"| {k} | {'not measured' if value is None else _fmt(value)}{extra} | {_fmt(g.get('goal'))} | "
                     f"{met}{why} |")
    if not report["goals"]:
        lines.append("| (no benchmark results) | | | |")
    lines += [f"- {p}" for p in report["goal_problems"]]
    if report.get("auto_routing"):
        lines += ["", '## Routing for "auto" that bench_linear_cuda suggests', "",
                  "(the fastest fixed backend per direction and M range that passed its checks; speed-up over "
                  "dequant + cuBLAS, the worst within the range)", ""]
        for d in ("fwd", "bwd"):
            rules = [r for r in report["auto_routing"] if r.get("direction") == d]
            if rules:
                lines.append(f"- {d}: " + "; ".join(f"M <= {r['max_m']}: {r['backend']} "
                                                    f"({_fmt(r.get('speedup_vs_dequant'))}x)" for r in rules))
    entry = report.get("routing_entry")
    if entry:
        lines += ["", "`python bench/routing_from_bench.py` on this run's bench_linear_cuda.json "
                  + (f"would write {entry['key']}: {entry['rules']}" if "key" in entry
                     else f"would refuse it: {entry['refused']}")]
    study = os.path.join(scratch, "study", "study.md")
    if os.path.exists(study):
        lines += ["", "## Paper claims on the GPU (qlora-train study --items 5)", "", open(study, errors="replace").read()]
    if report["report_errors"]:
        lines += ["", "## Report problems", ""] + [f"- {e}" for e in report["report_errors"]]
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args(argv)
    report = build_report(args.out, args.scratch, args.commit)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    try:
        text = markdown(report, args.scratch)
    except Exception:  # noqa: BLE001  (never leave the session without a report: fall back to the raw JSON)
        text = (f"# GPU check (report formatting failed; gpu_check.json has everything)\n\n```\n"
                f"{traceback.format_exc()}```\n\n```\n{json.dumps(report, indent=1, default=str)[:20000]}\n```\n")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
