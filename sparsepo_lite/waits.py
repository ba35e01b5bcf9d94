"""How this process's OpenMP threads wait between parallel regions, chosen once at import.

libgomp (used by torch, bitsandbytes and the extension) lets an idle thread spin before it sleeps:
300000 spins by default, several milliseconds. Alone on its cores spinning is the fastest choice: a
step of the CPU sentiment recipe takes 20-30% longer when threads sleep at once
(``OMP_WAIT_POLICY=PASSIVE``) and must be woken for each of its ~10,000 short parallel regions.
Beside other busy processes long spins are the slowest by far: a spinning thread holds a core
while the sibling it waits for has been preempted, so each region waits out a time slice: the step
ran 13-16x slower beside two busy 2-thread processes, 3.2-3.7x with passive waits (3x is the
equal share). bench/results/cpu_contention*.md have the numbers.

A short spin is nearly both: :data:`SHORT_SPINS` (about 50 us here) covers the gap between one
region and the next, so alone a step is as fast as with the default, and it bounds what a region
can waste on a preempted sibling, so under load a step takes 1.05-1.25x passive waits' time. So the
import, which has to happen before torch loads libgomp (libgomp reads its settings once), picks
passive waits when other runnable threads already oversubscribe the cores this process's threads
use, and short spins otherwise: a load that starts later finds threads that do not collapse.

The choice needs the import to come first: a process that imported torch before this package
keeps libgomp's own waits, so nothing is set then, and the environment still tells the trainer that
its threads spin long, which brings in the load guard below.

The trainer's CPU step mostly sidesteps this: it runs shards of a micro-batch's pairs on threads, each
with torch on one thread (training/pair_threads.py), so the step's own ops open no parallel region;
the waits still govern everything else (the optimizer step, evaluation outside the trainer,
generation, the reference precompute).

:class:`LoadGuard` is for a process whose threads spin long anyway (torch imported first,
``SPARSEPO_LITE_OMP_PASSIVE=0``, ``OMP_WAIT_POLICY=ACTIVE`` or a long ``GOMP_SPINCOUNT``): with
the ``cpu_load_guard`` setting on, the trainer looks at the load at every step and, while the machine is
oversubscribed, runs torch on one thread, which has no sibling to wait for; the pair shards keep
their threads, which open no parallel region. It restores the threads once the load has gone. The
reference precompute checks the same guard before each batch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Callable, Mapping, MutableMapping, Optional

logger = logging.getLogger(__name__)

#: 1: always passive waits; 0: always libgomp's default; unset or "auto": passive waits when the
#: machine is busy at import, :data:`SHORT_SPINS` otherwise.
SWITCH = "SPARSEPO_LITE_OMP_PASSIVE"
#: ``GOMP_SPINCOUNT`` on a quiet machine: 2000 pause loops, ~50 us on the 2-core EPYC the bench ran
#: on. 1000-2000 were as fast alone as libgomp's 300000 and 200 was not; beside two busy processes
#: 2000 took 1.05-1.25x passive waits' time, 5000 1.46x, 20000 2.2x (bench/results/cpu_spin_counts.md).
SHORT_SPINS = 2000
#: libgomp's spin counts when ``GOMP_SPINCOUNT`` is not set, by ``OMP_WAIT_POLICY``.
_POLICY_SPINS = {"PASSIVE": 0, "ACTIVE": 30_000_000_000}
_DEFAULT_SPINS = 300_000
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


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
    threads spin long (:func:`waits_spin_long`); :meth:`check` (or :meth:`apply`) is called between
    units of work: the trainer's steps, the reference precompute's batches.

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

    def apply(self, where: str) -> None:
        """:meth:`check`, and run torch on the thread count it returns; ``where`` (say "step 12")
        names the moment in the warning that says so."""
        threads = self.check()
        if threads is None:
            return
        import torch

        torch.set_num_threads(threads)
        reason = "other processes oversubscribe the CPU cores" if threads == 1 else "the CPU load has gone"
        logger.warning("%s: %s; torch now runs on %d thread(s)", where, reason, threads)

    def restore(self) -> None:
        """Run torch on ``threads`` again, whatever the load (the guarded work is over)."""
        if self.current != self.threads:
            import torch

            torch.set_num_threads(self.threads)
            self.current = self.threads


def cpu_load_guard() -> Optional[LoadGuard]:
    """A :class:`LoadGuard` for this process's CPU work where one can help (its OpenMP threads spin
    long and torch runs on more than one thread), else None."""
    import torch

    if not waits_spin_long() or torch.get_num_threads() < 2:
        return None
    return LoadGuard(torch.get_num_threads(), cpus_available())


def spin_count(environ: Mapping[str, str] = os.environ) -> float:
    """The spins libgomp makes before an idle thread sleeps, read from ``environ`` as libgomp reads
    it: ``GOMP_SPINCOUNT`` (an integer with an optional k/M/G/T suffix, or "infinite"), else by
    ``OMP_WAIT_POLICY``. A value libgomp would reject counts as unset."""
    raw = environ.get("GOMP_SPINCOUNT", "")
    if re.fullmatch(r"\s*infinit[ey]\s*", raw, re.IGNORECASE):
        return float("inf")
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)\s*", raw, re.IGNORECASE)
    if m:
        return float(int(m[1]) * _SUFFIXES.get(m[2].lower(), 1))
    return float(_POLICY_SPINS.get(environ.get("OMP_WAIT_POLICY", "").strip().upper(), _DEFAULT_SPINS))


def waits_spin_long(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's OpenMP threads spin longer than :data:`SHORT_SPINS`, the waits that
    collapse under oversubscription."""
    return spin_count(environ) > SHORT_SPINS


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def libgomp_loaded() -> bool:
    """Whether libgomp is already loaded in this process (it then has read its settings for good):
    from /proc/self/maps, else whether torch has been imported."""
    try:
        with open("/proc/self/maps") as f:
            return any("/libgomp" in line for line in f)
    except OSError:
        return "torch" in sys.modules


def choose_wait_policy(
    environ: MutableMapping[str, str] = os.environ,
    others: Callable[[], Optional[int]] = other_runnable_threads,
    loaded: Callable[[], bool] = libgomp_loaded,
) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when the machine is busy, ``GOMP_SPINCOUNT`` to
    :data:`SHORT_SPINS` when it is quiet; return the decision and its reason, for the logs. An
    explicit ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept.

    When libgomp is already loaded (torch imported before this package) nothing is set: libgomp would
    ignore it, and ``environ`` then still says which waits are in effect, which
    :func:`waits_spin_long` and so the trainer's load guard read."""
    if loaded():
        spins = spin_count(environ)
        kind = "long spins" if spins > SHORT_SPINS else "short spins or passive waits"
        return (
            f"libgomp's waits as it read them ({spins:g} spins: {kind}); it was loaded before this package "
            "(torch imported first), so they cannot be changed; import sparsepo_lite before torch to choose them"
        )
    return _decide(environ, others)


def _decide(environ, others) -> str:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if environ.get(name):
            return f"{name}={environ[name]} (set by the user)"
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
    if busy is not None and busy + ours > cpus:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({busy} other runnable threads + {ours} of ours > {cpus} CPUs at import)"
    environ["GOMP_SPINCOUNT"] = str(SHORT_SPINS)
    if busy is None:
        return f"GOMP_SPINCOUNT={SHORT_SPINS} (the machine's load is unknown)"
    return f"GOMP_SPINCOUNT={SHORT_SPINS} ({busy} other runnable threads + {ours} of ours <= {cpus} CPUs at import)"
