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

import sparsepo_lite as sp
from sparsepo_lite.data import PreferenceCollator, tokenize_dataset
from sparsepo_lite.masks import SparsePOMasks
from sparsepo_lite.models import ModelConfig, load_policy
from sparsepo_lite.objective import LossConfig, compute_loss
from sparsepo_lite.refcache import CachedExample, CachedReferenceCollator, RefCache, run_fingerprint
from sparsepo_lite.refcache.writer import precompute_reference

from conftest import review_rows

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    examples, _ = tokenize_dataset(review_rows(6), tok, max_length=32, max_prompt_length=16)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)
    caches = {}
    for mode, kw in {
        "label": dict(top_k=0),
        "hidden": dict(top_k=0, store_hidden=True),
        "topk_all": dict(top_k=len(tok), topk_dtype=torch.float32),
        "mapo": dict(top_k=0, store_hidden=True, mapo_mapping="zn_rescale"),
    }.items():
        out = str(tmp_path_factory.mktemp(f"cache_{mode}"))
        precompute_reference(
            model, tok, {"train": examples}, out, fingerprint=fp, batch_size=4, shard_size=4, progress=False, **kw
        )
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


@pytest.mark.parametrize(
    "mode,loss_type",
    [
        ("label", "dpo"),
        ("hidden", "dpo"),
        ("hidden", "tdpo1"),
        ("hidden", "tdpo2"),
        ("hidden", "mapo"),
        ("mapo", "mapo"),
    ],
)
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
    cached = CachedReferenceCollator(tok.pad_token_id, caches["label"])(
        [CachedExample(e, "train") for e in examples[:2]]
    )
    with pytest.raises(ValueError, match="holds label log-probs only"):
        compute_loss(model, cached, LossConfig(loss_type="tdpo2"))


def test_topk_with_k_equal_to_vocab_gives_the_exact_kl(setup):
    model, tok, examples, caches = setup
    online = PreferenceCollator(tok.pad_token_id)(examples)
    cached = CachedReferenceCollator(tok.pad_token_id, caches["topk_all"])(
        [CachedExample(e, "train") for e in examples]
    )
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
        cached = CachedReferenceCollator(tok.pad_token_id, caches["hidden"])(
            [CachedExample(e, "train") for e in examples]
        )
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cached_training_reproduces_online_training(tiny_dir, tmp_path):
    """SGD: Adam divides by sqrt(v), which turns ulp-level noise in near-zero gradient
    coordinates into full-size steps; with SGD the runs stay within fp32 noise of each other."""
    from sparsepo_lite.training import SparsePOConfig, SparsePOTrainer

    def run(out, ref_cache=None):
        transformers.set_seed(0)
        model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
        args = SparsePOConfig(
            output_dir=str(out),
            loss_type="dpo",
            beta=0.5,
            learning_rate=0.5,
            max_steps=4,
            optim="sgd",
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            max_length=32,
            max_prompt_length=16,
            seed=0,
            ref_cache=ref_cache,
            logging_steps=1,
        )
        trainer = SparsePOTrainer(
            model=model,
            args=args,
            train_dataset=review_rows(16),
            eval_dataset=review_rows(8, offset=50),
            processing_class=tok,
        )
        if ref_cache is None:  # precompute from this very setup
            from sparsepo_lite.data import tokenize_dataset as tk

            splits = {
                "train": tk(review_rows(16), tok, max_length=32, max_prompt_length=16)[0],
                "eval": tk(review_rows(8, offset=50), tok, max_length=32, max_prompt_length=16)[0],
            }
            fp = run_fingerprint(model, tok, splits, model_name=None, max_length=32, max_prompt_length=16)
            precompute_reference(model, tok, splits, str(tmp_path / "cache"), fingerprint=fp, top_k=0, progress=False)
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
    from sparsepo_lite.refcache import CacheError

    with pytest.raises(CacheError, match="data_sha256/train"):
        transformers.set_seed(0)
        model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
        SparsePOTrainer(
            model=model,
            args=SparsePOConfig(
                output_dir=str(tmp_path / "x"),
                report_to=[],
                use_cpu=True,
                loss_type="dpo",
                max_length=32,
                max_prompt_length=16,
                ref_cache=str(tmp_path / "cache"),
            ),
            train_dataset=review_rows(15),
            processing_class=tok,
        )


def test_tail_samples_are_reference_draws_outside_the_top_k(tiny_dir, tmp_path):
    """The stored tail draws follow the reference restricted to its tail (a chi-square-free check: the
    empirical frequencies over many draws match q(v) / r), lie outside the top-k, carry their exact
    log-probs, and are reproducible from the seed; another seed is another cache."""
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    examples, _ = tokenize_dataset(review_rows(4), tok, max_length=32, max_prompt_length=16)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)
    m = 4000
    man = precompute_reference(
        model,
        tok,
        {"train": examples},
        str(tmp_path / "a"),
        fingerprint=fp,
        top_k=5,
        tail_samples=m,
        topk_dtype=torch.float32,
        batch_size=4,
        progress=False,
    )
    assert man["contents"]["tail_samples"] == m and man["fingerprint"]["tail_seed"] == 0
    from safetensors.torch import load_file

    shard = load_file(str(tmp_path / "a" / "train-00000.safetensors"))
    ids, top, lp = shard["tail_ids"].long(), shard["topk_ids"].long(), shard["tail_logp"]
    assert ids.shape == (shard["label_logp"].shape[0], m) and shard["tail_ids"].dtype == torch.int32
    assert not (ids[:, :, None] == top[:, None, :]).any()  # never a top-k id
    # the exact reference distribution at the first token, from the live reference pass
    batch = PreferenceCollator(tok.pad_token_id)(examples[:1])
    target = batch["labels"][:, 1:]
    response = target != -100
    seq_ids, pos = response.nonzero(as_tuple=True)
    from sparsepo_lite.reference import reference_pass

    rp = reference_pass(model, batch["input_ids"], batch["attention_mask"], response, seq_ids, pos)
    lq = torch.log_softmax(rp.hidden[0].double() @ rp.weight.double().T, -1)
    torch.testing.assert_close(lp[0].double(), lq[ids[0]], rtol=1e-5, atol=1e-5)
    tail = lq.exp().scatter(0, top[0], 0.0)
    tail /= tail.sum()
    freq = torch.bincount(ids[0], minlength=tail.shape[0]).double() / m
    assert (freq - tail).abs().max() < 5 * (tail * (1 - tail) / m).sqrt().max() + 1e-3
    again = precompute_reference(
        model,
        tok,
        {"train": examples},
        str(tmp_path / "b"),
        fingerprint=fp,
        top_k=5,
        tail_samples=m,
        topk_dtype=torch.float32,
        batch_size=4,
        progress=False,
    )
    assert (tmp_path / "a" / "train-00000.safetensors").read_bytes() == (
        tmp_path / "b" / "train-00000.safetensors"
    ).read_bytes()
    assert again["fingerprint"] == man["fingerprint"]
    from sparsepo_lite.refcache import CacheError

    with pytest.raises(CacheError, match="tail_seed is 0 in the cache but 1 now"):  # a resume with another seed
        precompute_reference(
            model,
            tok,
            {"train": examples},
            str(tmp_path / "a"),
            fingerprint=fp,
            top_k=5,
            tail_samples=m,
            tail_seed=1,
            topk_dtype=torch.float32,
            batch_size=4,
            progress=False,
        )


def test_cached_tail_kl_is_unbiased_against_the_live_reference(tiny_dir, tmp_path):
    """Many caches of the same data with different tail seeds: their mean KL per token is the live
    KL (the bucket alone is below it), through the real cache files and compute_loss."""
    from sparsepo_lite.refcache.accuracy import cache_accuracy

    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # far from the reference
    examples, _ = tokenize_dataset(review_rows(4), tok, max_length=32, max_prompt_length=16)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)
    signed = []
    for seed in range(12):
        out = str(tmp_path / f"s{seed}")
        precompute_reference(
            model,
            tok,
            {"train": examples},
            out,
            fingerprint=fp,
            top_k=3,
            tail_samples=64,
            tail_seed=seed,
            topk_dtype=torch.float32,
            batch_size=4,
            progress=False,
        )
        acc = cache_accuracy(model, tok, RefCache(out), examples, batches=1, batch_size=4)
        signed.append(acc["sequence_kl"]["mean_signed_rel_error"])
    precompute_reference(
        model,
        tok,
        {"train": examples},
        str(tmp_path / "bucket"),
        fingerprint=fp,
        top_k=3,
        tail_samples=0,
        topk_dtype=torch.float32,
        batch_size=4,
        progress=False,
    )
    bucket = cache_accuracy(model, tok, RefCache(str(tmp_path / "bucket")), examples, batches=1, batch_size=4)
    mean = sum(signed) / len(signed)
    sd = (sum((s - mean) ** 2 for s in signed) / (len(signed) - 1)) ** 0.5
    assert abs(mean) <= 4 * sd / len(signed) ** 0.5 + 1e-3, (mean, sd)
    assert bucket["sequence_kl"]["mean_signed_rel_error"] < -0.05  # the bias the samples remove


@pytest.mark.slow
def test_verify_ref_against_live_reports_the_cache_error(tiny_dir, tmp_path):
    import yaml

    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in review_rows(8)))
    cfg = {
        "model_name_or_path": tiny_dir,
        "train_file": str(rows),
        "output_dir": str(tmp_path / "run"),
        "loss_type": "tdpo2",
        "lora_r": 4,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.05,
        "max_length": 32,
        "max_prompt_length": 16,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "gradient_checkpointing": False,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "sparsepo_lite.cli"]
    for args in (
        ["train", str(tmp_path / "cfg.yaml")],
        [
            "precompute-ref",
            str(tmp_path / "cfg.yaml"),
            "--out",
            str(tmp_path / "ref"),
            "--top-k",
            "4",
            "--tail-samples",
            "8",
        ],
    ):
        res = subprocess.run(cli + args, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run(
        cli + ["verify-ref", str(tmp_path / "ref"), "--against-live", "2", "--policy", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "4 + 6 x 4 top-k + 6 x 8 tail samples = 76 payload bytes" in out
    assert "8 pairs" in out and "per sequence: mean relative error" in out and "chosen - rejected KL" in out
    res = subprocess.run(
        cli + ["verify-ref", str(tmp_path / "ref"), "--against-live", "2"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode != 0 and "--against-live needs --policy" in res.stderr

    # --max-kl-error gates on the printed per-sequence error: below it passes, above it fails after
    # the report, naming the error and the bound
    from sparsepo_lite.cli.verify_ref import verify_ref
    from sparsepo_lite.refcache.format import CacheError

    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    error = verify_ref(ref, 2, run)["accuracy"]["sequence_kl"]["mean_rel_error"]
    assert 0 < error < 1, error  # 4 top-k entries and 8 draws: an estimate, not exact
    assert verify_ref(ref, 2, run, max_kl_error=error * 1.01)["accuracy"]["sequence_kl"]["mean_rel_error"] == error
    res = subprocess.run(
        cli + ["verify-ref", ref, "--against-live", "2", "--policy", run, "--max-kl-error", f"{error / 2}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode != 0 and "per sequence: mean relative error" in res.stdout
    assert f"off by {error:.2%}" in res.stderr and f"--max-kl-error {error / 2:.2%}" in res.stderr
    for kwargs, message in (
        ({"against_live": 0, "max_kl_error": 0.1}, "needs --against-live"),
        ({"against_live": 2, "max_kl_error": -0.1}, "fraction >= 0"),
        ({"against_live": 2, "max_kl_error": float("nan")}, "fraction >= 0"),
        ({"against_live": -1}, "--against-live must be >= 0, got -1"),
        ({"against_live": 2, "batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"against_live": 2, "batch_size": -3}, "--batch-size must be >= 1, got -3"),
    ):
        with pytest.raises(ValueError, match=message):
            verify_ref(ref, policy=run, **kwargs)
    # a run trained from the Python API on rows in memory records no train_file to read the examples from
    import shutil

    api_run = tmp_path / "api_run"
    shutil.copytree(run, api_run)
    config = yaml.safe_load((api_run / "sparsepo_config.yaml").read_text())
    del config["train_file"]
    (api_run / "sparsepo_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="api_run: its configuration names no train_file"):
        verify_ref(ref, 2, str(api_run))
    with pytest.raises(CacheError, match="--max-kl-error 0.00%"):
        verify_ref(ref, 2, run, max_kl_error=0.0)


@pytest.mark.parametrize("topk_dtype", [torch.float16, torch.bfloat16])
def test_tail_draws_stay_unbiased_when_the_top_k_is_rounded(topk_dtype):
    """16-bit top-k log-probs leave the op a tail mass r_hat that can be many times the true r when r
    is small; the stored draws are scaled to r_hat so that the KL stays unbiased (storing log q(v)
    itself gave +0.01 to +0.1 nats per token here). Rows: two tokens near 0.45 each, one near 0.1,
    a tail of ~1e-5 where the policy differs."""
    from sparsepo_lite.refcache.writer import reference_token_stats

    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    n, v, k, m = 12, 48, 3, 4
    eye, labels = torch.eye(v), torch.zeros(n, dtype=torch.long)
    while True:
        ref = torch.full((n, v), -13.0) + 0.3 * torch.randn(n, v, generator=g)
        ref[:, :3] = torch.tensor([0.0, 0.0, -1.5]) + 0.01 * torch.randn(n, 3, generator=g)
        # The rows' top-k round alike; in about 1 draw in 40 (bf16) they all round up to a mass of 1 or
        # more, so no row would exercise the correction: draw again.
        rounded = reference_token_stats(ref, eye, labels, k, topk_dtype)[2]
        if (rounded.double().exp().sum(-1) < 1).any():
            break
    pol = ref + torch.cat([0.05 * torch.randn(n, 3, generator=g), 1.5 * torch.randn(n, v - 3, generator=g)], 1)
    lq, lp = torch.log_softmax(ref.double(), -1), torch.log_softmax(pol.double(), -1)
    exact = (lq.exp() * (lq - lp)).sum(-1)
    draws = []
    for seed in range(300):
        label, ids, vals, tids, tvals = reference_token_stats(
            ref, eye, labels, k, topk_dtype, tail_samples=m, generator=torch.Generator().manual_seed(seed)
        )
        out = sp.chunked_token_stats(
            pol,
            eye,
            labels,
            seq_ids=torch.arange(n),
            num_seqs=n,
            kl_weight=torch.ones(n),
            ref=sp.TopKReference(ids, vals, label, tids, tvals),
        )
        draws.append(out.kl.double())
    kl = torch.stack(draws)
    se = kl.std(0) / kl.shape[0] ** 0.5
    # The estimator's target on the rounded top-k: the coarsened KL at r_hat plus r_hat times the
    # exact KL between the normalised tails. Storing log q(v) itself missed it by +0.01 to +0.1.
    q_hat = vals.double().exp()
    r_hat = (1 - q_hat.sum(-1)).clamp_min(0)
    in_top = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids.long(), True)
    s_tail = lp.exp().masked_fill(in_top, 0).sum(-1)
    q_t = lq.exp().masked_fill(in_top, 0)
    q_t = q_t / q_t.sum(-1, keepdim=True)
    p_t = lp.exp().masked_fill(in_top, 0) / s_tail[:, None]
    kl_tails = torch.where(q_t > 0, q_t * (q_t.log() - p_t.log()), torch.zeros_like(q_t)).sum(-1)
    target = (q_hat * (q_hat.log() - lp.gather(1, ids.long()))).sum(-1) + torch.where(
        r_hat > 0, r_hat * ((r_hat.clamp_min(1e-300).log() - s_tail.log()) + kl_tails), torch.zeros_like(r_hat)
    )
    assert ((kl.mean(0) - target).abs() <= 4 * se + 1e-6).all(), (kl.mean(0) - target, se)
    assert (r_hat > 0).any()  # some rows exercise the correction
    # The stored top-k are the exact log-probs rounded to 16 bits (within one unit in the last place),
    q_top = lq.gather(1, ids.long())
    assert ((vals.double() - q_top).abs() <= torch.finfo(topk_dtype).eps * q_top.abs()).all()

    # and what that rounding costs the KL, tail or not, is what moving each probability by its rounding
    # error can cost: by the mean value theorem on x log(x / c), at most |dx| (max |log(x / c)| + 1) over
    # the interval, plus the tail's share of its own KL (with bf16 up to 5e-3 nats per token in 3000 draws).
    def moved(a, b, c):
        logs = torch.stack([(a.clamp_min(1e-300) / c).log().abs(), (b.clamp_min(1e-300) / c).log().abs()])
        return (a - b).abs() * (logs.amax(0) + 1)

    r = lq.exp().masked_fill(in_top, 0).sum(-1)
    cost = moved(q_hat, q_top.exp(), lp.gather(1, ids.long()).exp()).sum(-1) + moved(r_hat, r, s_tail)
    cost = cost + (r_hat - r).abs() * kl_tails
    assert ((target - exact).abs() <= cost).all(), (target - exact, cost)
    assert torch.isfinite(kl).all()


def test_precompute_runs_on_one_thread_while_the_machine_is_busy(tiny_dir, tmp_path, monkeypatch):
    """Where the threads spin long (torch imported first), the precompute checks the load before each
    batch: one thread from the first busy check, all threads after three quiet ones, all threads again
    at the end; the cache is the one a quiet machine writes."""
    import sparsepo_lite.refcache.writer as writer
    from sparsepo_lite.waits import LoadGuard

    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    examples, _ = tokenize_dataset(review_rows(10), tok, max_length=32, max_prompt_length=16)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)
    kw = dict(fingerprint=fp, batch_size=2, shard_size=4, progress=False, top_k=8)
    quiet = str(tmp_path / "quiet")
    precompute_reference(model, tok, {"train": examples}, quiet, cpu_load_guard=False, **kw)

    seen, real = [], writer.reference_pass
    monkeypatch.setattr(writer, "reference_pass", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    readings = iter([5, 0, 0, 0, 5])  # others' runnable threads, one read per batch
    monkeypatch.setattr(
        writer.waits,
        "cpu_load_guard",
        lambda: LoadGuard(torch.get_num_threads(), 2, samples=1, interval_s=0, others=lambda: next(readings)),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        busy = str(tmp_path / "busy")
        precompute_reference(model, tok, {"train": examples}, busy, **kw)
        assert seen == [1, 1, 1, 2, 1]  # 10 rows, batches of 2 within shards of 4: 2 + 2 + 1 batches
        assert torch.get_num_threads() == 2  # busy at the last batch, restored at the end
        a, b = RefCache(quiet).split("train"), RefCache(busy).split("train")
        for e in examples:
            for key, value in a.lookup(e.index).items():
                torch.testing.assert_close(b.lookup(e.index)[key], value, msg=key)

        seen.clear()
        precompute_reference(model, tok, {"train": examples}, str(tmp_path / "off"), cpu_load_guard=False, **kw)
        assert seen == [2] * 5  # off: the guard is never asked
    finally:
        torch.set_num_threads(before)
