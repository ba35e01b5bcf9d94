"""bench/bench_precompute_contention.py: its child imports what the policy says first and times the
precompute it runs, its data is the first rows of the recipe's, and its tables report medians and
slowdowns against the same policy alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import bench_module, review_rows


@pytest.fixture(scope="module")
def bench():
    return bench_module("bench_precompute_contention")


def test_first_pairs_keeps_the_first_rows_and_refuses_too_few(bench, tmp_path):
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(5)) + "\n")
    out = bench.first_pairs(str(src), 3, str(tmp_path / "three.jsonl"))
    assert [json.loads(line)["i"] for line in open(out)] == [0, 1, 2]
    with pytest.raises(ValueError, match="has 5 rows, fewer than --pairs 6"):
        bench.first_pairs(str(src), 6, str(tmp_path / "six.jsonl"))


def test_the_policies_import_first_what_they_say(bench):
    for policy, (first, extra) in bench.POLICIES.items():
        cmd = bench.child_command(policy, "t.json", "d.jsonl", "cache")
        code = cmd[2]
        assert code.index(f"import {first}\n") < code.index("import sparsepo_lite.refcache")
        assert cmd[3:9] == ["t.json", "precompute-ref", bench.SENTIMENT_CONFIG, "--out", "cache", "--train_file"]
        assert cmd[cmd.index("--eval_file") + 2 :] == extra  # after --eval_file "": the policy's own
    assert bench.POLICIES["torch_first_unguarded"][1] == ["--cpu_load_guard", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("policy, loaded_first", [("package", False), ("torch_first", True)])
def test_a_sample_times_a_real_precompute(bench, tiny_dir, tmp_path, monkeypatch, policy, loaded_first):
    """The child runs the real command on a tiny model: it writes a cache and its own time, and the
    wait decision it reports says whether libgomp was loaded before the package."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in review_rows(4)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny_dir,
                "quantization": "none",
                "lora_r": 4,
                "max_length": 32,
                "max_prompt_length": 16,
                "train_file": str(rows),
                "output_dir": str(tmp_path / "run"),
                "use_cpu": True,
                "report_to": "none",
            }
        )
    )
    monkeypatch.setattr(bench, "SENTIMENT_CONFIG", str(cfg))
    seconds, load_seconds, cpu, waits = bench.precompute_seconds(policy, str(rows), str(tmp_path / "work"))
    assert 0 < seconds < cpu and 0 < load_seconds < cpu  # the import counts in the CPU time only
    assert ("loaded before this package" in waits) == loaded_first, waits
    res = subprocess.run(
        [sys.executable, "-m", "sparsepo_lite.cli", "verify-ref", str(tmp_path / "work" / "cache")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_tables_report_medians_and_slowdowns(bench, tmp_path):
    cells = [
        {
            "competitors": 0,
            "package": [10.0, 12.0, 11.0],
            "torch_first_unguarded": [10.0],
            "load": {"package": [5.0, 7.0, 6.0], "torch_first_unguarded": [6.0]},
            "cpu": {"package": [20.0, 22.0, 21.0], "torch_first_unguarded": [20.0]},
            "waits": {"package": ["GOMP_SPINCOUNT=2000 (quiet)"]},
        },
        {
            "competitors": 2,
            "package": [33.0],
            "torch_first_unguarded": [100.0],
            "load": {"package": [16.0], "torch_first_unguarded": [30.0]},
            "cpu": {"package": [21.0], "torch_first_unguarded": [45.0]},
            "waits": {"package": ["OMP_WAIT_POLICY=PASSIVE (busy)"]},
        },
    ]
    out = str(tmp_path / "p")
    bench.write(out, 64, cells, ["python bench/bench_precompute_contention.py"])
    with open(out + ".json") as f:
        assert json.load(f)["cells"] == cells
    md = open(out + ".md").read()
    assert "| competitors | package: s | slowdown | torch imported first, no guard: s | slowdown |" in md
    assert "| 0 | 11.0 (10.0-12.0, n = 3) | 1.00x | 10.0 | 1.00x |" in md
    assert "| 2 | 33.0 | 3.00x | 100.0 | 10.00x |" in md
    assert "| 2 | 21.0 | 1.00x | 45.0 | 2.25x |" in md  # CPU seconds
    assert "| 0 | 6.0 (5.0-7.0, n = 3) | 1.00x | 6.0 | 1.00x |" in md  # the model load
    assert "| 2 | 16.0 | 2.67x | 30.0 | 5.00x |" in md
    assert "- package: OMP_WAIT_POLICY=PASSIVE (busy)" in md and "first 64 training pairs" in md
