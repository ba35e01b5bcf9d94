"""scripts/gpu_check.sh: the one-command GPU check, rehearsed on the CPU (--dry-run), and its summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check_summary  # noqa: E402

pytestmark = pytest.mark.slow  # trains or runs real models, compiles, or starts processes

sys.path.pop(0)


def _probe_wheel(folder):
    """A minimal pure-Python wheel, so the dry run exercises the wheel stage without a download."""
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpu_check_probe/__init__.py", "OK = True\n")
        z.writestr(
            "gpu_check_probe-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n"
        )
        z.writestr(
            "gpu_check_probe-0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("gpu_check_probe-0.1.dist-info/RECORD", "")
    return path


def test_dry_run_runs_every_stage_and_returns_the_files(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), WHEEL_DIR=str(wheels))
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "stages.tsv", newline="") as f:
        stages = {r["stage"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert list(stages) == ["wheels", "build", "linked", "tests", "bench", "summary"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert "dry run" in stages["build"]["note"] and "CUDA assertion skipped" in stages["build"]["note"]
    # the device tool returns at most 8 files, none deeper than two folders
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "bench.log",
        "e2e_tiny_cpu.json",
        "e2e_tiny_cpu.md",
        "setup.log",
        "stages.tsv",
        "summary.md",
        "tests.log",
    ]
    counts = gpu_check_summary.test_counts(str(out))
    assert counts["passed"] >= 1 and counts["skipped"] >= 40 and not counts.get("failed")  # CUDA tests skip here
    result = json.loads((out / "e2e_tiny_cpu.json").read_text())
    assert [(r["variant"], r["T"]) for r in result["rows"]] == [
        ("op_tdpo2_online", 48),
        ("op_sparsepo_online", 48),
        ("op_dpo_cached", 48),
        ("eager_tdpo2", 48),
    ]
    assert all(r["peak_bytes"] > 0 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert result["model_build_s"] > 0
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and "| bench | ok |" in summary and "| 48 | op_sparsepo_online |" in summary
    assert summary == proc.stdout[proc.stdout.index("# GPU check") : proc.stdout.index("results in")]


def _row(variant, T, peak_gib=None, tps=None, plan_gib=None, **extra):
    r = {"variant": variant, "T": T, **extra}
    if peak_gib is not None:
        r.update(peak_bytes=peak_gib * 2**30, tokens_per_s=tps)
    if plan_gib is not None:
        r.update(plan_bytes=plan_gib * 2**30, plan_phase="backward")
        if peak_gib:
            r["plan_over_measured"] = plan_gib / peak_gib
    return r


def test_summary_states_failures_bars_and_planner_misses(tmp_path):
    (tmp_path / "stages.tsv").write_text(
        "stage\tstatus\tseconds\tnote\nwheels\tok\t3\t2 wheels\nbuild\tfailed\t40\tCUDA extension in place (exit 1)\n"
    )
    (tmp_path / "tests.log").write_text("....F\n1 failed, 80 passed, 2 skipped in 50.1s\n")
    rows = [
        _row("op_tdpo2_online", 2048, 9.0, 3000, 9.5),
        _row("eager_tdpo2", 2048, 20.0, 2500),
        _row("op_sparsepo_online", 2048, 12.5, 2800, 10.0),
        _row("op_tdpo2_online", 4096, oom=True),
        _row("op_sparsepo_online", 8192, skipped="time: needs ~90 s, 20 s left"),
    ]
    (tmp_path / "e2e_llama-3-8b_cuda.json").write_text(
        json.dumps(
            {
                "model": "llama-3-8b",
                "dtype": "bfloat16",
                "steps": 3,
                "gpu_mem": "24GB",
                "model_build_s": 31.0,
                "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0"},
                "rows": rows,
            }
        )
    )
    text = gpu_check_summary.summarize(str(tmp_path))
    assert "| build | failed | 40 |" in text
    assert "1 failed, 80 passed, 2 skipped" in text and "WARNING: tests skipped on the GPU" in text
    assert "op_tdpo2_online at T = 2048: 9.00 GiB, within 12 GiB; 3000 tokens/s; eager 2500 tokens/s (1.20x)" in text
    assert "op_sparsepo_online at T = 2048: 12.50 GiB, OVER 12 GiB" in text
    assert "op_tdpo2_online at T = 4096: OOM" in text and "op_sparsepo_online at T = 8192: not measured" in text
    assert "planner within 10% of 1 of 2 measured peaks: off at op_sparsepo_online@2048 (0.80)" in text
    assert "not run: time" in text and "model built in memory in 31.0 s" in text
    assert (tmp_path / "summary.md").read_text() == text
