"""bench/bench_token_stats.py at a tiny size: every implementation runs, the rows that compute the
same loss agree (so the side-by-side compares like with like), and the op's GEMM ceiling and
profiler breakdown are measured and reported."""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import bench_module

# The TRL and Liger rows need trl and liger-kernel, which scripts/test.sh installs: without them the
# rows are errors and the test fails, naming the missing module.


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    bench = bench_module("bench_token_stats")
    out = str(tmp_path_factory.mktemp("token_stats") / "ts")
    argv = ["bench_token_stats.py", "--T", "24", "--H", "32", "--V", "500", "--out", out]
    old, sys.argv = sys.argv, argv
    try:
        bench.main()
    finally:
        sys.argv = old
    with open(out + ".json") as f:
        rows = json.load(f)
    with open(out + ".md") as f:
        md = f.read()
    return bench, rows, md


def test_every_implementation_runs(result):
    bench, rows, _ = result
    assert [r["impl"] for r in rows] == bench.IMPLS
    for r in rows:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["peak_mb"] >= 0 and math.isfinite(r["loss"])


def test_rows_of_one_loss_agree(result):
    bench, rows, _ = result
    by = {r["impl"]: r["loss"] for r in rows}
    for group, members in (("tdpo", 3), ("dpo", 2)):
        losses = [by[i] for i, g in bench.SAME_LOSS.items() if g == group]
        assert len(losses) == members
        assert max(losses) - min(losses) < 1e-4, (group, losses)
    # The KL term alone is a different loss: the comparison would be meaningless if it matched.
    assert abs(by["trl_divergence_kl"] - by["op_tdpo"]) > 1e-6


def test_gemm_ceiling_and_breakdown(result):
    bench, rows, md = result
    for r in rows:
        g = r.get("gemm")
        if not r["impl"].startswith("op_"):
            assert g is None
            continue
        assert g["ceiling_gflops"] > 0 and g["achieved_gflops"] > 0
        assert g["fraction"] == pytest.approx(g["achieved_gflops"] / g["ceiling_gflops"])
        # The profiler saw the op's GEMMs and its own code, inside the timed call.
        assert g["gemm_s"] > 0 and g["row_pass_s"] > 0
        assert g["gemm_s"] + g["row_pass_s"] <= r["seconds"] * 1.05
        # bf16 GEMMs are measured exactly where the CPU has instructions for them
        assert (g.get("bf16_ceiling_gflops", 0) > 0) == bool(bench.bf16_gemm_hardware())
    if bench.bf16_gemm_hardware():
        assert "torch.mm in bf16 on the same shapes: op_tdpo at T = 24:" in md
    else:
        assert "so only fp32 is measured" in md
    assert "## The op against the machine's GEMM rate" in md
    assert "| op_tdpo | 24 |" in md and "trl_divergence_kl" in md


def test_liger_row_is_dpo_against_the_exact_reference(result):
    """Liger computes its own reference log-probs from the reference hidden states: its loss is DPO
    with that reference, computed here in float64."""
    import torch
    import torch.nn.functional as F

    bench, rows, _ = result
    x = bench.make_inputs(24, 32, 500, torch.float32, "cpu")
    w = x.weight.double()

    def seq_logp(h):
        lp = torch.log_softmax(h.detach().double() @ w.T, -1).gather(1, x.labels[:, None]).squeeze(1)
        return torch.zeros(2, dtype=torch.float64).index_add(0, x.seq_ids, lp)

    margin = bench.pair_margin(seq_logp(x.hidden) - seq_logp(x.ref_hidden))
    expected = float(-F.logsigmoid(bench.BETA * margin))
    assert {r["impl"]: r["loss"] for r in rows}["liger_dpo"] == pytest.approx(expected, abs=1e-5)


def test_merge_redoes_some_rows_and_keeps_the_rest(result, tmp_path):
    bench, rows, _ = result
    out = str(tmp_path / "ts")
    common = ["--T", "24", "--H", "32", "--V", "500", "--out", out]
    old = sys.argv
    try:
        sys.argv = ["bench_token_stats.py", *common, "--impls", "op_tdpo", "op_dpo", "trl_fused_dpo"]
        bench.main()
        sys.argv = ["bench_token_stats.py", *common, "--impls", "op_dpo", "--merge"]
        bench.main()
    finally:
        sys.argv = old
    with open(out + ".json") as f:
        merged = json.load(f)
    assert [(r["impl"], r["run"]) for r in merged] == [("op_tdpo", 1), ("op_dpo", 2), ("trl_fused_dpo", 1)]
    md = open(out + ".md").read()
    assert "Commands: 1. `" in md and ", 2. `" in md and "`run`: the command" in md
