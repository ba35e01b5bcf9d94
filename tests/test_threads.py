"""OpenMP waiting (sparsepo_lite/waits.py): importing the package picks passive waits when other
runnable threads would oversubscribe the cores (a CPU step beside busy processes collapses
otherwise) and short spins on a quiet machine (as fast alone as libgomp's long default, and no
collapse when a load comes later); an explicit setting and the SPARSEPO_LITE_OMP_PASSIVE switch win.
The spin count is read as libgomp reads it, and only long spins bring in the trainer's load guard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparsepo_lite.waits import (
    SHORT_SPINS,
    LoadGuard,
    choose_wait_policy,
    cpu_load_guard,
    cpus_available,
    other_runnable_now,
    other_runnable_threads,
    our_running_threads,
    spin_count,
    waits_spin_long,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import os, sparsepo_lite\n"
    "print(os.environ.get('OMP_WAIT_POLICY', '<unset>'), os.environ.get('GOMP_SPINCOUNT', '<unset>'))"
)
SHORT = str(SHORT_SPINS)
CPUS = cpus_available()


@pytest.mark.parametrize(
    "env, busy, policy, spins",
    [
        ({}, 0, None, SHORT),  # quiet: short spins
        ({}, 1, "PASSIVE", None),  # one more runnable thread than free cores
        ({"OMP_NUM_THREADS": "1"}, CPUS - 1, None, SHORT),  # our one thread still fits
        ({"OMP_NUM_THREADS": "1"}, CPUS, "PASSIVE", None),
        ({}, None, None, SHORT),  # load unknown (no /proc/loadavg)
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 5, "ACTIVE", None),  # the user's choices are kept
        ({"GOMP_SPINCOUNT": "10k"}, 5, None, "10k"),
        ({"GOMP_SPINCOUNT": "0"}, 0, None, "0"),
        ({"SPARSEPO_LITE_OMP_PASSIVE": "1"}, 0, "PASSIVE", None),
        ({"SPARSEPO_LITE_OMP_PASSIVE": "0"}, 5, None, None),  # libgomp's own default, long spins
        ({"SPARSEPO_LITE_OMP_PASSIVE": "0"}, 0, None, None),
    ],
)
def test_choice(env, busy, policy, spins):
    environ = dict(env)
    reason = choose_wait_policy(environ, others=lambda: busy, loaded=lambda: False)
    assert (environ.get("OMP_WAIT_POLICY"), environ.get("GOMP_SPINCOUNT")) == (policy, spins)
    assert reason and ((policy or spins) is None or (policy or spins) in reason)


@pytest.mark.parametrize(
    "env, said", [({}, "300000 spins: long spins"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "0 spins: short spins")]
)
def test_choice_leaves_the_environment_alone_once_libgomp_is_loaded(env, said):
    """libgomp read its settings when it loaded: setting them now would change nothing but what the
    environment says, and the trainer's load guard reads the environment to know the waits in effect."""
    environ = dict(env)
    reason = choose_wait_policy(environ, others=lambda: 5, loaded=lambda: True)
    assert environ == env and said in reason and "import sparsepo_lite before torch" in reason
    assert waits_spin_long(environ) == (said.startswith("300000"))


def test_importing_torch_first_keeps_libgomps_waits_and_says_so():
    probe = (
        "import torch\n"
        + PROBE
        + "\nprint(sparsepo_lite.OMP_WAIT_DECISION)\nprint(sparsepo_lite.waits.waits_spin_long())"
    )
    out = _run_in_subprocess(probe, {})
    assert out[-3] == "<unset> <unset>" and "loaded before this package" in out[-2] and out[-1] == "True"
    assert _run_in_subprocess(PROBE, {})[-1] in ("PASSIVE <unset>", f"<unset> {SHORT}")  # the package first


def test_runnable_threads_are_read_from_the_machine():
    n = other_runnable_threads(samples=2, interval_s=0.001)
    assert n is None or n >= 0


def test_our_running_threads_count_the_caller():
    n = our_running_threads()
    assert n is None or n >= 1  # this thread is running while it reads
    m = other_runnable_now()
    assert m is None or m >= 0


@pytest.mark.parametrize(
    "env, spins",
    [
        ({}, 300_000),  # libgomp's defaults by policy
        ({"OMP_WAIT_POLICY": "passive "}, 0),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 30e9),
        ({"GOMP_SPINCOUNT": "2000"}, 2000),  # the count wins over the policy
        ({"GOMP_SPINCOUNT": " 3 K ", "OMP_WAIT_POLICY": "PASSIVE"}, 3000),
        ({"GOMP_SPINCOUNT": "2m"}, 2e6),
        ({"GOMP_SPINCOUNT": "1G"}, 1e9),
        ({"GOMP_SPINCOUNT": "Infinity"}, float("inf")),
        ({"GOMP_SPINCOUNT": "-5", "OMP_WAIT_POLICY": "PASSIVE"}, 0),  # rejected by libgomp: as if unset
        ({"GOMP_SPINCOUNT": "2000x"}, 300_000),
        ({"GOMP_SPINCOUNT": ""}, 300_000),
    ],
)
def test_spin_count_is_read_as_libgomp_reads_it(env, spins):
    assert spin_count(env) == spins


def test_only_long_spins_count_as_spinning():
    assert waits_spin_long({}) and waits_spin_long({"OMP_WAIT_POLICY": "ACTIVE"})
    assert waits_spin_long({"GOMP_SPINCOUNT": str(SHORT_SPINS + 1)})
    assert not waits_spin_long({"GOMP_SPINCOUNT": SHORT})
    assert not waits_spin_long({"OMP_WAIT_POLICY": "PASSIVE"})


def guard_with(readings, threads=2, cpus=2, quiet_checks=3, samples=1):
    seq = iter(readings)
    return LoadGuard(threads, cpus, quiet_checks=quiet_checks, samples=samples, interval_s=0, others=lambda: next(seq))


def test_guard_drops_at_once_and_restores_after_quiet_checks_in_a_row():
    #            quiet  busy  busy  quiet quiet busy  quiet quiet quiet quiet
    g = guard_with([0, 1, 3, 0, 0, 2, 0, 0, 0, 0])
    assert [g.check() for _ in range(10)] == [None, 1, None, None, None, None, None, None, 2, None]
    assert g.current == 2


def test_guard_reads_several_samples_each_check():
    # dropping needs every read busy (a blip is not a load); restoring needs every read quiet
    g = guard_with([3, 0, 3, 3, 3, 3], samples=3, quiet_checks=1)
    assert g.check() is None and g.check() == 1
    g = guard_with([3, 3, 3, 0, 0, 1, 0, 0, 0], samples=3, quiet_checks=1)
    assert g.check() == 1 and g.check() is None and g.check() == 2


def test_guard_leaves_room_for_our_threads():
    g = guard_with([2, 3], threads=2, cpus=4)  # 2 others + our 2 fit on 4 cores; 3 do not
    assert g.check() is None and g.check() == 1


def test_guard_gives_up_when_the_load_cannot_be_read():
    assert guard_with([None]).check() is None


def test_guard_applies_its_choice_to_torch_and_says_so(caplog):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = guard_with([3, 0, 0, 3])
        with caplog.at_level("WARNING", logger="sparsepo_lite.waits"):
            g.apply("step 4")
            assert torch.get_num_threads() == 1
            assert "step 4: other processes oversubscribe the CPU cores; torch now runs on 1 thread(s)" in caplog.text
            g.apply("step 5")
            g.apply("step 6")
            assert torch.get_num_threads() == 1 and g.current == 1
        g.restore()  # the work is over: all threads, whatever the load
        assert torch.get_num_threads() == 2 and g.current == 2
        g.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "env, threads, guarded",
    [({}, 2, True), ({"GOMP_SPINCOUNT": "2000"}, 2, False), ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, False), ({}, 1, False)],
)
def test_a_guard_only_where_threads_spin_long_and_torch_has_several(monkeypatch, env, threads, guarded):
    import torch

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        guard = cpu_load_guard()
        assert (guard is not None) == guarded
        if guard is not None:
            assert (guard.threads, guard.cpus) == (threads, cpus_available())
    finally:
        torch.set_num_threads(before)


def _run_in_subprocess(code, env):
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SPARSEPO_LITE_OMP_PASSIVE")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()


def _import_in_subprocess(env):
    return _run_in_subprocess(PROBE, env)[-1]


def _spinners(n):
    """``n`` CPU-bound processes, returned once each is spinning (a fixed sleep can end before a slow start)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "print('up', flush=True)\nwhile True: pass"], stdout=subprocess.PIPE)
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout.readline() == b"up\n"
    return procs


def _stop(procs):
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()


@pytest.mark.slow
def test_import_beside_busy_processes_waits_passively():
    """Real competitors: CPU-bound processes, one per core, running while the package is imported."""
    busy = _spinners(CPUS)
    try:
        assert _import_in_subprocess({}) == "PASSIVE <unset>"
        assert _import_in_subprocess({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE <unset>"
        assert _import_in_subprocess({"SPARSEPO_LITE_OMP_PASSIVE": "0"}) == "<unset> <unset>"
    finally:
        _stop(busy)


@pytest.mark.slow
def test_guard_sees_real_busy_processes():
    busy = _spinners(CPUS)
    try:
        assert LoadGuard(2, CPUS).check() == 1
    finally:
        _stop(busy)
