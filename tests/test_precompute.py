"""Offline reference precompute: cached losses and gradients equal the online ones, top-k with
k = V gives the exact KL, a killed precompute resumes to identical files, cached training
reproduces online training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from sparsepo_lite.data import PreferenceCollator, tokenize_dataset
from sparsepo_lite.masks import SparsePOMasks
from sparsepo_lite.modeling import ModelConfig, load_policy
from sparsepo_lite.objective import LossConfig, compute_loss
from sparsepo_lite.precompute import precompute_reference
from sparsepo_lite.ref_cache import CachedExample, CachedReferenceCollator, RefCache, run_fingerprint

from conftest import review_rows

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    examples, _ = tokenize_dataset(review_rows(6), tok, max_length=32, max_prompt_length=16)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)
    caches = {}
    for mode, kw in {"label": dict(top_k=0), "hidden": dict(top_k=0, store_hidden=True),
                     "topk_all": dict(top_k=len(tok), topk_dtype=torch.float32),
                     "mapo": dict(top_k=0, store_hidden=True, config=LossConfig(loss_type="mapo"))}.items():
        out = str(tmp_path_factory.mktemp(f"cache_{mode}"))
        precompute_reference(model, tok, {"train": examples}, out, fingerprint=fp, batch_size=4, shard_size=4,
                             progress=False, **kw)
        caches[mode] = RefCache(out)
    # Move the policy away from the reference, so the KL terms and their gradients are not trivial.
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, tok, examples, caches


def close_to_scale(a, b, rel, name):
    """max |a - b| within ``rel`` of max |b|: fp32 noise relative to the gradient's scale."""
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert torch.isfinite(a).all() and err <= rel * scale, f"{name}: max error {err:.3g}, scale {scale:.3g}"


def loss_and_grads(model, batch, config):
    model.zero_grad(set_to_none=True)
    loss, metrics = compute_loss(model, batch, config)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("mode,loss_type", [("label", "dpo"), ("hidden", "dpo"), ("hidden", "tdpo1"),
                                            ("hidden", "tdpo2"), ("hidden", "mapo"), ("mapo", "mapo")])
def test_cached_loss_and_gradients_equal_online(setup, mode, loss_type):
    model, tok, examples, caches = setup
    part = examples[1:6]  # crosses a shard boundary; the batch pads differently than the precompute
    online = PreferenceCollator(tok.pad_token_id)(part)
    cached = CachedReferenceCollator(tok.pad_token_id, caches[mode])([CachedExample(e, "train") for e in part])
    config = LossConfig(loss_type=loss_type, beta=0.5)
    if mode == "hidden" and loss_type == "mapo":
        with pytest.raises(ValueError, match="precomputed MaPO masks"):
            compute_loss(model, cached, config)
        return
    l_on, m_on, g_on = loss_and_grads(model, online, config)
    l_ca, m_ca, g_ca = loss_and_grads(model, cached, config)
    assert torch.isfinite(l_on) and l_on.item() != pytest.approx(0.6931, abs=1e-3)
    torch.testing.assert_close(l_ca, l_on, rtol=1e-6, atol=1e-7)
    assert set(g_ca) == set(g_on) and len(g_on) > 0
    for n in g_on:
        close_to_scale(g_ca[n], g_on[n], 1e-5, n)
    # Cached DPO skips the reference distribution, so it reports no kl/* metrics.
    assert set(m_ca) == set(m_on) - ({"kl/chosen", "kl/rejected"} if loss_type == "dpo" else set())
    # The cache's reference values come from a differently padded batch, so each reference
    # log-prob differs by fp32 rounding (~1e-7 of its size). rewards/* are beta times sums of
    # ~30 log-ratios whose terms are ~100x larger than the result: the error does not shrink with
    # the result, so the bound is absolute (1e-5, about 10x the worst seen with transformers 5.23).
    for k in m_ca:
        assert m_ca[k] == pytest.approx(m_on[k], rel=1e-5, abs=1e-5), k


def test_label_only_cache_refuses_kl_losses(setup):
    model, tok, examples, caches = setup
    cached = CachedReferenceCollator(tok.pad_token_id, caches["label"])([CachedExample(e, "train") for e in examples[:2]])
    with pytest.raises(ValueError, match="holds label log-probs only"):
        compute_loss(model, cached, LossConfig(loss_type="tdpo2"))


def test_topk_with_k_equal_to_vocab_gives_the_exact_kl(setup):
    model, tok, examples, caches = setup
    online = PreferenceCollator(tok.pad_token_id)(examples)
    cached = CachedReferenceCollator(tok.pad_token_id, caches["topk_all"])([CachedExample(e, "train") for e in examples])
    config = LossConfig(loss_type="tdpo2", beta=0.5)
    l_on, m_on, g_on = loss_and_grads(model, online, config)
    l_ca, m_ca, g_ca = loss_and_grads(model, cached, config)
    assert m_on["kl/chosen"] > 1e-3
    assert m_ca["kl/chosen"] == pytest.approx(m_on["kl/chosen"], rel=1e-4)
    assert m_ca["kl/rejected"] == pytest.approx(m_on["kl/rejected"], rel=1e-4)
    torch.testing.assert_close(l_ca, l_on, rtol=1e-5, atol=1e-6)
    for n in g_on:
        close_to_scale(g_ca[n], g_on[n], 1e-4, n)


def test_sparsepo_masks_read_the_policy_states_in_cached_mode(setup):
    """At the start (adapter off = policy) the policy's states are the reference's: same loss."""
    model, tok, examples, caches = setup
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    try:
        torch.manual_seed(0)
        masks = SparsePOMasks.for_model(model, init_std=0.3)
        config = LossConfig(loss_type="sparsepo", beta=0.5, masks=masks)
        online = PreferenceCollator(tok.pad_token_id)(examples)
        cached = CachedReferenceCollator(tok.pad_token_id, caches["hidden"])([CachedExample(e, "train") for e in examples])
        l_on, m_on, g_on = loss_and_grads(model, online, config)
        mask_g_on = [p.grad.clone() for p in masks.parameters()]
        masks.zero_grad()
        l_ca, m_ca, g_ca = loss_and_grads(model, cached, config)
        torch.testing.assert_close(l_ca, l_on, rtol=1e-6, atol=1e-7)
        assert m_ca["mask/mean"] == pytest.approx(m_on["mask/mean"], rel=1e-5)
        for a, p in zip(mask_g_on, masks.parameters()):
            torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-7)
        for n in g_on:
            close_to_scale(g_ca[n], g_on[n], 1e-5, n)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_killed_precompute_resumes_to_identical_files(tiny_dir, tmp_path):
    """A real SIGKILL while shard 2's temporary file is written; the rerun finishes the cache."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = [sys.executable, os.path.join(HERE, "precompute_worker.py"), tiny_dir]
    subprocess.run(run + [str(full)], check=True, capture_output=True, timeout=300)
    proc = subprocess.run(run + [str(killed), "--kill-in-shard", "2"], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    manifest = json.loads((killed / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 2
    assert any(".tmp-" in f for f in os.listdir(killed))  # the half-written shard
    subprocess.run(run + [str(killed)], check=True, capture_output=True, timeout=300)
    names = sorted(os.listdir(full))
    assert names == sorted(os.listdir(killed)) and len(names) == 5  # manifest + 4 shards, no leftovers
    for name in names:
        assert (full / name).read_bytes() == (killed / name).read_bytes(), name


def test_cached_training_reproduces_online_training(tiny_dir, tmp_path):
    """SGD: Adam divides by sqrt(v), which turns ulp-level noise in near-zero gradient
    coordinates into full-size steps; with SGD the runs stay within fp32 noise of each other."""
    from sparsepo_lite.trainer import SparsePOConfig, SparsePOTrainer

    def run(out, ref_cache=None):
        transformers.set_seed(0)
        model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
        args = SparsePOConfig(output_dir=str(out), loss_type="dpo", beta=0.5, learning_rate=0.5, max_steps=4, optim="sgd",
                              per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
                              max_length=32, max_prompt_length=16, seed=0, ref_cache=ref_cache, logging_steps=1)
        trainer = SparsePOTrainer(model=model, args=args, train_dataset=review_rows(16),
                                  eval_dataset=review_rows(8, offset=50), processing_class=tok)
        if ref_cache is None:  # precompute from this very setup
            from sparsepo_lite.data import tokenize_dataset as tk

            splits = {"train": tk(review_rows(16), tok, max_length=32, max_prompt_length=16)[0],
                      "eval": tk(review_rows(8, offset=50), tok, max_length=32, max_prompt_length=16)[0]}
            fp = run_fingerprint(model, tok, splits, model_name=None, max_length=32, max_prompt_length=16)
            precompute_reference(model, tok, splits, str(tmp_path / "cache"), fingerprint=fp, top_k=0,
                                 progress=False)
        trainer.train()
        metrics = trainer.evaluate()
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, metrics

    def run_init():
        transformers.set_seed(0)
        model, _ = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    online_w, online_m = run(tmp_path / "online")
    cached_w, cached_m = run(tmp_path / "cached", ref_cache=str(tmp_path / "cache"))
    init = run_init()
    for n, p in online_w.items():
        assert not torch.equal(p, init[n]), n  # it trained
        # fp32 noise of the reference values, carried through 4 steps at lr 0.5: ~4e-6 of each
        # tensor's scale with transformers 5.23 (elementwise, near-zero entries differ by ulps).
        close_to_scale(cached_w[n], p, 2e-5, n)
    assert max((online_w[n] - init[n]).abs().max().item() for n in init) > 1e-2  # steps far above the tolerance
    assert cached_m["eval_loss"] == pytest.approx(online_m["eval_loss"], rel=1e-5)
    # and a cache made for other data stops the run, naming the field
    from sparsepo_lite.ref_cache import CacheError

    with pytest.raises(CacheError, match="data_sha256/train"):
        transformers.set_seed(0)
        model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
        SparsePOTrainer(model=model, args=SparsePOConfig(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True,
                                                         loss_type="dpo", max_length=32, max_prompt_length=16,
                                                         ref_cache=str(tmp_path / "cache")),
                        train_dataset=review_rows(15), processing_class=tok)
