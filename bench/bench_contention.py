"""A CPU training step alone and beside other busy processes, under the package's thread handling
and the alternatives.

    python bench/bench_contention.py           # writes bench/results/cpu_contention.{json,md}

Each cell trains the sentiment recipe (SmolLM2-135M-Instruct, 4-bit + LoRA, SparsePO) for
``--steps`` steps in its own process and reads the Trainer's ``train_runtime``, while 0 to 3 other
processes each run 2-thread fp32 GEMMs in a loop (another user's job on a shared machine). The
policies: the package as it comes (each micro-batch's pairs run in shards on the threads, each
shard's ops on one thread: sparsepo_lite/training/pair_threads.py; the waits of
sparsepo_lite/waits.py: the competitors start first, so the import sees them and picks passive
waits); the same when the load starts after the import (the short spins a quiet import picks,
``GOMP_SPINCOUNT=2000``); the package running whole batches, every op split across the threads
(``--cpu_pair_threads false``, the package before the shards); then, all with whole batches:
libgomp's default with the trainer's load guard, which drops to one thread while the machine is
oversubscribed (what ``SPARSEPO_LITE_OMP_PASSIVE=0`` gives); passive waits always; one thread (the
control: no barrier to wait at); libgomp's default with the guard off (torch on its own). A thread
spinning for milliseconds holds a core that a competitor needs, and each of torch's, bitsandbytes'
and the extension's parallel regions then waits for its slowest thread, so that step collapses under
oversubscription; alone, spinning is faster. Two more policies start the same command from a script
that imports torch first, as many do, so that libgomp keeps its long spins: with the trainer's load
guard (which then runs torch on one thread under load, the shards keeping their threads) and
without it. Every policy is sampled ``--repeats-alone`` times alone and
``--repeats-loaded`` times under each load (libgomp's default once: it takes minutes under load), in
rounds that visit every load once, the policies alternating their order, so that a drifting machine
hits all cells alike. The share column is the slowdown if each of the
runnable threads got an equal share of the cores and lost nothing to sharing them; beside it, the
scheduler's real share: the slowdown of a one-thread pure-Python loop (no memory traffic, no barrier)
measured for ``--loop-seconds`` at each load, and of two such loops at once (what it gives two threads).
Each sample also records the CPU time the training process used, so that time lost to waiting for a
core can be told from work that got slower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

from sparsepo_lite.waits import SHORT_SPINS, SWITCH

from _common import HERE, ROOT, SENTIMENT_CONFIG, command_line, machine_info, markdown_header, write_markdown

#: Two threads of GEMMs until killed; says "busy" once the first GEMM is done, so a caller can wait
#: out the import of torch (seconds on a cold machine) before it measures anything under load.
BUSY = (
    "import torch\ntorch.set_num_threads(2)\na = torch.randn(1500, 1500)\na @ a\nprint('busy', flush=True)\n"
    "while True:\n    a @ a\n"
)
#: One thread of pure arithmetic: what the scheduler gives a thread that shares nothing but the cores.
LOOP = (
    "import sys, time\nn, end = 0, time.perf_counter() + float(sys.argv[1])\n"
    "while time.perf_counter() < end:\n    for _ in range(10000):\n        n += 1\nprint(n / float(sys.argv[1]))\n"
)
#: ``train`` arguments that run every op on all threads instead of a micro-batch's pairs on threads.
WHOLE = ["--cpu_pair_threads", "false"]
#: The policies compared: the environment and the extra ``train`` arguments of each training process.
POLICIES = {
    "package": ({SWITCH: "auto"}, []),
    "late": ({"GOMP_SPINCOUNT": str(SHORT_SPINS)}, []),
    "whole": ({SWITCH: "auto"}, WHOLE),
    "guard": ({SWITCH: "0"}, WHOLE),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, WHOLE),
    "one_thread": ({"OMP_NUM_THREADS": "1"}, []),
    "default": ({SWITCH: "0"}, ["--cpu_load_guard", "false", *WHOLE]),
    "torch_first": ({}, []),
    "torch_first_unguarded": ({}, ["--cpu_load_guard", "false"]),
}
#: Policies whose process imports torch before the package, as many scripts and notebooks do: libgomp
#: then keeps its own long spins, and the trainer's load guard is what stands between them and a
#: collapse (unguarded: what the package did before it told the guard so).
TORCH_FIRST = ("torch_first", "torch_first_unguarded")
#: The ``train`` command run from a script that imports torch first.
TORCH_FIRST_MAIN = "import sys\nimport torch\nfrom sparsepo_lite.cli import main\nmain(sys.argv[1:])"
#: What the bench's own process may have inherited or set (its import of the package chooses too):
#: no child sees it unless its policy sets it.
THREAD_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", SWITCH)
TITLES = {
    "package": "package",
    "late": "package, load after import",
    "whole": "package, whole batches",
    "guard": "libgomp default + load guard",
    "passive": "PASSIVE",
    "one_thread": "1 thread",
    "default": "libgomp default",
    "torch_first": "torch imported first",
    "torch_first_unguarded": "torch imported first, no guard",
}


def spin_policy(spins: int) -> str:
    """Register (once) and name the policy of libgomp spinning ``spins`` times, the guard off."""
    name = f"spin_{spins}"
    POLICIES[name] = ({"GOMP_SPINCOUNT": str(spins)}, ["--cpu_load_guard", "false", *WHOLE])
    TITLES[name] = f"GOMP_SPINCOUNT={spins}"
    return name


#: Threads each policy runs on (the competitors run 2 each).
THREADS = {"one_thread": 1}


def child_env(settings: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    return {**env, **settings}


def train_command(policy: str, steps: int, out: str) -> list:
    """The ``train`` command line of one cell, writing its run folder to ``out``."""
    start = ["-c", TORCH_FIRST_MAIN] if policy in TORCH_FIRST else ["-m", "sparsepo_lite.cli"]
    return [
        sys.executable,
        *start,
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
        *POLICIES[policy][1],
    ]


def runtime(out: str) -> float:
    """The Trainer's ``train_runtime`` of the run folder ``out``."""
    with open(os.path.join(out, "metrics.json")) as f:
        return float(json.load(f)["final"]["train_runtime"])


def start_training(policy: str, steps: int, out: str) -> subprocess.Popen:
    """One training process of ``policy`` (its environment and arguments), writing to ``out``."""
    return subprocess.Popen(
        train_command(policy, steps, out),
        cwd=ROOT,
        env=child_env(POLICIES[policy][0]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def children_cpu() -> float:
    """CPU seconds (user and system, all threads) of this process's children that have ended: the
    difference around one child's run is that child's, when no other child ends meanwhile."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def train_seconds(policy: str, steps: int, work: str) -> Tuple[float, float]:
    """``(train_runtime, CPU seconds)`` of one training process: the Trainer's time for the steps, and
    the CPU time (user and system, all threads, the model load included) the process used."""
    out = os.path.join(work, policy)
    before = children_cpu()
    proc = start_training(policy, steps, out)
    if proc.wait():
        raise RuntimeError(f"the training process ({policy}) exited with code {proc.returncode}")
    return runtime(out), children_cpu() - before


def loop_rate(seconds: float, processes: int = 1) -> float:
    """Iterations per second of :data:`LOOP` run for ``seconds`` in each of ``processes`` processes at
    once, the mean over them: what the scheduler gives a process of that many threads that shares
    nothing but the cores."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOOP, str(seconds)], stdout=subprocess.PIPE, text=True, env=child_env({})
        )
        for _ in range(processes)
    ]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"the loop exited with code {p.returncode}")
        rates.append(float(out))
    return sum(rates) / len(rates)


def start_competitors(n: int) -> list:
    """``n`` processes running 2-thread GEMMs until killed, returned once every one of them is running."""
    procs = [
        subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True, env=child_env({}))
        for _ in range(n)
    ]
    for p in procs:
        if p.stdout.readline().strip() != "busy":
            stop_competitors(procs)
            raise RuntimeError(f"a competing process exited with code {p.wait()} before it started its GEMMs")
    return procs


def stop_competitors(procs: list) -> None:
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()


def equal_share(cpus: int, competitors: int, threads: int = 2) -> float:
    """The part of a core each of a process's ``threads`` always-runnable threads gets beside
    ``competitors`` 2-thread processes if the scheduler splits the ``cpus`` cores evenly."""
    return min(1.0, cpus / (threads + 2 * competitors))


def share(threads: int, competitors: int, cpus: int) -> float:
    """The slowdown of a process on ``threads`` threads beside ``competitors`` 2-thread processes if
    every runnable thread got an equal share of the ``cpus`` cores and nothing were lost to sharing."""
    return min(threads, cpus) / (threads * equal_share(cpus, competitors, threads))


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def median_cell(xs, base, spread: bool = True) -> str:
    """Two Markdown cells of the samples ``xs``: their median (with ``spread``, also their range and
    count when there are several), then the median against ``base`` ("-" without one); "not run"
    without samples."""
    if not xs:
        return "not run | -"
    spread = f" ({min(xs):.1f}-{max(xs):.1f}, n = {len(xs)})" if spread and len(xs) > 1 else ""
    return f"{median(xs):.1f}{spread} | " + (f"{median(xs) / base:.2f}x" if base else "-")


def slowdown_table(
    cells: list, policies: list, titles: dict, samples, unit: str = "s", against: str = "slowdown", spread: bool = True
) -> List[str]:
    """The Markdown lines of a table with a row per cell (its load) and two columns per policy: the
    median of ``samples(cell, policy)`` (a list, empty or None where none were taken) and that median
    against the same policy's median alone (:func:`median_cell`)."""
    alone = {p: median(xs) for c in cells if c["competitors"] == 0 for p in policies if (xs := samples(c, p))}
    md = [
        "| competitors | " + " | ".join(f"{titles[p]}: {unit} | {against}" for p in policies) + " |",
        "|---|" + "---|---|" * len(policies),
    ]
    for c in cells:
        row = [median_cell(samples(c, p), alone.get(p), spread=spread) for p in policies]
        md.append(f"| {c['competitors']} | " + " | ".join(row) + " |")
    return md


def write(out: str, steps: int, cells: list, commands: list) -> None:
    """The JSON and Markdown of the cells measured so far (after every load level, so an interrupted
    run keeps its rows). A cell holds every sample of each policy at one load; the tables use medians."""
    alone = {p: median(c[p]) for c in cells if c["competitors"] == 0 for p in POLICIES if c.get(p)}
    loops = ("loop_rate", "loop2_rate")
    loop_alone = {k: next((c[k] for c in cells if c["competitors"] == 0 and c.get(k)), None) for k in loops}
    result = {
        "commands": commands,
        "machine": machine_info("cpu"),
        "steps": steps,
        "cells": cells,
        "alone_median": alone,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)

    def cell(c, policy):
        return median_cell(c.get(policy), alone.get(policy))

    shown = [p for p in POLICIES if any(c.get(p) for c in cells)]
    cpus = result["machine"]["cpu_cores"]
    threads = sorted({THREADS.get(p, cpus) for p in shown}, reverse=True)
    md = markdown_header("A training step under CPU contention", commands, result["machine"]) + [
        f"{steps} SparsePO steps of the sentiment recipe (SmolLM2-135M-Instruct, 4-bit + LoRA), seconds "
        "(Trainer train_runtime; the median of the samples, their range and count in brackets), beside N "
        "other processes running 2-thread GEMMs. Slowdown: against the same policy alone. Share: the "
        "slowdown if every runnable thread got an equal share of the cores and lost nothing to sharing "
        "them. 1-thread loop: the measured slowdown of one thread of pure-Python arithmetic (no memory "
        "traffic, no barrier), what the scheduler itself gives; 2-thread loop: the same of two such "
        "processes at once, the share the scheduler gives two threads. Policies: the package as it comes "
        "(each micro-batch's pairs in shards on the threads, one thread per shard; passive waits when the "
        "machine is busy at import, short spins otherwise); the same when the load starts after the import "
        f"(GOMP_SPINCOUNT={SHORT_SPINS}, what a quiet import sets); the package with whole batches, every op "
        "split across the threads (--cpu_pair_threads false: the package before the shards); then, all with "
        "whole batches: libgomp's default with the trainer's load guard, which drops to one thread under load "
        f"({SWITCH}=0); passive waits always; one thread (the control, no barrier to wait at); libgomp's "
        "default with "
        "the guard off. Torch imported first: the package's command run from a script that imports torch "
        "before the package, so libgomp keeps its long default spins and the trainer's load guard runs torch "
        "on one thread under load while the pair shards keep their threads; no guard: the same with "
        "--cpu_load_guard false, which is what such a script got before the package told the guard.",
        "",
        "| competitors | share: "
        + " / ".join(f"{t} thread{'s' * (t > 1)}" for t in threads)
        + " | 1-thread loop | 2-thread loop | "
        + " | ".join(f"{TITLES[p]}: s | slowdown" for p in shown)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(shown),
    ]
    for c in cells:
        shares = " / ".join(f"{share(t, c['competitors'], cpus):.2f}x" for t in threads)
        loop = " | ".join(f"{loop_alone[k] / c[k]:.2f}x" if loop_alone[k] and c.get(k) else "-" for k in loops)
        md.append(f"| {c['competitors']} | {shares} | {loop} | " + " | ".join(cell(c, p) for p in shown) + " |")
    md.append("")
    cpu_shown = [p for p in shown if any(c.get("cpu", {}).get(p) for c in cells)]
    if cpu_shown:
        md += [
            "CPU seconds the training process used (user and system, all threads, the model load included; "
            "medians) and their ratio to the same policy alone: CPU time the same work needs more beside the "
            "competitors is lost to sharing caches and memory bandwidth with them, or spent spinning.",
            "",
        ]
        md += slowdown_table(
            cells, cpu_shown, TITLES, lambda c, p: c.get("cpu", {}).get(p), "CPU s", "against alone", spread=False
        )
        md.append("")
    for p in shown:
        if p != "default" and p in alone and "default" in alone:
            md.append(f"Alone, {TITLES[p]} takes {alone[p] / alone['default']:.3f}x libgomp's default (medians).")
    write_markdown(out + ".md", md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="competing 2-thread processes")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument(
        "--default-loads",
        type=int,
        nargs="+",
        default=[0, 2],
        help="the loads at which libgomp's default is measured (it takes minutes per cell under load)",
    )
    ap.add_argument("--repeats-alone", type=int, default=3, help="samples per policy with no competitor")
    ap.add_argument(
        "--repeats-loaded", type=int, default=2, help="samples per policy under load (libgomp's default: one)"
    )
    ap.add_argument(
        "--spins",
        type=int,
        nargs="*",
        default=[],
        help="also measure libgomp spinning this many times (GOMP_SPINCOUNT, the guard off), one policy each",
    )
    ap.add_argument("--loop-seconds", type=float, default=10.0, help="the 1- and 2-thread loops at each load (0: none)")
    ap.add_argument("--merge", action="store_true", help="add to the cells of an earlier run (same steps)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_contention"))
    a = ap.parse_args()
    a.policies += [spin_policy(n) for n in a.spins]

    commands, cells = [command_line()], []
    if a.merge and os.path.isfile(a.out + ".json"):
        with open(a.out + ".json") as f:
            old = json.load(f)
        if old["steps"] != a.steps:
            sys.exit(f"--merge: {a.out}.json has {old['steps']} steps a cell, this run {a.steps}")
        commands = old.get("commands", [old.get("command")]) + commands
        cells = old["cells"]
        for c in cells:
            for key in c:
                if key.startswith("spin_"):
                    spin_policy(int(key[len("spin_") :]))
    work = tempfile.mkdtemp(prefix="bench_contention_")
    try:
        repeats = {load: a.repeats_alone if load == 0 else a.repeats_loaded for load in a.loads}
        rows = {}
        for load in a.loads:
            rows[load] = next((c for c in cells if c["competitors"] == load), None)
            if rows[load] is None:
                rows[load] = {"competitors": load}
                cells.append(rows[load])
                cells.sort(key=lambda c: c["competitors"])
            for p in a.policies:
                if p != "default" or load in a.default_loads:
                    # a policy measured again replaces its earlier samples (--merge)
                    rows[load][p] = []
                    rows[load].setdefault("cpu", {})[p] = []
        # Every round visits every load once, so that a machine whose speed drifts over the run (this VM's
        # does, by up to 2x an hour) slows the samples alone and under load alike; within a round the
        # policies alternate their order.
        for rep in range(max(repeats.values())):
            for load in a.loads:
                if rep >= repeats[load]:
                    continue
                busy = start_competitors(load)
                try:
                    time.sleep(2 if load else 0)
                    row = rows[load]
                    policies = [p for p in a.policies if p != "default" or load in a.default_loads]
                    for policy in policies if rep % 2 == 0 else policies[::-1]:
                        if load and rep and policy == "default":
                            continue
                        seconds, cpu = train_seconds(policy, a.steps, work)
                        row[policy].append(seconds)
                        row["cpu"][policy].append(cpu)
                    if a.loop_seconds > 0 and rep == repeats[load] - 1:
                        row["loop_rate"] = loop_rate(a.loop_seconds)
                        row["loop2_rate"] = loop_rate(a.loop_seconds, 2)
                    print(json.dumps(row), flush=True)
                    write(a.out, a.steps, cells, commands)
                finally:
                    stop_competitors(busy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}.json, {a.out}.md")


if __name__ == "__main__":
    main()
