"""How this process's OpenMP threads wait between parallel regions, chosen once at import.

libgomp (used by torch, bitsandbytes and the extension) lets an idle thread spin for a few
milliseconds before it sleeps. Alone on its cores that is the fastest choice: a step of the CPU
sentiment recipe takes about 14% longer when threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) and
must be woken for each of its thousands of short parallel regions. Beside other busy processes it is
the slowest by far: a spinning thread holds a core while the sibling it waits for has been
preempted, so each region waits out a time slice: the step ran 27x slower beside two busy 2-thread
processes, 3.4x with passive waits (3x is the fair share). bench/results/cpu_contention.md has the
numbers.

So the choice follows the machine's load when the package is imported, which has to happen before
torch loads libgomp (libgomp reads the policy once): passive waits when other runnable threads would
oversubscribe the cores this process's threads use, libgomp's default otherwise. A load that starts
later is not seen: on a shared machine set ``SPARSEPO_LITE_OMP_PASSIVE=1``.
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
