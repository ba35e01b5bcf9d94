"""OpenMP waiting (sparsepo_lite/waits.py): importing the package picks passive waits when other
runnable threads would oversubscribe the cores (a CPU step beside busy processes collapses
otherwise) and keeps libgomp's faster spinning default on a quiet machine; an explicit setting and
the SPARSEPO_LITE_OMP_PASSIVE switch win."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sparsepo_lite.waits import choose_wait_policy, cpus_available, other_runnable_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "import os, sparsepo_lite; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
CPUS = cpus_available()


@pytest.mark.parametrize(
    "env, busy, expected",
    [
        ({}, 0, None),  # quiet: libgomp's default
        ({}, 1, "PASSIVE"),  # one more runnable thread than free cores
        ({"OMP_NUM_THREADS": "1"}, CPUS - 1, None),  # our one thread still fits
        ({"OMP_NUM_THREADS": "1"}, CPUS, "PASSIVE"),
        ({}, None, None),  # load unknown (no /proc/loadavg)
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 5, "ACTIVE"),  # the user's choice is kept
        ({"SPARSEPO_LITE_OMP_PASSIVE": "1"}, 0, "PASSIVE"),
        ({"SPARSEPO_LITE_OMP_PASSIVE": "0"}, 5, None),
    ],
)
def test_choice(env, busy, expected):
    environ = dict(env)
    reason = choose_wait_policy(environ, others=lambda: busy)
    assert environ.get("OMP_WAIT_POLICY") == expected
    assert reason and (expected is None or expected in reason)


def test_runnable_threads_are_read_from_the_machine():
    n = other_runnable_threads(samples=2, interval_s=0.001)
    assert n is None or n >= 0


def _import_in_subprocess(env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SPARSEPO_LITE_OMP_PASSIVE")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_import_beside_busy_processes_waits_passively():
    """Real competitors: CPU-bound processes, one per core, running while the package is imported."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(CPUS)]
    try:
        time.sleep(0.5)
        assert _import_in_subprocess({}) == "PASSIVE"
        assert _import_in_subprocess({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
        assert _import_in_subprocess({"SPARSEPO_LITE_OMP_PASSIVE": "0"}) == "<unset>"
    finally:
        for p in busy:
            p.kill()
            p.wait()
