"""bench/bench_thread_share.py: it reads real per-thread scheduler statistics, tells the pair threads
(named at the OS level by the package) from the rest, and its tables add up the right way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import bench_module

pytestmark = pytest.mark.skipif(not os.path.isfile("/proc/self/schedstat"), reason="needs Linux schedstat")


@pytest.fixture(scope="module")
def bench():
    return bench_module("bench_thread_share")


def test_pair_threads_carry_their_name_where_the_os_shows_it(bench):
    from sparsepo_lite.training.pair_threads import THREAD_NAME, PairThreads

    both = threading.Barrier(2, timeout=30)  # so that each item runs on its own thread

    def tid_and_reading(_):
        both.wait()
        tid = threading.get_native_id()
        return tid, bench.read_thread(os.getpid(), tid)

    with PairThreads(2) as pool:
        tids, readings = zip(*pool.map(tid_and_reading, [0, 1]))
    assert len(set(tids)) == 2
    assert [r["name"] for r in readings] == [THREAD_NAME] * 2
    assert [bench.kind(os.getpid(), tid, r["name"]) for tid, r in zip(tids, readings)] == ["pair threads"] * 2
    assert bench.kind(os.getpid(), os.getpid(), "python") == "main"
    assert bench.kind(os.getpid(), tids[0] + 10**6, "python") == "other"


def test_watch_reads_a_real_process_time_on_a_core(bench):
    """A process that computes for 0.5 s of CPU time shows about that much on its main thread; a thread
    that sleeps shows up as blocked, not as CPU or waiting."""
    code = (
        "import threading, time\n"
        "t = threading.Thread(target=time.sleep, args=(1.0,)); t.start()\n"
        "end = time.process_time() + 0.5\n"
        "while time.process_time() < end: pass\n"
        "t.join()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    threads = bench.watch(proc, 0.02)
    assert proc.returncode == 0
    kinds = bench.summarise(proc.pid, threads)
    main, other = kinds["main"], kinds["other"]
    assert main["threads"] == 1 and 0.4 <= main["cpu"] <= 1.5, main
    assert other["threads"] == 1 and other["cpu"] < 0.1 and other["blocked"] > 0.5, other
    assert kinds["pair threads"]["threads"] == 0


def test_summarise_sums_per_kind_and_blocked_is_life_less_cpu_and_waiting(bench):
    threads = {
        100: {"name": "python", "start": 10.0, "seen": 30.0, "cpu": 5.0, "waiting": 3.0},
        101: {"name": "sparsepo-pairs", "start": 12.0, "seen": 30.0, "cpu": 6.0, "waiting": 11.0},
        102: {"name": "sparsepo-pairs", "start": 12.0, "seen": 30.0, "cpu": 6.0, "waiting": 12.5},
        103: {"name": "python", "start": 11.0, "seen": 30.0, "cpu": 1.0, "waiting": 1.0},
    }
    out = bench.summarise(100, threads)
    assert out["main"] == {"threads": 1, "cpu": 5.0, "waiting": 3.0, "blocked": 12.0}
    # a last reading up to one interval late cannot make blocked time negative
    assert out["pair threads"] == {"threads": 2, "cpu": 12.0, "waiting": 23.5, "blocked": 1.0}
    assert out["other"] == {"threads": 1, "cpu": 1.0, "waiting": 1.0, "blocked": 17.0}


def test_equal_share(bench):
    assert bench.equal_share(2, 0) == 1.0
    assert bench.equal_share(2, 2) == pytest.approx(1 / 3)
    assert bench.equal_share(8, 1) == 1.0


def _sample(runtime, pair_cpu, pair_waiting):
    kinds = {k: {"threads": 0, "cpu": 0.0, "waiting": 0.0, "blocked": 0.0} for k in ("main", "pair threads", "other")}
    kinds["main"] = {"threads": 1, "cpu": 8.0, "waiting": 1.0, "blocked": 10.0}
    kinds["pair threads"] = {"threads": 2, "cpu": pair_cpu, "waiting": pair_waiting, "blocked": 2.0}
    return {"train_runtime": runtime, "process_cpu": 8.0 + pair_cpu + 0.5, "kinds": kinds}


def test_tables_give_medians_slowdowns_and_shares(bench, tmp_path):
    cells = [
        {"competitors": 0, "samples": [_sample(12.0, 24.0, 0.5), _sample(14.0, 24.0, 0.5), _sample(13.0, 25.0, 1.0)]},
        {"competitors": 2, "samples": [_sample(39.0, 24.0, 48.0)]},
        {"competitors": 3, "samples": []},
    ]
    out = str(tmp_path / "t")
    bench.write(out, 6, cells, ["python bench/bench_thread_share.py"])
    with open(out + ".json") as f:
        assert json.load(f)["cells"] == cells
    md = open(out + ".md").read()
    cpus = os.cpu_count()
    assert "| 0 | 13.0 | 1.00x | pair threads | 2 | 24.00 | 1.00x | 0.50 | 2.00 | 0.98 | 1.00 |" in md
    share = f"{bench.equal_share(cpus, 2):.2f}"
    assert f"| 2 | 39.0 | 3.00x | pair threads | 2 | 24.00 | 1.00x | 48.00 | 2.00 | 0.33 | {share} |" in md
    assert "| 2 | 39.0 | 3.00x | main | 1 | 8.00 | 1.00x | 1.00 | 10.00 | 0.89 |" in md
    assert "| other |" not in md  # no thread of that kind
    assert "| 3 |" not in md  # not measured yet
    assert "| 0 | 32.5 | 1.00x | 32.0 |" in md and "| 2 | 32.5 | 1.00x | 32.0 |" in md


def test_rounds_visit_every_load(bench, tmp_path, monkeypatch):
    seen, load, folders = [], [], set()
    monkeypatch.setattr(bench, "start_competitors", lambda n: load.append(n) or [])
    monkeypatch.setattr(bench, "stop_competitors", lambda procs: None)

    def sample(steps, work, interval, perf, gil):
        seen.append(load[-1])
        folders.add(work)
        return _sample(1.0, 1.0, 1.0)

    monkeypatch.setattr(bench, "sample", sample)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(
        "sys.argv", ["bench_thread_share.py", "--loads", "0", "2", "--repeats", "2", "--out", str(tmp_path / "t")]
    )
    bench.main()
    assert seen == [0, 2, 0, 2]
    assert folders and not any(os.path.exists(w) for w in folders)  # the run's work folder is removed
    with open(tmp_path / "t.json") as f:
        assert [len(c["samples"]) for c in json.load(f)["cells"]] == [2, 2]


def test_a_sample_reads_the_pair_threads_of_a_real_process(bench, tmp_path, monkeypatch):
    """A child whose named thread computes for 0.3 s of CPU time: the sample files that time under the
    pair threads, and the kernel's whole-process CPU time covers every kind."""
    code = _child_with_a_pair_thread(tmp_path / "run", 0.3)
    monkeypatch.setattr(
        bench, "start_training", lambda policy, steps, out: subprocess.Popen([sys.executable, "-c", code])
    )
    s = bench.sample(6, str(tmp_path), 0.02)
    pairs = s["kinds"]["pair threads"]
    assert s["train_runtime"] == 2.5
    assert pairs["threads"] == 1 and 0.25 <= pairs["cpu"] <= 1.0 and pairs["blocked"] > 0.1, pairs
    total = sum(k["cpu"] for k in s["kinds"].values())
    assert total <= s["process_cpu"] + 0.05 and s["process_cpu"] >= 0.3, (total, s["process_cpu"])


def _child_with_a_pair_thread(run, seconds: float) -> str:
    """A child process whose thread named as the package names its pair threads computes for
    ``seconds`` of CPU time in pure Python, then writes a run folder with a train_runtime of 2.5."""
    return (
        "import os, threading, time\n"
        "from sparsepo_lite.training.pair_threads import THREAD_NAME, name_os_thread\n"
        "def work():\n"
        "    name_os_thread(THREAD_NAME)\n"
        f"    end = time.thread_time() + {seconds}\n"
        "    while time.thread_time() < end: sum(range(20000))  # the interpreter, not the clock's syscall\n"
        "    time.sleep(0.3)  # alive for a few more readings\n"
        "t = threading.Thread(target=work); t.start(); t.join()\n"
        f"os.makedirs({str(run)!r})\n"
        f"open({str(run / 'metrics.json')!r}, 'w').write('{{\"final\": {{\"train_runtime\": 2.5}}}}')\n"
    )


#: Lines as ``perf script -F comm,tid,ip,sym,dso`` prints them (taken from a real recording).
PERF_LINES = [
    "  sparsepo-pairs  9706      7f0828cd3107 sparsepo_lite::row_pass_cpu (/work/main/sparsepo_lite/_C.cpython-311-x86_64-linux-gnu.so)",
    "  sparsepo-pairs  9706      7f08312a0b10 mkl_blas_def_sgemm_kernel_0_zen (/site-packages/torch/lib/libtorch_cpu.so)",
    "  sparsepo-pairs  9707      7f08312a0b10 mkl_blas_def_sgemm_scopy_right16_bdz (/site-packages/torch/lib/libtorch_cpu.so)",
    "  sparsepo-pairs  9707      7f0831000000 c10::function_ref<void (char**, long const*, long, long)>::callback_fn<at::native::(anonymous namespace)::mul_kernel> (/site-packages/torch/lib/libtorch_cpu.so)",
    "  sparsepo-pairs  9707      7f0831000001 c10::TensorImpl::numel_custom (/site-packages/torch/lib/libc10.so)",
    "  sparsepo-pairs  9706      7f29aa3b4e0d _PyEval_EvalFrameDefault (/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0)",
    "  sparsepo-pairs  9706      7f29aa3b4e0e torch::FunctionSignature::parse (/site-packages/torch/lib/libtorch_python.so)",
    "  sparsepo-pairs  9706      7f29aa3b4e0f THPVariable_add (/site-packages/torch/_C.cpython-311-x86_64-linux-gnu.so)",
    "  sparsepo-pairs  9706      7f29aa3b4e10 _int_malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)",
    "  sparsepo-pairs  9706      7f29aa3b4e11 __expf_fma (/usr/lib/x86_64-linux-gnu/libm.so.6)",
    "  sparsepo-pairs  9706      7f29aa3b4e12 operator new (/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30)",
    "  sparsepo-pairs  9706      7f29aa3b4e13 dequantizeBlockwise4bitCpu<float, 1> (/sp/bitsandbytes/libbitsandbytes_cpu.so)",
    "  sparsepo-pairs  9706  ffffffff8158d563 clear_page_erms ([kernel.kallsyms])",
    "  sparsepo-pairs  9706      7f29aa3b4e14 [unknown] (/sp/torch/lib/libgomp.so.1)",
    "  sparsepo-pairs  9706  ffffffff8158d564 do_syscall_64 (inlined) ([kernel.kallsyms])",
    "  sparsepo-pairs  9706      55d0c0a1b2c3 _PyEval_EvalFrameDefault (/usr/bin/python3.11)",
    "  sparsepo-pairs  9706      7f29aa3b4e15 mkl_vml_serv_threader (/site-packages/torch/lib/libtorch_cpu.so)",
    "          python  9694      7f29aa3b4e0d _PyEval_EvalFrameDefault (/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0)",
    "          python  9694  ffffffff81608fc5 __handle_mm_fault ([kernel.kallsyms])",
]


def test_perf_samples_count_under_the_code_they_ran_in(bench):
    """Only the pair threads' samples count, one in ``hz`` seconds each; MKL's BLAS is told from the
    rest of libtorch_cpu by its symbol, the package's extension from torch's own ``_C`` module by its
    path; the shared object is the last bracket, whatever brackets the symbol holds."""
    got = bench.pair_code_seconds("\n".join(PERF_LINES + ["", "garbage"]), hz=10)
    assert got == pytest.approx(
        {
            "the extension (row pass)": 0.1,
            "MKL's BLAS (sgemm and its packing)": 0.2,
            "torch's other kernels": 0.3,  # a symbol with brackets in it, libc10, MKL outside its BLAS
            "Python interpreter": 0.2,  # a shared libpython, and one linked into the executable
            "torch's Python bindings": 0.1,
            "C and C++ runtime (malloc, memcpy)": 0.3,
            "bitsandbytes' kernels": 0.1,
            "Linux kernel": 0.2,  # one symbol with brackets in it
            bench.OTHER_CODE: 0.2,  # torch's _C module and libgomp
        }
    )


def test_code_table_says_which_code_needs_the_extra_cpu(bench):
    rows = [row for row, _, _ in bench.CODE] + [bench.OTHER_CODE]
    alone = {row: 1.0 for row in rows}
    loaded = {**alone, "Python interpreter": 1.6, "MKL's BLAS (sgemm and its packing)": 1.2}
    done = [
        (0, {"pair_code": alone, "pair_code_total": 9.0}),
        (2, {"pair_code": loaded, "pair_code_total": 9.7}),  # the samples' median total, not the rows' sum
    ]
    md = "\n".join(bench.code_table(done, done[0][1]))
    assert "| Python interpreter | 1.00 | 1.00x | +0.00 | 1.60 | 1.60x | +0.60 |" in md
    assert "| MKL's BLAS (sgemm and its packing) | 1.00 | 1.00x | +0.00 | 1.20 | 1.20x | +0.20 |" in md
    assert "| Linux kernel | 1.00 | 1.00x | +0.00 | 1.00 | 1.00x | +0.00 |" in md
    assert "| all | 9.00 | 1.00x | +0.00 | 9.70 | 1.08x | +0.70 |" in md
    assert bench.code_table([(0, {})], None) == []  # not profiled: no table


def test_medians_of_the_code_rows_count_a_missing_row_as_zero(bench):
    samples = [
        {**_sample(12.0, 24.0, 0.5), "pair_code": {"Python interpreter": 1.0, "Linux kernel": 0.4}},
        {**_sample(13.0, 24.0, 0.5), "pair_code": {"Python interpreter": 3.0}},
    ]
    medians = bench.medians(samples)
    m = medians["pair_code"]
    assert m["Python interpreter"] == 2.0 and m["Linux kernel"] == 0.2 and m[bench.OTHER_CODE] == 0.0
    assert medians["pair_code_total"] == 2.2  # the median of the totals 1.4 and 3.0
    assert "pair_code" not in bench.medians([_sample(12.0, 24.0, 0.5)])


@pytest.mark.skipif(shutil.which("perf") is None, reason="needs Linux perf")
def test_a_sample_profiles_the_pair_threads_of_a_real_process(bench, tmp_path, monkeypatch):
    """With perf: a child whose pair thread runs pure Python for 0.5 s of CPU time shows that time,
    mostly in the Python interpreter, and the recording is removed afterwards."""
    code = _child_with_a_pair_thread(tmp_path / "run", 0.5)
    monkeypatch.setattr(
        bench, "start_training", lambda policy, steps, out: subprocess.Popen([sys.executable, "-c", code])
    )
    s = bench.sample(6, str(tmp_path), 0.02, perf=True)
    code_s = s["pair_code"]
    assert 0.35 <= sum(code_s.values()) <= 1.0, code_s
    assert code_s.get("Python interpreter", 0.0) > 0.5 * sum(code_s.values()), code_s
    assert not (tmp_path / "perf.data").exists()
    # perf's own CPU time is not the process's: the kinds' sum accounts for it
    total = sum(k["cpu"] for k in s["kinds"].values())
    assert s["process_cpu"] <= total + 0.1, (s["process_cpu"], total)


def _line(comm, tid, t, event, trace=""):
    return f"{comm:>16} {tid:6d} {t:.6f}: {event}: {trace}"


def _switch(prev, prev_tid, state, nxt, next_tid):
    return f"prev_comm={prev} prev_pid={prev_tid} prev_prio=120 prev_state={state} ==> next_comm={nxt} next_pid={next_tid} next_prio=120"


def test_blocked_time_is_split_by_what_the_pair_thread_waited_for(bench):
    """A pair thread asleep inside take_gil waits on the GIL, asleep elsewhere on something else; a
    stretch ends at its wake-up, whoever wakes it (a thread whose name has a space too), or when it
    runs again without one; preemption (a runnable switch-out) is not blocked time, and other
    threads' sleeps do not count."""
    P, gil_in, gil_out = bench.THREAD_NAME, *bench.GIL_EVENTS
    lines = [
        _line(P, 11, 1.000, gil_in, "(7f0)"),
        _line(P, 11, 1.001, "sched:sched_switch", _switch(P, 11, "S", "swapper/0", 0)),
        _line(P, 12, 1.004, "sched:sched_waking", f"comm={P} pid=11 prio=120 target_cpu=000"),  # 3 ms on the GIL
        _line(P, 11, 1.005, gil_out, "(7f0 <- 7f1)"),
        _line(P, 11, 1.010, "sched:sched_switch", _switch(P, 11, "R+", "python", 10)),  # preempted
        _line("python", 10, 1.020, "sched:sched_switch", _switch("python", 10, "S", P, 11)),
        _line(P, 11, 1.030, "sched:sched_switch", _switch(P, 11, "S", "swapper/0", 0)),
        _line("Web Content", 99, 1.050, "sched:sched_waking", f"comm={P} pid=11 prio=120 target_cpu=000"),  # 20 ms
        _line(P, 12, 1.060, "sched:sched_switch", _switch(P, 12, "D", "my worker", 7)),
        _line("my worker", 7, 1.070, "sched:sched_switch", _switch("my worker", 7, "S", P, 12)),  # 10 ms, no wake-up
        _line(
            "python", 10, 1.080, "sched:sched_switch", _switch("python", 10, "S", "swapper/1", 0)
        ),  # not a pair thread
        _line("python", 10, 1.090, "sched:sched_waking", "comm=python pid=10 prio=120 target_cpu=001"),
        "garbage",
    ]
    got = bench.blocked_split("\n".join(lines))
    assert got["the GIL"] == pytest.approx(0.003) and got["the GIL stretches"] == 1
    assert got["elsewhere"] == pytest.approx(0.030) and got["elsewhere stretches"] == 2


def test_blocked_table_gives_the_split_beside_the_schedulers_blocked_time(bench):
    split = {"the GIL": 0.4, "the GIL stretches": 700, "elsewhere": 2.1, "elsewhere stretches": 60}
    m = {**bench.medians([_sample(40.0, 24.0, 50.0)]), "blocked_on": split}
    md = "\n".join(bench.blocked_table([(2, m)]))
    assert "| 2 | 40.0 | 2.00 | 0.40 | 700 | 2.10 | 60 |" in md
    assert bench.blocked_table([(0, bench.medians([_sample(12.0, 24.0, 1.0)]))]) == []


def _can_probe(bench) -> bool:
    """Whether this machine lets ``--gil`` probe the interpreter: perf, root, the kernel's uprobes
    and a ``take_gil`` symbol. The bench's own probing is not tried here: a fault in it must fail
    the test below, not skip it."""
    if shutil.which("perf") is None or os.geteuid() != 0:
        return False
    if not any(os.path.exists(f"{d}/uprobe_events") for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return False
    listed = subprocess.run(
        ["perf", "probe", "-x", bench.interpreter_binary(), "-F", "take_gil"], capture_output=True, text=True
    )
    return "take_gil" in listed.stdout.split()


def test_a_sample_splits_the_blocked_time_of_a_real_process(bench, tmp_path, monkeypatch):
    """With perf and uprobes: two pair threads running pure Python at once hand the GIL back and forth,
    so each sleeps on it about half the time; the probes are gone afterwards."""
    if not _can_probe(bench):
        pytest.skip("needs root, perf with uprobes and an interpreter with symbols")
    code = (
        "import os, threading, time\n"
        "from sparsepo_lite.training.pair_threads import THREAD_NAME, name_os_thread\n"
        "time.sleep(1.0)  # perf starts recording\n"
        "def work():\n"
        "    name_os_thread(THREAD_NAME)\n"
        "    end = time.thread_time() + 0.4\n"
        "    while time.thread_time() < end: sum(range(20000))\n"
        "ts = [threading.Thread(target=work) for _ in range(2)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        f"os.makedirs({str(tmp_path / 'run')!r})\n"
        f"open({str(tmp_path / 'run' / 'metrics.json')!r}, 'w').write('{{\"final\": {{\"train_runtime\": 2.5}}}}')\n"
    )
    monkeypatch.setattr(
        bench, "start_training", lambda policy, steps, out: subprocess.Popen([sys.executable, "-c", code])
    )
    s = bench.sample(6, str(tmp_path), 0.02, gil=True)
    split = s["blocked_on"]
    assert split["the GIL"] > 0.2 and split["the GIL stretches"] > 10, split  # ~0.4 s each would be 0.8 s
    assert split["elsewhere"] < split["the GIL"], split
    listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True).stdout
    assert bench.GIL_GROUP not in listed and not (tmp_path / "gil.data").exists()
