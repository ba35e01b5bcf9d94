"""bench/bench_contention.py's bookkeeping: the samples of every cell are kept, the tables report
medians, their range and the slowdown against the same policy alone, and a cell a run did not
measure says so."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def bench():
    return bench_module("bench_contention")


def test_median(bench):
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_tables_report_medians_and_slowdowns(bench, tmp_path):
    cells = [
        {
            "competitors": 0,
            "passive": [10.0, 12.0, 11.0],
            "default": [10.0, 9.0, 30.0],
            "cpu": {"passive": [20.0, 22.0, 21.0], "default": [20.0, 20.0, 21.0]},
            "loop_rate": 3e7,
            "loop2_rate": 2.8e7,
        },
        {
            "competitors": 2,
            "passive": [33.0],
            "default": [130.0],
            "cpu": {"passive": [23.1], "default": [60.0]},
            "loop_rate": 1.2e7,
            "loop2_rate": 1e7,
        },
        {"competitors": 3, "passive": [44.0]},
    ]
    out = str(tmp_path / "c")
    bench.write(out, 6, cells, ["python bench/bench_contention.py"])
    with open(out + ".json") as f:
        result = json.load(f)
    assert result["cells"] == cells and result["alone_median"] == {"passive": 11.0, "default": 10.0}
    md = open(out + ".md").read()
    cpus = result["machine"]["cpu_cores"]
    header = (
        "| competitors | share: {} threads | 1-thread loop | 2-thread loop | PASSIVE: s | slowdown "
        "| libgomp default: s | slowdown |"
    )
    assert header.format(cpus) in md  # no package column
    assert "| 0 | 1.00x | 1.00x | 1.00x | 11.0 (10.0-12.0, n = 3) | 1.00x | 10.0 (9.0-30.0, n = 3) | 1.00x |" in md
    assert f"| 2 | {bench.share(cpus, 2, cpus):.2f}x | 2.50x | 2.80x | 33.0 | 3.00x | 130.0 | 13.00x |" in md
    assert f"| 3 | {bench.share(cpus, 3, cpus):.2f}x | - | - | 44.0 | 4.00x | not run | - |" in md
    assert "Alone, PASSIVE takes 1.100x libgomp's default (medians)." in md
    # CPU seconds: medians against the same policy alone; a load without CPU readings says so
    assert "| PASSIVE: CPU s | against alone | libgomp default: CPU s | against alone |" in md
    assert "| 0 | 21.0 | 1.00x | 20.0 | 1.00x |" in md
    assert "| 2 | 23.1 | 1.10x | 60.0 | 3.00x |" in md
    assert "| 3 | not run | - | not run | - |" in md


def test_share_is_the_equal_split_of_the_cores(bench):
    # two threads beside N 2-thread processes on two cores: (2 + 2N) runnable threads share 2 cores
    assert [bench.share(2, n, 2) for n in range(4)] == [1.0, 2.0, 3.0, 4.0]
    # one thread alone already has its core; beside N processes it gets 2 / (1 + 2N) of one
    assert [bench.share(1, n, 2) for n in range(4)] == [1.0, 1.5, 2.5, 3.5]
    assert bench.share(2, 1, 8) == 1.0  # room to spare


def test_every_policy_runs_under_load_but_spinning_only_once(bench, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train_seconds", lambda policy, steps, work: calls.append(policy) or (1.0, 2.0))
    monkeypatch.setattr(bench, "start_competitors", lambda n: [])
    monkeypatch.setattr(bench, "loop_rate", lambda seconds, processes=1: calls.append(f"loop{processes}") or 1e7)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    argv = ["bench_contention.py", "--policies", "package", "default", "--loads", "2", "--repeats-loaded", "3"]
    monkeypatch.setattr("sys.argv", argv + ["--default-loads", "2", "--out", str(tmp_path / "c")])
    bench.main()
    assert calls == ["package", "default", "package", "package", "loop1", "loop2"]
    with open(tmp_path / "c.json") as f:
        (cell,) = json.load(f)["cells"]
    assert cell["cpu"] == {"package": [2.0, 2.0, 2.0], "default": [2.0]} and cell["loop2_rate"] == 1e7


@pytest.mark.parametrize("fails", [False, True])
def test_the_work_folder_is_removed_after_the_run(bench, tmp_path, monkeypatch, fails):
    folders = []

    def train(policy, steps, work):
        folders.append(work)
        with open(f"{work}/run.log", "w") as f:  # what a training run leaves there
            f.write("x")
        if fails:
            raise RuntimeError("the training process failed")
        return 1.0, 1.0

    monkeypatch.setattr(bench, "train_seconds", train)
    monkeypatch.setattr(bench, "start_competitors", lambda n: [])
    argv = ["bench_contention.py", "--policies", "package", "--loads", "0", "--repeats-alone", "1"]
    monkeypatch.setattr("sys.argv", argv + ["--loop-seconds", "0", "--out", str(tmp_path / "c")])
    if fails:
        with pytest.raises(RuntimeError):
            bench.main()
    else:
        bench.main()
    assert folders and not any(os.path.exists(w) for w in folders)


def test_rounds_visit_every_load_so_that_drift_hits_all_alike(bench, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        bench, "train_seconds", lambda policy, steps, work: seen.append((load[-1], policy)) or (1.0, 1.0)
    )
    load = []
    monkeypatch.setattr(bench, "start_competitors", lambda n: load.append(n) or [])
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    argv = ["bench_contention.py", "--policies", "package", "whole", "--loads", "0", "2", "--repeats-alone", "3"]
    monkeypatch.setattr(
        "sys.argv", argv + ["--repeats-loaded", "2", "--loop-seconds", "0", "--out", str(tmp_path / "c")]
    )
    bench.main()
    assert load == [0, 2, 0, 2, 0]
    assert seen == [
        (0, "package"), (0, "whole"), (2, "package"), (2, "whole"),
        (0, "whole"), (0, "package"), (2, "whole"), (2, "package"),
        (0, "package"), (0, "whole"),
    ]  # fmt: skip


def test_merge_adds_a_policy_to_an_earlier_run(bench, tmp_path, monkeypatch):
    out = str(tmp_path / "c")
    bench.write(out, 6, [{"competitors": 0, "default": [10.0]}, {"competitors": 1, "default": [50.0]}], ["first"])
    seconds = iter([(10.5, 1.0), (20.0, 2.0), (9.0, 3.0)])  # rounds: alone, loaded, alone
    monkeypatch.setattr(bench, "train_seconds", lambda policy, steps, work: next(seconds))
    argv = ["bench_contention.py", "--policies", "package", "--loads", "0", "1", "--repeats-alone", "2"]
    argv += ["--repeats-loaded", "1", "--loop-seconds", "0"]
    monkeypatch.setattr("sys.argv", argv + ["--merge", "--out", out])
    bench.main()
    with open(out + ".json") as f:
        result = json.load(f)
    assert result["commands"][0] == "first" and len(result["commands"]) == 2
    assert result["cells"] == [
        {"competitors": 0, "default": [10.0], "package": [10.5, 9.0], "cpu": {"package": [1.0, 3.0]}},
        {"competitors": 1, "default": [50.0], "package": [20.0], "cpu": {"package": [2.0]}},
    ]
    assert "| 20.0 | 2.05x | 50.0 | 5.00x |" in open(out + ".md").read()


def test_the_loop_measures_a_real_rate_that_competitors_lower(bench):
    """The scheduler control is a real measurement: two competing 2-thread processes take cores from it."""
    alone = bench.loop_rate(1.0)
    busy = bench.start_competitors(2)
    try:
        assert all(p.poll() is None for p in busy)
        loaded = bench.loop_rate(1.0)
        loaded_two = bench.loop_rate(1.0, 2)
    finally:
        bench.stop_competitors(busy)
    assert alone > 0 and loaded < 0.8 * alone, (alone, loaded)
    assert 0 < loaded_two < 0.8 * alone, (alone, loaded_two)
    assert all(p.poll() is not None for p in busy)


def test_train_seconds_reads_the_runtime_and_the_process_cpu_time(bench, tmp_path, monkeypatch):
    """The CPU time is the training process's own, from the kernel, not the bench's."""
    burn = "import sys, time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    metrics = '{"final": {"train_runtime": 4.5}}'
    write = f"import os; os.makedirs({str(tmp_path / 'package')!r}); open({str(tmp_path / 'package' / 'metrics.json')!r}, 'w').write({metrics!r})"
    monkeypatch.setattr(bench, "train_command", lambda policy, steps, out: [sys.executable, "-c", burn + write])
    seconds, cpu = bench.train_seconds("package", 6, str(tmp_path))
    assert seconds == 4.5 and 0.3 <= cpu < 5.0, cpu


def test_a_competitor_that_dies_before_its_gemms_is_an_error(bench, monkeypatch):
    """Measuring "under load" with a competitor that never ran would report a load that was not there."""
    monkeypatch.setattr(bench, "BUSY", "import sys\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="exited with code 3"):
        bench.start_competitors(2)


def test_children_see_only_their_own_policy(bench, monkeypatch):
    """The bench's own import of the package sets libgomp variables; a training process or competitor
    that inherited them would run another policy than its column says."""
    monkeypatch.setenv("GOMP_SPINCOUNT", "2000")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = bench.child_env(bench.POLICIES["default"][0])
    assert "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env and env[bench.SWITCH] == "0"
    assert bench.child_env(bench.POLICIES["late"][0])["GOMP_SPINCOUNT"] == str(bench.SHORT_SPINS)
    assert "GOMP_SPINCOUNT" not in bench.child_env({})


def test_a_spin_count_is_a_policy_of_its_own(bench):
    name = bench.spin_policy(1234)
    assert bench.child_env(bench.POLICIES[name][0])["GOMP_SPINCOUNT"] == "1234"
    assert "--cpu_load_guard" in bench.POLICIES[name][1] and bench.TITLES[name] == "GOMP_SPINCOUNT=1234"


def test_whole_batch_policies_turn_the_pair_threads_off(bench):
    from sparsepo_lite.cli.train import config_parser

    for name, (_, args) in bench.POLICIES.items():
        assert (bench.WHOLE[0] in args) == (name not in ("package", "late", "one_thread", *bench.TORCH_FIRST)), name
    _, _, config = config_parser().parse_args_into_dataclasses(["--output_dir", "x", "--use_cpu", "true", *bench.WHOLE])
    assert config.cpu_pair_threads is False


def test_torch_first_policies_import_torch_before_the_package(bench, tmp_path):
    """Their training process loads libgomp before the package can choose its waits, as a script that
    imports torch first does; the others start the package's own command."""
    import subprocess

    cmd = bench.train_command("torch_first", 2, str(tmp_path))
    assert cmd[1:3] == ["-c", bench.TORCH_FIRST_MAIN] and cmd[3] == "train"
    assert bench.train_command("package", 2, str(tmp_path))[1:4] == ["-m", "sparsepo_lite.cli", "train"]
    assert "--cpu_load_guard" in bench.train_command("torch_first_unguarded", 2, str(tmp_path))
    imports = (
        bench.TORCH_FIRST_MAIN.rsplit("\n", 1)[0] + "\nimport sparsepo_lite\nprint(sparsepo_lite.OMP_WAIT_DECISION)"
    )
    out = subprocess.run(
        [sys.executable, "-c", imports], capture_output=True, text=True, check=True, env=bench.child_env({})
    )
    assert "loaded before this package" in out.stdout
