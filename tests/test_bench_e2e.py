"""bench/bench_e2e.py's one-process mode: one loaded model serves variant after variant, and an
out-of-memory step is recorded and leaves the model usable (what a capped 24 GB GPU run relies on)."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest
import torch

import sparsepo_lite.objective

from conftest import bench_module


@pytest.fixture(scope="module")
def bench_e2e():
    return bench_module("bench_e2e")


@pytest.fixture(scope="module")
def small_model(bench_e2e):
    return "small", bench_e2e.load_model(dict(device="cpu", dtype="float32", model="small"))


def _spec(name, variant, T=48):
    return dict(variant=variant, T=T, device="cpu", dtype="float32", model=name, steps=1)


def _no_grads(model):
    return all(p.grad is None for p in model.parameters())


def test_variants_in_turn_on_one_model(bench_e2e, small_model, tmp_path, monkeypatch):
    folder, model = small_model
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the cached variant writes its cache
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for variant in ("op_sparsepo_cached", "eager_tdpo2", "trl_dpo", "trl116_dpo"):
        row = bench_e2e.measure(model, _spec(folder, variant))
        assert row["variant"] == variant and not row.get("oom")
        assert row["peak_bytes"] > 0 and row["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
        assert _no_grads(model) and model.training
    assert os.listdir(tmp_path) == []  # the cache was removed once read
    # The steps trained the LoRA weights (the measurement is real training, not a dry run).
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_out_of_memory_is_a_row_and_the_model_stays_usable(bench_e2e, small_model, monkeypatch):
    folder, model = small_model
    real = sparsepo_lite.objective.compute_loss
    calls = []

    def runs_out_on_the_long_batch(model_, batch, cfg):
        calls.append(batch["input_ids"].shape[1])
        out = real(model_, batch, cfg)
        if batch["input_ids"].shape[1] > 64:  # the warm-up batch passes, the measured one fails
            out[0].backward()  # leave gradients behind, as a backward pass cut short would
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    monkeypatch.setattr(sparsepo_lite.objective, "compute_loss", runs_out_on_the_long_batch)
    row = bench_e2e.measure(model, _spec(folder, "op_tdpo2_online", T=96))
    assert row == {"variant": "op_tdpo2_online", "T": 96, "oom": True}
    assert len(calls) == 2 and _no_grads(model)
    monkeypatch.setattr(sparsepo_lite.objective, "compute_loss", real)
    row = bench_e2e.measure(model, _spec(folder, "op_tdpo2_online"))
    assert row["peak_bytes"] > 0 and not row.get("oom")


def test_merge_keeps_rows_of_the_same_machine_only(bench_e2e, small_model, tmp_path, monkeypatch):
    folder, _ = small_model
    out = str(tmp_path / "e2e")
    argv = ["bench_e2e.py", "--model", folder, "--out", out, "--seq-lens", "48", "--one-process"]
    monkeypatch.setattr(sys, "argv", argv + ["--steps", "1", "--variants", "op_dpo_cached"])
    bench_e2e.main()
    monkeypatch.setattr(sys, "argv", argv + ["--steps", "1", "--variants", "trl_dpo", "--merge"])
    bench_e2e.main()
    with open(out + ".json") as f:
        result = json.load(f)
    assert [r["variant"] for r in result["rows"]] == ["op_dpo_cached", "trl_dpo"]
    assert len(result["commands"]) == 2
    assert "| 48 | op_dpo_cached |" in open(out + ".md").read()
    monkeypatch.setattr(sys, "argv", argv + ["--steps", "2", "--merge"])
    with pytest.raises(SystemExit, match="other settings"):
        bench_e2e.main()


def test_rows_in_the_given_order_and_a_deadline_skips_what_cannot_finish(bench_e2e, tmp_path, monkeypatch):
    out = str(tmp_path / "e2e")
    rows = ["op_sparsepo_online@40", "op_dpo_cached@24"]
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench_e2e.py",
            "--model",
            "tiny",
            "--out",
            out,
            "--one-process",
            "--steps",
            "1",
            "--rows",
            *rows,
            "--deadline",
            "1e6",
        ],
    )
    bench_e2e.main()
    result = json.load(open(out + ".json"))
    assert [f"{r['variant']}@{r['T']}" for r in result["rows"]] == rows  # not re-sorted
    assert all(r["peak_bytes"] > 0 and r["wall_s"] >= 0 for r in result["rows"])
    assert result["model_build_s"] >= 0 and "Model built in memory" in open(out + ".md").read()
    # past the deadline nothing starts, and each row says why
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench_e2e.py",
            "--model",
            "tiny",
            "--out",
            out,
            "--one-process",
            "--steps",
            "1",
            "--rows",
            *rows,
            "--deadline",
            "0",
        ],
    )
    bench_e2e.main()
    result = json.load(open(out + ".json"))
    assert all(r["skipped"].startswith("time") and "peak_bytes" not in r for r in result["rows"])
    assert open(out + ".md").read().count("not run (time") == 2


def test_row_time_prediction_and_row_parsing(bench_e2e):
    done = [{"T": 1024, "wall_s": 10.0}, {"T": 1024, "wall_s": 20.0}, {"T": 2048, "oom": True}]
    assert bench_e2e.predicted_seconds(done, 1024) == 20.0
    assert bench_e2e.predicted_seconds(done, 4096) == pytest.approx(20.0 * 4**1.3)
    assert bench_e2e.predicted_seconds(done, 512) == 0.0  # nothing shorter measured: run it
    assert bench_e2e.parse_rows(["priority"], None, None)[:4] == [
        ("op_tdpo2_online", 2048),
        ("op_sparsepo_online", 2048),
        ("op_dpo_cached", 2048),
        ("eager_tdpo2", 2048),
    ]
    assert len(set(bench_e2e.PRIORITY)) == len(bench_e2e.PRIORITY)
    with pytest.raises(SystemExit, match="VARIANT@T"):
        bench_e2e.parse_rows(["op_dpo@12"], None, None)


def test_trl116_step_computes_dpo(bench_e2e, small_model):
    """TRL 1.16's fused-head step (its own add_fused_lm_head, as DPOTrainer patches the model) gives
    the same DPO loss and LoRA gradients as full logits on a policy that differs from its reference."""
    import math

    from sparsepo_lite.data import PreferenceCollator

    _, model = small_model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    batch = PreferenceCollator(0)([bench_e2e.make_example(48, model.config.vocab_size)])

    def loss_and_grads(fn):
        loss = fn(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return float(loss), grads

    full, g_full = loss_and_grads(bench_e2e.trl_dpo_loss)
    fused, g_fused = loss_and_grads(bench_e2e.trl116_dpo_loss)
    assert abs(full - math.log(2)) > 1e-4  # the policy is not its reference
    assert fused == pytest.approx(full, rel=1e-5)
    for a, b in zip(g_full, g_fused):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
