"""One-screen summary of a scripts/gpu_check.sh run: OUT/summary.md (also printed by the script).

    python scripts/gpu_check_summary.py OUT [--dry-run]

Reads OUT/stages.tsv (stage, status, seconds, note), OUT/tests.log (pytest's last line) and the
bench's OUT/e2e_*.json, and states the acceptance bars of the 8B check: one pair of TDPO2 and
SparsePO (online reference) within 12 GiB at T = 2048, 16 GiB at 4096 and 24 GiB at 8192, with
tokens/s next to the eager full-logits step at the same T.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re

GiB = 1 << 30
#: T -> peak budget (GiB) for one pair of the op's TDPO2 / SparsePO with an online reference.
BARS = {2048: 12, 4096: 16, 8192: 24}
CHECKED = ("op_tdpo2_online", "op_sparsepo_online")


def read_stages(out):
    path = os.path.join(out, "stages.tsv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_counts(out):
    """{"passed": n, "failed": n, "skipped": n, ...} from pytest's final line in OUT/tests.log."""
    path = os.path.join(out, "tests.log")
    if not os.path.isfile(path):
        return {}
    counts = {}
    with open(path, errors="replace") as f:
        lines = [l for l in f if re.search(r"\d+ (passed|failed|skipped|deselected|error)", l)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", lines[-1] if lines else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def bench_rows(out):
    paths = sorted(glob.glob(os.path.join(out, "e2e_*.json")))
    if not paths:
        return None
    with open(paths[0]) as f:
        return json.load(f)


def gib(n):
    return f"{n / GiB:.2f}" if n >= GiB // 10 else f"{n / GiB:.4f}"


def row_cells(r):
    if r.get("peak_bytes"):
        meas = f"{r['tokens_per_s']:.0f} | {gib(r['peak_bytes'])}"
    elif r.get("oom"):
        meas = "OOM | -"
    elif r.get("skipped"):
        meas = f"not run: {r['skipped']} | -"
    else:
        meas = f"error: {str(r.get('error', '?'))[:50]} | -"
    plan = gib(r["plan_bytes"]) if r.get("plan_bytes") else "-"
    ratio = f"{r['plan_over_measured']:.2f}" if r.get("plan_over_measured") else "-"
    return f"| {r['T']} | {r['variant']} | {meas} | {plan} | {ratio} |"


def acceptance(result, dry_run):
    lines = []
    rows = {(r["variant"], r["T"]): r for r in result["rows"]}
    for T, bar in BARS.items():
        for v in CHECKED:
            r = rows.get((v, T))
            if r is None or not r.get("peak_bytes"):
                state = "not measured" if r is None or r.get("skipped") else ("OOM" if r.get("oom") else "error")
                lines.append(f"- {v} at T = {T}: {state} (bar {bar} GiB)")
                continue
            peak = r["peak_bytes"] / GiB
            eager = rows.get((v.replace("op_", "eager_").replace("_online", ""), T))
            vs = ""
            if eager and eager.get("tokens_per_s"):
                vs = f"; eager {eager['tokens_per_s']:.0f} tokens/s ({r['tokens_per_s'] / eager['tokens_per_s']:.2f}x)"
            elif eager and eager.get("oom"):
                vs = "; eager OOM"
            verdict = "within" if peak <= bar else "OVER"
            lines.append(f"- {v} at T = {T}: {peak:.2f} GiB, {verdict} {bar} GiB; {r['tokens_per_s']:.0f} tokens/s{vs}")
    off = [r for r in result["rows"] if r.get("plan_over_measured") and abs(r["plan_over_measured"] - 1) > 0.10]
    measured = [r for r in result["rows"] if r.get("plan_over_measured")]
    if measured:
        lines.append(
            f"- planner within 10% of {len(measured) - len(off)} of {len(measured)} measured peaks"
            + (
                ""
                if not off
                else ": off at " + ", ".join(f"{r['variant']}@{r['T']} ({r['plan_over_measured']:.2f})" for r in off)
            )
        )
    if dry_run:
        lines = [l + " [dry run: tiny model, no bar applies]" if "GiB" in l else l for l in lines]
    return lines


def summarize(out, dry_run=False):
    stages = read_stages(out)
    md = [f"# GPU check{' (dry run on the CPU)' if dry_run else ''}", ""]
    md += ["| stage | status | seconds | note |", "|---|---|---|---|"]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in stages]
    total = sum(int(s["seconds"]) for s in stages if s["seconds"].isdigit())
    md += ["", f"Stages took {total} s in all."]
    counts = test_counts(out)
    if counts:
        md += ["", "Tests: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + "."]
        if not dry_run and counts.get("skipped"):
            md.append("WARNING: tests skipped on the GPU (see tests.log: was the extension built with CUDA?).")
    result = bench_rows(out)
    if result is not None:
        m = result["machine"]
        md += [
            "",
            f"## Training step, {result['model']} ({result['dtype']}, NF4 + LoRA r=16, one pair)",
            "",
            f"{m.get('gpu') or m.get('cpu', '?')}, torch {m.get('torch')}, GPU memory cap "
            f"{result.get('gpu_mem') or 'none'}, {result['steps']} timed steps per row; model built in memory "
            f"in {result.get('model_build_s', '?')} s.",
            "",
            "| T | variant | tokens/s | peak GiB | planner GiB | planner / measured |",
            "|---|---|---|---|---|---|",
        ]
        md += [row_cells(r) for r in result["rows"]]
        md += ["", "## Acceptance", ""] + acceptance(result, dry_run)
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    summarize(a.out, a.dry_run)


if __name__ == "__main__":
    main()
