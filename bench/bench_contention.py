"""A CPU training step alone and beside other busy processes, with and without passive OpenMP waits.

    python bench/bench_contention.py           # writes bench/results/cpu_contention.{json,md}

Each cell trains the sentiment recipe (SmolLM2-135M-Instruct, 4-bit + LoRA, SparsePO) for
``--steps`` steps in its own process and reads the Trainer's ``train_runtime``, while 0 to 3 other
processes each run 2-thread fp32 GEMMs in a loop (another user's job on a shared machine). Two
OpenMP wait policies: libgomp's default (worker threads spin between parallel regions before they
sleep), which is what a process gets unless something sets ``OMP_WAIT_POLICY``, and ``PASSIVE``
(threads sleep at once), which ``import sparsepo_lite`` sets unless the user set it already. A
spinning thread holds a core that a competitor needs, and each of torch's, bitsandbytes' and the
extension's parallel regions then waits for its slowest thread, so the step collapses under
oversubscription. The cells alternate policies so that drifting load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import HERE, ROOT, SENTIMENT_CONFIG, command_line, machine_info, write_markdown

BUSY = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a\n"
# libgomp's default is OMP_WAIT_POLICY unset, which the package would turn into PASSIVE unless told not to.
POLICIES = {"default": {"SPARSEPO_LITE_OMP_PASSIVE": "0"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def train_seconds(policy: str, steps: int, work: str) -> float:
    out = os.path.join(work, policy)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(POLICIES[policy])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsepo_lite.cli",
            "train",
            SENTIMENT_CONFIG,
            "--output_dir",
            out,
            "--overwrite_output_dir",
            "--max_steps",
            str(steps),
            "--eval_file",
            "",
            "--save_strategy",
            "no",
        ],
        check=True,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(os.path.join(out, "metrics.json")) as f:
        return float(json.load(f)["final"]["train_runtime"])


def write(out: str, steps: int, cells: list) -> None:
    """The JSON and Markdown of the cells measured so far (after every load level, so an interrupted
    run keeps its rows)."""
    base = [c for c in cells if c["competitors"] == 0]
    alone = {p: base[0][p] for p in POLICIES} if base else None
    result = {
        "command": command_line(),
        "machine": machine_info("cpu"),
        "steps": steps,
        "cells": cells,
        "alone": alone,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = [
        "# A training step under CPU contention",
        "",
        f"Command: `{command_line()}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()),
        "",
        f"{steps} SparsePO steps of the sentiment recipe (SmolLM2-135M-Instruct, 4-bit + LoRA), seconds "
        "(Trainer train_runtime), beside N other processes running 2-thread GEMMs. Slowdown: against the "
        "same policy alone.",
        "",
        "| competitors | libgomp default: s | slowdown | PASSIVE (package default): s | slowdown | default / passive |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        sd = f"{c['default'] / alone['default']:.2f}x" if alone else "-"
        sp = f"{c['passive'] / alone['passive']:.2f}x" if alone else "-"
        md.append(
            f"| {c['competitors']} | {c['default']:.1f} | {sd} | {c['passive']:.1f} | {sp} | "
            f"{c['default'] / c['passive']:.2f} |"
        )
    write_markdown(out + ".md", md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2, 3], help="competing 2-thread processes")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_contention"))
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench_contention_")
    cells = []
    for load in a.loads:
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            time.sleep(2 if load else 0)
            row = {"competitors": load}
            order = ("default", "passive") if load % 2 == 0 else ("passive", "default")
            for policy in order:
                row[policy] = train_seconds(policy, a.steps, work)
            cells.append(row)
            print(json.dumps(row), flush=True)
            write(a.out, a.steps, cells)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    print(f"wrote {a.out}.json, {a.out}.md")


if __name__ == "__main__":
    main()
