"""Writes the GPU check's report (gpu_check.md + gpu_check.json) from what bench/gpu_check.sh left in
its scratch folder (env.txt, status/<part> = "rc seconds", junit.xml) and its output folder
(gpu_check.log, bench_*.json, each with a "goals" dict of {name: {"goal", "value", "met"}}, and
the paper-claims study's GPU item, study/study.{md,json} in the scratch folder)."""
import argparse
import glob
import json
import os
import re
import xml.etree.ElementTree as ET


def read_env(scratch):
    env = {}
    path = os.path.join(scratch, "env.txt")
    if os.path.exists(path):
        for line in open(path):
            if ":" in line:
                k, v = line.split(":", 1)
                env.setdefault(k.strip(), v.strip())
    return env


def read_parts(scratch):
    parts = {}
    for path in sorted(glob.glob(os.path.join(scratch, "status", "*"))):
        rc, seconds = open(path).read().split()
        parts[os.path.basename(path)] = {"rc": int(rc), "seconds": int(seconds)}
    return parts


def read_junit(scratch):
    path = os.path.join(scratch, "junit.xml")
    if not os.path.exists(path):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "cuda_passed": 0, "cuda_skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        is_cuda = "cuda" in case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failures.append({"test": name, "message": (node.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            counts["cuda_skipped"] += is_cuda
        else:
            counts["passed"] += 1
            counts["cuda_passed"] += is_cuda
    return {"counts": counts, "failures": failures}


def read_sanitizer(out):
    """The ERROR SUMMARY line of each compute-sanitizer part, in the order they ran."""
    path = os.path.join(out, "gpu_check.log")
    if not os.path.exists(path):
        return {}
    found, part = {}, None
    for line in open(path, errors="replace"):
        m = re.match(r"=== (\S+) \(", line)
        if m:
            part = m.group(1)
        m = re.search(r"ERROR SUMMARY: (\d+) error", line)
        if m and part:
            found[part] = int(m.group(1))
        if "Device not supported" in line and part:
            found[part] = "device not supported"
    return found


def read_goals(out):
    goals = {}
    for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
        data = json.load(open(path))
        for name, g in data.get("goals", {}).items():
            goals[f"{os.path.basename(path)[6:-5]}: {name}"] = g
    return goals


def read_study(scratch):
    path = os.path.join(scratch, "study", "study.json")
    return json.load(open(path)) if os.path.exists(path) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    report = {"commit": args.commit, "env": read_env(args.scratch), "parts": read_parts(args.scratch),
              "tests": read_junit(args.scratch), "sanitizer": read_sanitizer(args.out),
              "goals": read_goals(args.out), "study": read_study(args.scratch)}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)

    env = report["env"]
    lines = [f"# GPU check: {env.get('gpu', 'no GPU found')}", "",
             f"- commit: `{args.commit}`", f"- date: {env.get('date', '?')}",
             f"- torch: {env.get('torch', '?')}; python {env.get('python', '?')}; {env.get('nvcc', 'nvcc ?')}", "",
             "## Parts", "", "| part | exit code | seconds |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['rc']}{' (timed out)' if v['rc'] in (124, 137) else ''} | {v['seconds']} |"
              for k, v in report["parts"].items()]
    lines += ["", "## Tests", ""]
    t = report["tests"]
    if t is None:
        lines.append("not run")
    else:
        c = t["counts"]
        lines.append(f"{c['passed']} passed ({c['cuda_passed']} on CUDA), {c['failed']} failed, "
                     f"{c['skipped']} skipped ({c['cuda_skipped']} CUDA tests skipped)")
        lines += [f"- FAILED `{f['test']}`: {f['message']}" for f in t["failures"]]
    lines += ["", "## compute-sanitizer", ""]
    lines += [f"- {k}: {v} errors" if isinstance(v, int) else f"- {k}: {v}" for k, v in report["sanitizer"].items()]
    if not report["sanitizer"]:
        lines.append("not run, or no summary found (see gpu_check.log)")
    lines += ["", "## Benchmark goals", "", "| goal | measured | target | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {g['value']:.3g} | {g['goal']} | {'met' if g['met'] else 'NOT met'} |"
              for k, g in report["goals"].items() if g.get("value") is not None]
    study = os.path.join(args.scratch, "study", "study.md")
    if os.path.exists(study):
        lines += ["", "## Paper claims on the GPU (qlora-train study --items 5)", "", open(study).read()]
    lines.append("")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
