"""Where a CPU training step's time goes, thread by thread, alone and beside other busy processes.

    python bench/bench_thread_share.py         # writes bench/results/cpu_thread_share.{json,md}

Trains the sentiment recipe as bench/bench_contention.py does (the package as it comes, 6 SparsePO
steps) while 0 or more other processes run 2-thread GEMMs, and reads the kernel's scheduler
statistics of every thread of the training process every ``--interval`` seconds
(/proc/<pid>/task/<tid>/schedstat: time on a core, time runnable but waiting for one). Per kind of
thread (the main thread, the pair threads, which the package names ``sparsepo-pairs``, and the rest:
torch's OpenMP threads, the allocator's), summed over its threads: CPU seconds, seconds waiting for a
core, seconds blocked (neither: on the GIL, on another thread, asleep), and the share of a core each
got while it was runnable, CPU / (CPU + waiting). Beside N 2-thread competitors on C cores, a process
whose 2 threads are always runnable gets C / (2 + 2N) of a core per thread from an even scheduler: the
equal share.

So it tells apart the three ways a step can lose time to its neighbours: its threads get less than
their share of a core while runnable (the scheduler), its work needs more CPU (caches and memory
bandwidth shared with the neighbours), or its threads spend longer blocked (a lock or a sibling that
a preempted thread holds up). Each load is sampled ``--repeats`` times, in rounds that visit every load
once; the tables give the medians.

With ``--perf`` (Linux ``perf`` on the PATH) each training process also runs under
``perf record -e cpu-clock``, and the pair threads' samples are sorted by the code they landed in
(MKL's GEMM, torch's other kernels, the Python interpreter, torch's Python bindings, the C and C++
runtime, bitsandbytes, the extension, the kernel): the table then says which of them needs more CPU
time beside the neighbours. The sampling slows the training process too, alone and loaded, so
compare ``--perf`` runs with each other.

With ``--gil`` (``perf`` with uprobe support, root, and an interpreter whose ``take_gil`` has a
symbol) the pair threads' blocked time is split by what they waited for: the GIL (the thread slept
inside the interpreter's ``take_gil``: the other pair thread held it) or anything else (the main
thread's serial part between the shards' phases, the other shard finishing). It records the
scheduler's switches and wake-ups on every core (``perf record -a``) and a probe at ``take_gil``'s
entry and return; a blocked stretch runs from the thread's switch-out in a sleeping state to its
wake-up. The probes fire at every GIL take (tens of thousands a step per thread), which slows the
training process by 5-10% alone and under load alike: compare ``--gil`` runs with each
other.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Optional

from sparsepo_lite.training.pair_threads import THREAD_NAME

from _common import HERE, command_line, machine_info, markdown_header, write_markdown
from bench_contention import (
    children_cpu,
    equal_share,
    median,
    runtime,
    start_competitors,
    start_training,
    stop_competitors,
)

#: The kinds of thread, in table order.
KINDS = ("main", "pair threads", "other")
#: Clock ticks per second of /proc/<pid>/task/<tid>/stat's start time.
TICKS = os.sysconf("SC_CLK_TCK")
#: ``perf record``'s sampling rate with ``--perf`` (samples per second of CPU time).
PERF_HZ = 499
#: What the pair threads' CPU time is sorted into with ``--perf``, in table order: (name, a pattern
#: searched for in the shared object's path, and, if not None, the symbol's start).
CODE = (
    ("MKL's BLAS (sgemm and its packing)", r"/libtorch_cpu\.so", "mkl_blas_"),
    ("torch's other kernels", r"/lib(torch_cpu|c10)\.so", None),
    # a shared libpython, or an interpreter linked into the executable (Debian's, conda's)
    ("Python interpreter", r"/libpython|/python[\d.]*$", None),
    ("torch's Python bindings", r"/libtorch_python\.so", None),
    ("C and C++ runtime (malloc, memcpy)", r"/(libc|libm|libstdc\+\+|ld-linux[^/]*|libgcc_s)\.so", None),
    ("bitsandbytes' kernels", r"/libbitsandbytes", None),
    ("the extension (row pass)", r"/sparsepo_lite/_C\.", None),
    ("Linux kernel", r"^\[kernel", None),
)
OTHER_CODE = "other"
#: One line of ``perf script -F comm,tid,ip,sym,dso``: the thread's name and id, the address, the
#: symbol (perf resolves names only with the address asked for; it may hold brackets itself) and,
#: in the last brackets, the shared object (a path, or [kernel.kallsyms], [unknown]).
_PERF_LINE = re.compile(r"\s*(\S+)\s+(\d+)\s+[0-9a-f]+\s+(.*)\s+\(([/\[].*)\)\s*$")


def kind(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "main"
    return "pair threads" if name == THREAD_NAME else "other"


def read_thread(pid: int, tid: int) -> Optional[dict]:
    """One thread's name, start (seconds since boot) and scheduler times (seconds), or None if it has
    just ended."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(base + "/comm") as f:
            name = f.read().strip()
        with open(base + "/schedstat") as f:
            on_cpu, waiting, _ = (int(x) for x in f.read().split())
        with open(base + "/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / TICKS  # field 22, after the name
    except (OSError, ValueError, IndexError):
        return None
    return {"name": name, "start": start, "cpu": on_cpu / 1e9, "waiting": waiting / 1e9}


def watch(proc: subprocess.Popen, interval: float) -> Dict[int, dict]:
    """Every thread's last reading before it or the process ended, with ``seen``: the time (seconds
    since boot) of that reading; read every ``interval`` seconds until ``proc`` exits."""
    threads: Dict[int, dict] = {}
    while proc.poll() is None:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        except OSError:
            tids = []
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        for tid in tids:
            reading = read_thread(proc.pid, tid)
            if reading is not None:
                threads[tid] = {**reading, "seen": now}
        time.sleep(interval)
    return threads


def summarise(pid: int, threads: Dict[int, dict]) -> Dict[str, dict]:
    """Per kind of thread: ``threads`` (how many), ``cpu``, ``waiting`` and ``blocked`` seconds summed
    over them. ``blocked`` is each thread's life (start to its last reading) less its CPU and waiting
    time; a thread's last reading may be up to one interval before it ended."""
    out = {k: {"threads": 0, "cpu": 0.0, "waiting": 0.0, "blocked": 0.0} for k in KINDS}
    for tid, t in threads.items():
        row = out[kind(pid, tid, t["name"])]
        row["threads"] += 1
        row["cpu"] += t["cpu"]
        row["waiting"] += t["waiting"]
        row["blocked"] += max(0.0, t["seen"] - t["start"] - t["cpu"] - t["waiting"])
    return out


def code_of(dso: str, symbol: str) -> str:
    """The :data:`CODE` row a CPU sample in ``symbol`` of the shared object ``dso`` (a path) counts
    under, else :data:`OTHER_CODE`."""
    for row, pattern, sym in CODE:
        if re.search(pattern, dso) and (sym is None or symbol.startswith(sym)):
            return row
    return OTHER_CODE


def pair_code_seconds(script: str, hz: float = PERF_HZ) -> Dict[str, float]:
    """The pair threads' CPU seconds per :data:`CODE` row, from the text of ``perf script -F
    comm,tid,ip,sym,dso`` of a cpu-clock recording at ``hz`` samples per second."""
    counts: Dict[str, int] = collections.Counter()
    for line in script.splitlines():
        m = _PERF_LINE.match(line)
        if m and m[1] == THREAD_NAME:
            counts[code_of(m[4], m[3])] += 1
    return {row: n / hz for row, n in counts.items()}


def record_perf(pid: int, path: str) -> subprocess.Popen:
    """``perf record`` of the process ``pid`` until it exits (cpu-clock, :data:`PERF_HZ`), to ``path``."""
    return subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ), "-p", str(pid), "-o", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def perf_script(path: str, fields: str) -> str:
    """The text ``perf script`` prints of the recording at ``path``, with the fields ``fields``."""
    return subprocess.run(
        ["perf", "script", "-i", path, "-F", fields], capture_output=True, text=True, check=True
    ).stdout


def read_perf(path: str) -> Dict[str, float]:
    """:func:`pair_code_seconds` of the recording at ``path``."""
    return pair_code_seconds(perf_script(path, "comm,tid,ip,sym,dso"))


#: The uprobe group ``--gil`` adds (and removes) on the interpreter: ``take_gil``'s entry and return.
GIL_GROUP = "sparsepo_lite_bench"
GIL_EVENTS = (f"{GIL_GROUP}:gil_in", f"{GIL_GROUP}:gil_out__return")
#: What a pair thread's blocked time is split into with ``--gil``, in table order.
BLOCKED_ON = ("the GIL", "elsewhere")
_SCRIPT_LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")
# The scheduler's formats; a thread's name may hold spaces.
_SWITCH = re.compile(r"prev_comm=(.*) prev_pid=(\d+) prev_prio=\S+ prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)")
_WAKING = re.compile(r"comm=(.*) pid=(\d+) prio=")


def interpreter_binary() -> str:
    """The file that holds this interpreter's code: its shared libpython, else the executable."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
        if os.path.isfile(lib):
            return lib
    return os.path.realpath(sys.executable)


def add_gil_probes() -> None:
    """The uprobes at ``take_gil``'s entry and return (:data:`GIL_EVENTS`), replacing any left behind."""
    remove_gil_probes()
    binary = interpreter_binary()
    add = ["perf", "probe", "-q", "-x", binary, "-a", f"{GIL_GROUP}:gil_in=take_gil"]
    done = subprocess.run(add + ["-a", f"{GIL_GROUP}:gil_out=take_gil%return"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(
            f"--gil could not probe take_gil in {binary} (it needs root, a kernel with uprobes and an "
            f"interpreter with symbols): {done.stderr.strip()}"
        )


def remove_gil_probes() -> None:
    subprocess.run(["perf", "probe", "-q", "-d", f"{GIL_GROUP}:*"], capture_output=True)


def record_gil(path: str) -> subprocess.Popen:
    """``perf record`` on every core of the scheduler's switches and wake-ups and of the GIL probes,
    to ``path``, until sent SIGINT; timestamps on the monotonic clock, so that events on two cores
    compare."""
    events = ["sched:sched_switch", "sched:sched_waking", *GIL_EVENTS]
    return subprocess.Popen(
        ["perf", "record", "-q", "-a", "-k", "mono", *[a for e in events for a in ("-e", e)], "-o", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def blocked_split(script: str) -> Dict[str, float]:
    """The pair threads' blocked seconds and stretches by :data:`BLOCKED_ON`, summed over them, from the
    text of ``perf script -F comm,tid,time,event,trace`` of a :func:`record_gil` recording. A stretch
    starts when a pair thread is switched out in any state but runnable and ends at its wake-up (or,
    if none was recorded, when it runs again); it is on the GIL when the thread was inside
    ``take_gil`` then. Keys: each of :data:`BLOCKED_ON`, and the same with `` stretches``."""
    out = {k: 0.0 for k in BLOCKED_ON}
    out.update({f"{k} stretches": 0 for k in BLOCKED_ON})
    in_gil: Dict[int, bool] = {}
    since: Dict[int, tuple] = {}  # tid -> (start, what it waits for)

    def end(tid: int, t: float) -> None:
        start, on = since.pop(tid)
        out[on] += t - start
        out[f"{on} stretches"] += 1

    for line in script.splitlines():
        m = _SCRIPT_LINE.match(line)
        if not m:
            continue
        comm, tid, t, event, trace = m[1], int(m[2]), float(m[3]), m[4], m[5]
        if event in GIL_EVENTS:
            if comm == THREAD_NAME:
                in_gil[tid] = event == GIL_EVENTS[0]
        elif event == "sched:sched_switch":
            sw = _SWITCH.match(trace)
            if sw is None:
                continue
            prev, state, nxt = int(sw[2]), sw[3], int(sw[5])
            if nxt in since:  # running again without a recorded wake-up
                end(nxt, t)
            if sw[1] == THREAD_NAME and not state.startswith("R"):
                since[prev] = (t, BLOCKED_ON[0] if in_gil.get(prev) else BLOCKED_ON[1])
        elif event == "sched:sched_waking":
            wk = _WAKING.match(trace)
            if wk is not None and int(wk[2]) in since:
                end(int(wk[2]), t)
    return out


def read_gil(path: str) -> Dict[str, float]:
    """:func:`blocked_split` of the recording at ``path``."""
    return blocked_split(perf_script(path, "comm,tid,time,event,trace"))


def sample(steps: int, work: str, interval: float, perf: bool = False, gil: bool = False) -> dict:
    """One training process of the package's policy, watched: its ``train_runtime``, the CPU seconds
    the kernel accounts to the whole process (``process_cpu``; the kinds' sum should come close), the
    kinds, with ``perf`` the pair threads' CPU seconds per :data:`CODE` row (``pair_code``) and with
    ``gil`` their blocked time split by :func:`blocked_split` (``blocked_on``)."""
    out = os.path.join(work, "run")
    recording, gil_recording = os.path.join(work, "perf.data"), os.path.join(work, "gil.data")
    if gil:
        add_gil_probes()
    before = children_cpu()
    proc = start_training("package", steps, out)
    recorder = record_perf(proc.pid, recording) if perf else None
    gil_recorder = record_gil(gil_recording) if gil else None
    try:
        threads = watch(proc, interval)
        process_cpu = children_cpu() - before  # before perf ends: its own CPU time is not the process's
        if recorder is not None and recorder.wait():
            raise RuntimeError(f"perf record exited with code {recorder.returncode}")
        if gil_recorder is not None:
            gil_recorder.send_signal(signal.SIGINT)  # it records every core: it ends when told
            # perf writes its file, then dies of the signal it was sent (its way to pass it on)
            if gil_recorder.wait() not in (0, -signal.SIGINT):
                raise RuntimeError(f"perf record (--gil) exited with code {gil_recorder.returncode}")
        if proc.returncode:
            raise RuntimeError(f"the training process exited with code {proc.returncode}")
        result = {"train_runtime": runtime(out), "process_cpu": process_cpu, "kinds": summarise(proc.pid, threads)}
        if perf:
            result["pair_code"] = read_perf(recording)
        if gil:
            result["blocked_on"] = read_gil(gil_recording)
        return result
    finally:
        for rec in (recorder, gil_recorder):
            if rec is not None and rec.poll() is None:
                rec.kill()
                rec.wait()
        for path in (recording, gil_recording):
            if os.path.exists(path):
                os.remove(path)
        if gil:
            remove_gil_probes()


def medians(samples: List[dict]) -> dict:
    """The median of every number of the samples of one load (a code row a sample lacks counts 0;
    ``pair_code_total`` is the median of the samples' totals, not the sum of the rows' medians)."""
    out = {
        "train_runtime": median([s["train_runtime"] for s in samples]),
        "process_cpu": median([s["process_cpu"] for s in samples]),
        "kinds": {k: {f: median([s["kinds"][k][f] for s in samples]) for f in samples[0]["kinds"][k]} for k in KINDS},
    }
    if all("pair_code" in s for s in samples):
        rows = [row for row, _, _ in CODE] + [OTHER_CODE]
        out["pair_code"] = {row: median([s["pair_code"].get(row, 0.0) for s in samples]) for row in rows}
        out["pair_code_total"] = median([sum(s["pair_code"].values()) for s in samples])
    if all("blocked_on" in s for s in samples):
        out["blocked_on"] = {k: median([s["blocked_on"][k] for s in samples]) for k in samples[0]["blocked_on"]}
    return out


def write(out: str, steps: int, cells: List[dict], commands: List[str]) -> None:
    """The JSON (every sample) and Markdown (medians) of the loads measured so far."""
    result = {"commands": commands, "machine": machine_info("cpu"), "steps": steps, "cells": cells}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    cpus = result["machine"]["cpu_cores"]
    done = [(c["competitors"], medians(c["samples"])) for c in cells if c["samples"]]
    alone = next((m for load, m in done if load == 0), None)
    md = markdown_header("Where a CPU training step's time goes, per thread", commands, result["machine"]) + [
        f"{steps} SparsePO steps of the sentiment recipe (SmolLM2-135M-Instruct, 4-bit + LoRA) with the package "
        "as it comes, beside N other processes running 2-thread GEMMs; the kernel's per-thread scheduler "
        "statistics, read while it ran, summed per kind of thread, the median over the samples. CPU: seconds on "
        "a core; waiting: runnable, waiting for a core; blocked: neither (the GIL, another thread, asleep); "
        "share: CPU / (CPU + waiting), the part of a core a thread got while runnable; equal share: what an even "
        "scheduler gives each of two always-runnable threads. The main thread's times include the model load, "
        "the pair threads live from the first step to the end of training.",
        "",
        "| competitors | train_runtime s | slowdown | thread | threads | CPU s | CPU against alone | waiting s | "
        "blocked s | share | equal share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load, m in done:
        slow = f"{m['train_runtime'] / alone['train_runtime']:.2f}x" if alone else "-"
        for k in KINDS:
            r = m["kinds"][k]
            if not r["threads"]:
                continue
            runnable = r["cpu"] + r["waiting"]
            cpu_ratio = f"{r['cpu'] / alone['kinds'][k]['cpu']:.2f}x" if alone and alone["kinds"][k]["cpu"] else "-"
            md.append(
                f"| {load} | {m['train_runtime']:.1f} | {slow} | {k} | {r['threads']:g} | {r['cpu']:.2f} | {cpu_ratio} "
                f"| {r['waiting']:.2f} | {r['blocked']:.2f} | {r['cpu'] / runnable if runnable else 0:.2f} "
                f"| {equal_share(cpus, load):.2f} |"
            )
    md += [
        "",
        "The whole process's CPU seconds as the kernel accounts them (every thread, the short-lived ones "
        "too), against alone, and the sum of the kinds above (a thread that lived less than one reading "
        "interval is missing from it):",
        "",
        "| competitors | process CPU s | against alone | the kinds' sum s |",
        "|---|---|---|---|",
    ]
    for load, m in done:
        ratio = f"{m['process_cpu'] / alone['process_cpu']:.2f}x" if alone else "-"
        kinds_sum = sum(m["kinds"][k]["cpu"] for k in KINDS)
        md.append(f"| {load} | {m['process_cpu']:.1f} | {ratio} | {kinds_sum:.1f} |")
    md += code_table(done, alone)
    md += blocked_table(done)
    write_markdown(out + ".md", md)


def code_table(done: List[tuple], alone: Optional[dict]) -> List[str]:
    """The Markdown of the pair threads' CPU seconds per :data:`CODE` row at each load (``--perf``),
    each against alone and less alone; nothing when the samples were not profiled."""
    done = [(load, m) for load, m in done if "pair_code" in m]
    if not done:
        return []
    base = alone.get("pair_code") if alone else None
    md = [
        "",
        f"The pair threads' CPU seconds by the code they ran in (`perf record -e cpu-clock -F {PERF_HZ}`, "
        "the median over the samples; all: the median of the samples' totals), against alone and the CPU "
        "seconds more than alone: where the same work needed more CPU beside the competitors:",
        "",
        "| code | " + " | ".join(f"{load} competitors: s | against alone | more s" for load, _ in done) + " |",
        "|---|" + "---|---|---|" * len(done),
    ]
    for row in [row for row, _, _ in CODE] + [OTHER_CODE, "all"]:
        cells = []
        for _, m in done:
            v = m["pair_code_total"] if row == "all" else m["pair_code"][row]
            b = (alone["pair_code_total"] if row == "all" else base[row]) if base else None
            cells.append(f"{v:.2f} | {v / b:.2f}x | {v - b:+.2f}" if b else f"{v:.2f} | - | -")
        md.append(f"| {row} | " + " | ".join(cells) + " |")
    return md


def blocked_table(done: List[tuple]) -> List[str]:
    """The Markdown of the pair threads' blocked time split by :data:`BLOCKED_ON` at each load
    (``--gil``), beside the blocked time the scheduler statistics give; nothing when not recorded."""
    done = [(load, m) for load, m in done if "blocked_on" in m]
    if not done:
        return []
    md = [
        "",
        "The pair threads' blocked time split by what they waited for (`--gil`: the scheduler's switches "
        "and wake-ups on every core and a probe on the interpreter's `take_gil`; the median over the "
        "samples, summed over the pair threads): the GIL, which the other pair thread held, or anything "
        "else (the main thread's serial part between the shards' phases, the other shard finishing). "
        "Stretches: how many times a pair thread fell asleep for it. The probes slow the training "
        "process, so the runtimes here are longer than without them:",
        "",
        "| competitors | train_runtime s | blocked s (scheduler statistics) | "
        + " | ".join(f"{k} s | stretches" for k in BLOCKED_ON)
        + " |",
        "|---|---|---|" + "---|---|" * len(BLOCKED_ON),
    ]
    for load, m in done:
        b = m["blocked_on"]
        cells = " | ".join(f"{b[k]:.2f} | {b[f'{k} stretches']:.0f}" for k in BLOCKED_ON)
        md.append(f"| {load} | {m['train_runtime']:.1f} | {m['kinds']['pair threads']['blocked']:.2f} | {cells} |")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 2], help="competing 2-thread processes")
    ap.add_argument("--repeats", type=int, default=3, help="samples per load")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between readings")
    ap.add_argument("--perf", action="store_true", help="also sort the pair threads' CPU time by code (needs perf)")
    ap.add_argument(
        "--gil", action="store_true", help="also split the pair threads' blocked time: the GIL or else (needs perf)"
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_thread_share"))
    a = ap.parse_args()
    if not os.path.isdir("/proc/self/task") or not os.path.isfile("/proc/self/schedstat"):
        sys.exit("this bench reads Linux's per-thread scheduler statistics (/proc/<pid>/task/<tid>/schedstat)")
    for flag in ("perf", "gil"):
        if getattr(a, flag) and shutil.which("perf") is None:
            sys.exit(f"--{flag} needs Linux perf on the PATH (the linux-perf package)")
    commands, cells = [command_line()], [{"competitors": load, "samples": []} for load in a.loads]
    work = tempfile.mkdtemp(prefix="bench_thread_share_")
    try:
        for _ in range(a.repeats):
            for cell in cells:
                busy = start_competitors(cell["competitors"])
                try:
                    time.sleep(2 if cell["competitors"] else 0)
                    cell["samples"].append(sample(a.steps, work, a.interval, a.perf, a.gil))
                finally:
                    stop_competitors(busy)
                print(json.dumps({"competitors": cell["competitors"], **cell["samples"][-1]}), flush=True)
                write(a.out, a.steps, cells, commands)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}.json, {a.out}.md")


if __name__ == "__main__":
    main()
