"""How this process's OpenMP threads wait between parallel regions, chosen once at import.

libgomp (used by torch, bitsandbytes and the extension) lets an idle thread spin for a few
milliseconds before it sleeps. Alone on its cores that is the fastest choice: a step of the CPU
sentiment recipe takes 20-30% longer when threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) and
must be woken for each of its thousands of short parallel regions. Beside other busy processes it is
the slowest by far: a spinning thread holds a core while the sibling it waits for has been
preempted, so each region waits out a time slice: the step ran 13x slower beside two busy 2-thread
processes, 2.8x with passive waits (3x is the equal share). bench/results/cpu_contention.md has the
numbers.

So the choice follows the machine's load when the package is imported, which has to happen before
torch loads libgomp (libgomp reads the policy once): passive waits when other runnable threads would
oversubscribe the cores this process's threads use, libgomp's default otherwise.

A load that starts after the import finds the threads spinning. For that case :class:`LoadGuard`
looks at the load again at every training step (the trainer's ``cpu_load_guard``) and, while the
machine is oversubscribed, runs torch on one thread: with no sibling to wait for, spinning costs
nothing, and the step takes about 4.9x its time alone beside two busy 2-thread processes instead of
13x (passive waits with two threads, which the import chooses, do better still: one thread gets a
smaller share of the cores than two). It restores the threads once the load has gone.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, MutableMapping, Optional

#: 1: always passive waits; 0: always libgomp's default; unset or "auto": follow the load at import.
SWITCH = "SPARSEPO_LITE_OMP_PASSIVE"


def other_runnable_threads(samples: int = 5, interval_s: float = 0.01) -> Optional[int]:
    """Runnable threads on this machine besides the caller, the fewest over ``samples`` reads of
    /proc/loadavg ``interval_s`` apart (so that a short-lived task does not count); None where
    /proc/loadavg cannot be read."""
    seen = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        seen.append(running - 1)  # the reading thread itself is running
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, min(seen))


def our_running_threads() -> Optional[int]:
    """This process's threads that are running or runnable now (state R in /proc/self/task), or None
    where that cannot be read."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    running = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                # the state follows the command name, which is in brackets and may hold spaces
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue  # the thread has just ended
    return running


def other_runnable_now() -> Optional[int]:
    """Runnable threads on this machine outside this process, from one read of /proc/loadavg and of
    this process's threads; None where either cannot be read."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    ours = our_running_threads()
    return None if ours is None else max(0, running - ours)


class LoadGuard:
    """Runs torch on one thread while the machine is oversubscribed, for a process whose OpenMP
    threads spin (the import found the machine quiet); :meth:`check` is called between training steps.

    ``threads``: this process's thread count when quiet; ``cpus``: the cores it may use. A check reads
    the load ``samples`` times ``interval_s`` apart. It drops to one thread as soon as every read sees
    more runnable threads than cores, since one step with spinning threads under load costs tens of
    steps' time; it restores ``threads`` only after ``quiet_checks`` checks in a row in which no read
    did, since a wrong restore costs that much again.
    """

    def __init__(
        self,
        threads: int,
        cpus: int,
        quiet_checks: int = 3,
        samples: int = 3,
        interval_s: float = 0.002,
        others: Callable[[], Optional[int]] = other_runnable_now,
    ):
        self.threads, self.cpus, self.quiet_checks = threads, cpus, quiet_checks
        self.samples, self.interval_s, self.others = samples, interval_s, others
        self.current = threads
        self.quiet = 0

    def check(self) -> Optional[int]:
        """The thread count to switch to now, or None to keep the current one."""
        seen = []
        for i in range(self.samples):
            n = self.others()
            if n is None:
                return None
            seen.append(n)
            if i + 1 < self.samples:
                time.sleep(self.interval_s)
        if self.current == self.threads:
            if min(seen) + self.threads > self.cpus:
                self.current, self.quiet = 1, 0
                return 1
            return None
        self.quiet = self.quiet + 1 if max(seen) + self.threads <= self.cpus else 0
        if self.quiet >= self.quiet_checks:
            self.current = self.threads
            return self.threads
        return None


def waits_spin(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether this process's OpenMP threads spin between parallel regions (libgomp's default)."""
    return environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_wait_policy(
    environ: MutableMapping[str, str] = os.environ,
    others: Callable[[], Optional[int]] = other_runnable_threads,
) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when passive waits are the better choice;
    return the decision and its reason, for the logs. An explicit ``OMP_WAIT_POLICY`` is kept."""
    late = " (torch was imported first, so libgomp had already read the policy)" if "torch" in sys.modules else ""
    return _decide(environ, others) + late


def _decide(environ, others) -> str:
    if environ.get("OMP_WAIT_POLICY"):
        return f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']} (set by the user)"
    switch = environ.get(SWITCH, "auto").strip().lower()
    if switch == "1":
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({SWITCH}=1)"
    if switch == "0":
        return f"libgomp's default waits ({SWITCH}=0)"
    cpus = cpus_available()
    try:
        ours = max(1, int(environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        ours = cpus
    busy = others()
    if busy is None:
        return "libgomp's default waits (the machine's load is unknown)"
    if busy + ours > cpus:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({busy} other runnable threads + {ours} of ours > {cpus} CPUs at import)"
    return f"libgomp's default waits ({busy} other runnable threads + {ours} of ours <= {cpus} CPUs at import)"
