"""The reference precompute alone and beside other busy processes, by whether torch was imported
before the package.

    python bench/bench_precompute_contention.py    # writes bench/results/cpu_precompute_contention.{json,md}

Each sample runs ``sparsepo-lite precompute-ref`` of the sentiment recipe (SmolLM2-135M-Instruct,
4-bit, CPU) over the first ``--pairs`` training pairs into a fresh cache, in its own process, while 0
or more other processes each run 2-thread GEMMs (bench_contention.py's competitors). The time is
``precompute_reference``'s own, measured inside the process; the model load before it (``load_policy``)
is timed apart. The policies:

- **package**: the command imports the package first, which picks libgomp's waits for the load it
  sees (passive beside busy processes, short spins on a quiet machine).
- **torch imported first**: the same command from a script that imports torch first, as notebooks
  do, so libgomp keeps its long default spins; the load guard then runs torch on one thread while
  the cores are oversubscribed (checked once when the model load starts, then before each batch).
- **torch imported first, no guard**: the same with ``--cpu_load_guard false``: what such a script
  got before the precompute had the guard.

The precompute runs whole batches through the model, every op split across torch's threads, so a
thread that spins while its preempted sibling holds up the region loses whole time slices. Each load
is sampled ``--repeats`` times, in rounds that visit every load once, the policies alternating their
order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

import yaml

from _common import HERE, ROOT, SENTIMENT_CONFIG, command_line, machine_info, markdown_header, write_markdown
from bench_contention import child_env, children_cpu, slowdown_table, start_competitors, stop_competitors

#: The child: imports ``{first}`` before anything else, times the model load (``load_policy``) and
#: ``precompute_reference`` into the JSON file ``argv[1]`` (with the import's wait decision) and runs
#: the command line ``argv[2:]``.
CHILD = (
    "import sys, json, time\n"
    "import {first}\n"
    "import sparsepo_lite\n"
    "import sparsepo_lite.refcache.writer as writer\n"
    "import sparsepo_lite.training.trainer as trainer\n"
    "from sparsepo_lite.cli import main\n"
    "loads = []\n"
    "real_load, real = trainer.load_policy, writer.precompute_reference\n"
    "def timed_load(*args, **kwargs):\n"
    "    start = time.perf_counter()\n"
    "    out = real_load(*args, **kwargs)\n"
    "    loads.append(time.perf_counter() - start)\n"
    "    return out\n"
    "def timed(*args, **kwargs):\n"
    "    start = time.perf_counter()\n"
    "    out = real(*args, **kwargs)\n"
    "    seconds = time.perf_counter() - start\n"
    "    with open(sys.argv[1], 'w') as f:\n"
    "        json.dump({{'seconds': seconds, 'load_seconds': sum(loads), 'waits': sparsepo_lite.OMP_WAIT_DECISION}}, f)\n"
    "    return out\n"
    "trainer.load_policy, writer.precompute_reference = timed_load, timed\n"
    "main(sys.argv[2:])\n"
)
#: The policies: (the module the child imports first, extra ``precompute-ref`` arguments).
POLICIES = {
    "package": ("sparsepo_lite", []),
    "torch_first": ("torch", []),
    "torch_first_unguarded": ("torch", ["--cpu_load_guard", "false"]),
}
TITLES = {
    "package": "package",
    "torch_first": "torch imported first",
    "torch_first_unguarded": "torch imported first, no guard",
}


def first_pairs(path: str, n: int, out: str) -> str:
    """Write the first ``n`` rows of the JSONL file ``path`` to ``out``; return ``out``."""
    with open(path) as f:
        rows = [line for line in f if line.strip()][:n]
    if len(rows) < n:
        raise ValueError(f"{path} has {len(rows)} rows, fewer than --pairs {n}")
    with open(out, "w") as f:
        f.writelines(rows)
    return out


def child_command(policy: str, timing: str, data: str, cache: str) -> List[str]:
    """The command line of one sample: the child script, its timing file, then ``precompute-ref``."""
    first, extra = POLICIES[policy]
    return [
        sys.executable,
        "-c",
        CHILD.format(first=first),
        timing,
        "precompute-ref",
        SENTIMENT_CONFIG,
        "--out",
        cache,
        "--train_file",
        data,
        "--eval_file",
        "",
        *extra,
    ]


def precompute_seconds(policy: str, data: str, work: str) -> Tuple[float, float, float, str]:
    """``(seconds, load seconds, CPU seconds, waits)`` of one precompute into a fresh cache: the
    precompute's own time, the model load's (``load_policy``), the CPU time of the whole process (the
    model load included), and the import's wait decision."""
    cache, timing = os.path.join(work, "cache"), os.path.join(work, "timing.json")
    shutil.rmtree(cache, ignore_errors=True)
    if os.path.exists(timing):
        os.remove(timing)
    before = children_cpu()
    proc = subprocess.run(
        child_command(policy, timing, data, cache), cwd=ROOT, env=child_env({}), capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"the precompute ({policy}) exited with code {proc.returncode}:\n{proc.stderr[-2000:]}")
    with open(timing) as f:
        t = json.load(f)
    return t["seconds"], t["load_seconds"], children_cpu() - before, t["waits"]


def write(out: str, pairs: int, cells: List[dict], commands: List[str]) -> None:
    """The JSON (every sample) and Markdown (medians, range, slowdown against alone) of the loads so far."""
    result = {"commands": commands, "machine": machine_info("cpu"), "pairs": pairs, "cells": cells}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    shown = [p for p in POLICIES if any(c.get(p) for c in cells)]
    md = markdown_header("The reference precompute under CPU contention", commands, result["machine"]) + [
        f"`sparsepo-lite precompute-ref` of the sentiment recipe over its first {pairs} training pairs "
        "(SmolLM2-135M-Instruct, 4-bit, CPU), seconds of `precompute_reference` (the model load excluded; "
        "the median of the samples, their range and count in brackets), beside N other processes running "
        "2-thread GEMMs. Slowdown: against the same policy alone. Package: the command as it comes (the "
        "package imported first picks libgomp's waits); torch imported first: the same command from a "
        "script that imports torch first, so libgomp keeps its long spins and the precompute's load guard "
        "runs torch on one thread under load; no guard: the same with --cpu_load_guard false.",
        "",
    ]
    md += slowdown_table(cells, shown, TITLES, lambda c, p: c.get(p))
    if any(c.get("load") for c in cells):
        md += [
            "",
            "Seconds of the model load before it (`load_policy`: SmolLM2 read and quantised to 4-bit; the "
            "same guard checks the load once when it starts), against alone:",
            "",
        ]
        md += slowdown_table(cells, shown, TITLES, lambda c, p: c.get("load", {}).get(p))
    md += [
        "",
        "CPU seconds of the whole process (all threads, the model load included; medians), against alone:",
        "",
    ]
    md += slowdown_table(cells, shown, TITLES, lambda c, p: c.get("cpu", {}).get(p), "CPU s", "against alone")
    waits = sorted({(p, w) for c in cells for p, ws in c.get("waits", {}).items() for w in ws})
    if waits:
        md += ["", "The import's wait decision, as each child logged it:", ""]
        md += [f"- {TITLES[p]}: {w}" for p, w in waits]
    write_markdown(out + ".md", md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="training pairs the precompute runs over")
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="competing 2-thread processes")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--repeats", type=int, default=3, help="samples per policy and load")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_precompute_contention"))
    a = ap.parse_args()
    commands = [command_line()]
    cells = [
        {
            "competitors": load,
            **{p: [] for p in a.policies},
            "load": {p: [] for p in a.policies},
            "cpu": {p: [] for p in a.policies},
        }
        for load in a.loads
    ]
    for c in cells:
        c["waits"] = {p: [] for p in a.policies}
    work = tempfile.mkdtemp(prefix="bench_precompute_contention_")
    try:
        with open(SENTIMENT_CONFIG) as f:
            train_file = yaml.safe_load(f)["train_file"]
        data = first_pairs(os.path.join(ROOT, train_file), a.pairs, os.path.join(work, "pairs.jsonl"))
        # rounds that visit every load once, so that a machine whose speed drifts slows all cells alike
        for rep in range(a.repeats):
            for c in cells:
                busy = start_competitors(c["competitors"])
                try:
                    time.sleep(2 if c["competitors"] else 0)
                    for policy in a.policies if rep % 2 == 0 else a.policies[::-1]:
                        seconds, load_seconds, cpu, waits = precompute_seconds(policy, data, work)
                        c[policy].append(seconds)
                        c["load"][policy].append(load_seconds)
                        c["cpu"][policy].append(cpu)
                        if waits not in c["waits"][policy]:
                            c["waits"][policy].append(waits)
                finally:
                    stop_competitors(busy)
                print(json.dumps(c), flush=True)
                write(a.out, a.pairs, cells, commands)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}.json, {a.out}.md")


if __name__ == "__main__":
    main()
