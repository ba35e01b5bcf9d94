"""chunked_token_stats (compiled op) against the float64 full-logits oracle."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsepo_lite as sp
from sparsepo_lite.testing import token_stats_reference

from conftest import DEVICES, compare_with_oracle, leaves, make_problem, sample_tail, upstream_loss

REF_KINDS = ["exact", "topk", "sampled", "label", "none"]
# (N, H, V, chunk): chunks that do not divide N, a chunk of 1, a chunk larger than N, N = 1
SHAPES = [(37, 16, 101, 8), (64, 32, 500, 7), (5, 8, 33, 1), (1, 8, 10, 4), (50, 24, 257, 128)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_kind", REF_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}-c{}".format(*s))
def test_matches_float64_oracle_fp32(shape, ref_kind, device, seed):
    n, h, v, chunk = shape
    p = make_problem(n, h, v, ref_kind, device=device, k=min(9, v))
    compare_with_oracle(p, chunk, torch.float32, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ref_kind", REF_KINDS)
def test_matches_float64_oracle_low_precision(ref_kind, dtype, device, seed):
    p = make_problem(45, 32, 211, ref_kind, dtype=dtype, device=device, k=16, logit_scale=1.0)
    compare_with_oracle(p, 16, dtype, seed)


@pytest.mark.parametrize("ref_kind", REF_KINDS)
def test_float64_matches_oracle_tightly(ref_kind, seed):
    p = make_problem(23, 12, 97, ref_kind, dtype=torch.float64, k=11)
    out = sp.chunked_token_stats(*p.args(), **p.kwargs(), chunk_size=6)
    ora = token_stats_reference(*p.args(), **p.kwargs())
    torch.testing.assert_close(out.seq_sums, ora.seq_sums, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad(upstream_loss(out.seq_sums), leaves(p))
    w = torch.autograd.grad(upstream_loss(ora.seq_sums), leaves(p))
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ref_kind", REF_KINDS)
def test_gradcheck_float64(ref_kind, seed):
    p = make_problem(9, 5, 13, ref_kind, dtype=torch.float64, k=4, num_seqs=3)

    def f(hidden, logp_weight, *kl_weight):
        kw = dict(logp_weight=logp_weight, ref=p.ref, chunk_size=4)
        if kl_weight:
            kw["kl_weight"] = kl_weight[0]
        return sp.chunked_token_stats(hidden, p.weight, p.labels, p.seq_ids, p.num_seqs, **kw).seq_sums

    assert torch.autograd.gradcheck(f, tuple(leaves(p)), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("ref_hidden_size", [12, 7])
def test_exact_reference_with_its_own_head(ref_hidden_size, seed):
    # A separate reference model (own head, possibly another hidden size) takes the two-GEMM path
    # instead of the stacked shared-head GEMM.
    p = make_problem(33, 12, 80, "exact")
    ref_hidden = torch.randn(33, ref_hidden_size)
    ref_weight = torch.randn(80, ref_hidden_size) / ref_hidden_size**0.5
    p.ref = sp.ExactReference(ref_hidden, ref_weight)
    compare_with_oracle(p, 10, torch.float32, seed)


def test_results_are_detached_except_seq_sums(seed):
    p = make_problem(10, 8, 30, "exact")
    out = sp.chunked_token_stats(*p.args(), **p.kwargs())
    assert out.seq_sums.requires_grad
    assert not (out.logp.requires_grad or out.ref_logp.requires_grad or out.kl.requires_grad)
    assert out.seq_sums.shape == (p.num_seqs,) and out.logp.shape == out.kl.shape == (10,)


def test_no_grad_mode_skips_the_gradient_gemm(seed):
    p = make_problem(10, 8, 30, "exact")
    with torch.no_grad():
        out = sp.chunked_token_stats(*p.args(), **p.kwargs())
    assert not out.seq_sums.requires_grad
    raw = torch.ops.sparsepo_lite.token_stats(
        p.hidden.detach(),
        p.weight,
        p.labels,
        p.seq_ids,
        p.num_seqs,
        p.logp_weight.detach(),
        p.kl_weight.detach(),
        3,
        p.ref.hidden,
        p.ref.weight,
        None,
        None,
        None,
        None,
        None,
        4,
        False,
    )
    assert raw[4].shape == (0, 8)  # no [N, H] gradient factor formed


def test_default_chunk_size_respects_budget():
    V, budget = 128_256, sp.DEFAULT_CHUNK_BYTES
    for dtype, exact, per_row in [
        (torch.float32, True, 8 * V),
        (torch.float32, False, 4 * V),
        (torch.bfloat16, True, 10 * V),
        (torch.float64, True, 16 * V),
    ]:
        most = budget // per_row - (budget // per_row) % 16  # the budget's rows, a multiple of 16
        for n in (10_000, 4096, 1024, most + 1, 3 * most):
            rows = sp.default_chunk_size(n, V, dtype, exact=exact)
            chunks = -(-n // rows)
            assert rows % 16 == 0 and rows * per_row <= budget, (dtype, exact, n, rows)
            assert chunks == -(-n // most), (dtype, exact, n, rows)  # no more chunks than the budget needs
            assert n - (chunks - 1) * rows >= rows - 16 * chunks, (dtype, exact, n, rows)  # no short last chunk
    assert sp.default_chunk_size(10_000, V, torch.float32, exact=True) == 384  # documented in docs/op.md
    assert sp.default_chunk_size(1024, V, torch.float32, exact=False) == 512  # 2 x 512, not 784 + 240
    assert sp.default_chunk_size(3, V, torch.float32, exact=True) == 3
    assert sp.default_chunk_size(0, 10, torch.float32, exact=True) == 1


# --- the top-k (tail bucket) reference -------------------------------------------------------


def _topk_vs_exact(n, h, v, k, dtype=torch.float64, noise=1.0):
    p = make_problem(n, h, v, "exact", dtype=dtype, ref_noise=noise)
    lq = torch.log_softmax(p.ref.hidden.double() @ p.weight.double().T, dim=-1)
    vals, ids = lq.topk(k, dim=-1)
    label_logp = lq.gather(1, p.labels[:, None]).squeeze(1)
    topk = sp.TopKReference(ids, vals.to(dtype), label_logp.to(dtype))
    return p, topk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_topk_with_k_equal_v_is_the_exact_kl(dtype, seed):
    p, topk = _topk_vs_exact(30, 16, 64, 64, dtype=dtype)
    exact = sp.chunked_token_stats(*p.args(), kl_weight=p.kl_weight, ref=p.ref, chunk_size=7)
    approx = sp.chunked_token_stats(*p.args(), kl_weight=p.kl_weight, ref=topk, chunk_size=7)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(approx.kl, exact.kl, rtol=tol, atol=tol)
    torch.testing.assert_close(approx.ref_logp, exact.ref_logp, rtol=tol, atol=tol)
    ga = torch.autograd.grad(upstream_loss(approx.seq_sums), [p.hidden, p.kl_weight])
    ge = torch.autograd.grad(upstream_loss(exact.seq_sums), [p.hidden, p.kl_weight])
    for a, b in zip(ga, ge):
        torch.testing.assert_close(a, b, rtol=100 * tol, atol=100 * tol)


@pytest.mark.parametrize("k", [1, 4, 16, 63])
def test_topk_kl_is_a_lower_bound_of_the_exact_kl(k, seed):
    p, topk = _topk_vs_exact(40, 16, 64, k, noise=2.0)
    exact = sp.chunked_token_stats(*p.args(), ref=p.ref).kl
    approx = sp.chunked_token_stats(*p.args(), ref=topk).kl
    assert (approx >= -1e-12).all()
    assert (approx <= exact + 1e-10).all(), (approx - exact).max()
    if k == 1:
        assert (approx < exact - 1e-6).any()  # the bound is not trivially tight


def test_topk_accepts_16bit_logprobs_and_int32_ids(seed):
    p, topk = _topk_vs_exact(20, 16, 80, 8, dtype=torch.float32)
    half = sp.TopKReference(topk.ids.int(), topk.logprobs.half(), topk.label_logp)
    a = sp.chunked_token_stats(*p.args(), ref=topk).kl
    b = sp.chunked_token_stats(*p.args(), ref=half).kl
    torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


def test_topk_tail_with_vanishing_policy_mass_stays_finite():
    # The policy puts (numerically) all its mass on the top-k ids while the reference keeps
    # some outside: the KL is large but finite, and so is the gradient.
    h = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0], [0.0], [-2000.0], [-2000.0]], dtype=torch.float64)
    ref = sp.TopKReference(
        torch.tensor([[0, 1]]),
        torch.log(torch.tensor([[0.45, 0.45]], dtype=torch.float64)),
        torch.tensor([-0.8], dtype=torch.float64),
    )
    out = sp.chunked_token_stats(
        h, w, torch.tensor([0]), torch.tensor([0]), 1, ref=ref, kl_weight=torch.ones(1, dtype=torch.float64)
    )
    assert torch.isfinite(out.kl).all() and out.kl.item() > 10
    (g,) = torch.autograd.grad(out.seq_sums.sum(), [h])
    assert torch.isfinite(g).all()


def _tail_problem(n, h, v, k, m, draws, seed_gen):
    """A problem with an exact reference, and the same rows repeated ``draws`` times with a top-k
    reference whose ``m`` tail samples are fresh draws in every repeat."""
    p = make_problem(n, h, v, "exact", dtype=torch.float64, ref_noise=1.5, logit_scale=2.0)
    lq = torch.log_softmax(p.ref.hidden @ p.weight.T, dim=-1)
    vals, ids = lq.topk(k, dim=-1)
    label = lq.gather(1, p.labels[:, None]).squeeze(1)
    rep = lambda t: t.repeat(draws, *([1] * (t.dim() - 1)))
    tail_ids = sample_tail(rep(lq), rep(ids), m, generator=seed_gen)
    ref = sp.TopKReference(rep(ids), rep(vals), rep(label), tail_ids, rep(lq).gather(1, tail_ids))
    hidden = rep(p.hidden.detach()).requires_grad_(True)
    return p, ref, hidden


def _one_draw_moments(p, ref, n, k):
    """Mean, variance and largest deviation from the mean over the tail distribution of the KL
    estimate and of its gradient with one tail sample, by enumerating every tail token of each row:
    ``(kl_mean [n], kl_var [n], kl_dev [n], g_mean [n, H], g_var [n, H], g_dev [n, H])``. The
    estimate is the mean of its samples' terms, so m samples have the same mean and 1/m the variance."""
    lq = torch.log_softmax(p.ref.hidden @ p.weight.T, dim=-1)
    rows, tails = [], []
    for r in range(n):
        tail = torch.ones(lq.shape[1], dtype=torch.bool)
        tail[ref.ids[r].long()] = False
        ids = tail.nonzero().squeeze(1)
        rows += [r] * len(ids)
        tails.append(ids)
    rows, tails = torch.tensor(rows), torch.cat(tails)[:, None]
    one = sp.TopKReference(ref.ids[rows], ref.logprobs[rows], ref.label_logp[rows], tails, lq[rows].gather(1, tails))
    hidden = p.hidden.detach()[rows].requires_grad_(True)
    t = len(rows)
    out = sp.chunked_token_stats(
        hidden,
        p.weight,
        p.labels[rows],
        torch.arange(t),
        t,
        logp_weight=torch.zeros(t, dtype=torch.float64),
        kl_weight=torch.ones(t, dtype=torch.float64),
        ref=one,
    )
    (g,) = torch.autograd.grad(out.seq_sums.sum(), [hidden])
    q = lq[rows].gather(1, tails).squeeze(1).exp()  # how likely each row's draw is: its tail, renormalised
    q = q / torch.zeros(n, dtype=q.dtype).index_add_(0, rows, q)[rows]
    kl_mean = torch.zeros(n, dtype=q.dtype).index_add_(0, rows, q * out.kl)
    kl_var = torch.zeros(n, dtype=q.dtype).index_add_(0, rows, q * (out.kl - kl_mean[rows]) ** 2)
    g_mean = torch.zeros(n, g.shape[1], dtype=q.dtype).index_add_(0, rows, q[:, None] * g)
    g_var = torch.zeros(n, g.shape[1], dtype=q.dtype).index_add_(0, rows, q[:, None] * (g - g_mean[rows]) ** 2)
    kl_dev = torch.zeros(n, dtype=q.dtype).scatter_reduce_(0, rows, (out.kl - kl_mean[rows]).abs(), "amax")
    g_dev = torch.zeros_like(g_mean).scatter_reduce_(0, rows[:, None].expand_as(g), (g - g_mean[rows]).abs(), "amax")
    return kl_mean, kl_var, kl_dev, g_mean, g_var, g_dev


def _bernstein(var, dev, samples, fail=1e-6):
    """How far the mean of ``samples`` independent terms of variance ``var``, each at most ``dev``
    from their expectation, strays from it with probability at most ``fail`` (Bernstein's
    inequality). Unlike a multiple of the standard error it holds for terms with a heavy tail."""
    log = math.log(2 / fail)
    return (2 * var * log / samples).sqrt() + 2 / 3 * dev * log / samples


@pytest.mark.parametrize("n, h, v, k, m", [(5, 8, 40, 4, 4), (4, 16, 300, 16, 8), (3, 8, 60, 1, 1)])
def test_sampled_tail_kl_is_unbiased(n, h, v, k, m, seed):
    """The KL estimate's expectation over the tail draws, enumerated token by token, is the exact KL,
    and so is its gradient's. Over many real draws the mean estimate is the exact KL within the
    estimator's own bound, and so is the mean gradient; the bucket alone is biased low. The bound
    comes from the enumeration (Bernstein's inequality, not a multiple of the sample's standard
    error): a rare tail token can carry a large term (one drawn with probability 4e-5 gave 481 nats
    against a KL of 0.89), which a sample's spread misses and one lucky draw shifts the mean by."""
    draws = 3000
    p, ref, hidden = _tail_problem(n, h, v, k, m, draws, torch.Generator().manual_seed(seed))
    h0 = p.hidden.detach().requires_grad_(True)
    exact = sp.chunked_token_stats(
        h0,
        p.weight,
        p.labels,
        torch.arange(n),
        n,
        logp_weight=torch.zeros(n, dtype=torch.float64),
        kl_weight=torch.ones(n, dtype=torch.float64),
        ref=p.ref,
    )
    (g_exact,) = torch.autograd.grad(exact.seq_sums.sum(), [h0])
    rows = n * draws
    est = sp.chunked_token_stats(
        hidden,
        p.weight,
        p.labels.repeat(draws),
        torch.arange(rows),
        rows,
        logp_weight=torch.zeros(rows, dtype=torch.float64),
        kl_weight=torch.ones(rows, dtype=torch.float64),
        ref=ref,
        chunk_size=997,
    )
    (g_est,) = torch.autograd.grad(est.seq_sums.sum(), [hidden])
    kl_mean, kl_var, kl_dev, g_mean_exact, g_var, g_dev = _one_draw_moments(p, ref, n, k)
    torch.testing.assert_close(kl_mean, exact.kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_mean_exact, g_exact, rtol=1e-9, atol=1e-11)
    kl = est.kl.view(draws, n)
    mean, se = kl.mean(0), (kl_var / m / draws).sqrt()
    bound = _bernstein(kl_var, kl_dev, draws * m)
    assert ((mean - exact.kl).abs() <= bound + 1e-12).all(), (mean, exact.kl, bound)
    bucket = sp.chunked_token_stats(
        p.hidden.detach(),
        p.weight,
        p.labels,
        torch.arange(n),
        n,
        ref=sp.TopKReference(ref.ids[:n], ref.logprobs[:n], ref.label_logp[:n]),
    ).kl
    assert (bucket <= exact.kl + 1e-12).all() and ((exact.kl - bucket) > 10 * se).any()  # the bias it removes
    g = g_est.view(draws, n, h)
    g_mean, g_bound = g.mean(0), _bernstein(g_var, g_dev, draws * m)
    assert (g_mean - g_exact).norm() <= g_bound.norm(), ((g_mean - g_exact).norm(), g_bound.norm())


def test_no_tail_samples_is_the_bucket_exactly(seed):
    p = make_problem(30, 12, 90, "topk", k=7)
    r = p.ref
    empty = sp.TopKReference(r.ids, r.logprobs, r.label_logp, r.ids[:, :0], r.logprobs[:, :0])
    a = sp.chunked_token_stats(*p.args(), **p.kwargs(), chunk_size=8)
    b = sp.chunked_token_stats(*p.args(), logp_weight=p.logp_weight, kl_weight=p.kl_weight, ref=empty, chunk_size=8)
    assert torch.equal(a.kl, b.kl) and torch.equal(a.seq_sums, b.seq_sums)
    ga = torch.autograd.grad(a.seq_sums.sum(), [p.hidden])
    gb = torch.autograd.grad(b.seq_sums.sum(), [p.hidden])
    assert torch.equal(ga[0], gb[0])


# --- bad input gets a clear error ------------------------------------------------------------


def _base(ref_kind="exact"):
    return make_problem(12, 8, 20, ref_kind)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (
            lambda p: p.__setattr__("labels", p.labels.clone().index_fill_(0, torch.tensor([3]), 20)),
            ValueError,
            r"labels must lie in \[0, V\) with V = 20; got values in \[0, 20\]",
        ),
        (
            lambda p: p.__setattr__("labels", p.labels.clone().index_fill_(0, torch.tensor([3]), -1)),
            ValueError,
            r"labels must lie in \[0, V\)",
        ),
        (
            lambda p: p.__setattr__("seq_ids", p.seq_ids.clone().index_fill_(0, torch.tensor([2]), 99)),
            ValueError,
            r"seq_ids must lie in \[0, num_seqs\)",
        ),
        (lambda p: p.__setattr__("labels", p.labels.float()), TypeError, r"labels must have dtype"),
        (lambda p: p.__setattr__("labels", p.labels[:-1]), ValueError, r"labels must have shape \[N\] = \[12\]"),
        (lambda p: p.__setattr__("weight", p.weight.double()), TypeError, r"weight dtype torch.float64 differs"),
        (lambda p: p.__setattr__("weight", p.weight[:, :-1]), ValueError, r"weight must be \[V, H\] with H = 8"),
        (lambda p: p.__setattr__("weight", p.weight.to("meta")), ValueError, r"weight is on meta but hidden is on cpu"),
        (lambda p: p.__setattr__("weight", p.weight.clone().requires_grad_(True)), ValueError, r"weight requires grad"),
        (lambda p: p.__setattr__("hidden", p.hidden.detach().long()), TypeError, r"hidden must be floating point"),
        (
            lambda p: p.__setattr__("logp_weight", p.logp_weight.detach()[:5]),
            ValueError,
            r"logp_weight must have shape",
        ),
        (
            lambda p: p.__setattr__("ref", sp.ExactReference(p.ref.hidden[:-1], p.ref.weight)),
            ValueError,
            r"ExactReference.hidden must have N = 12 rows",
        ),
        (
            lambda p: p.__setattr__("ref", sp.ExactReference(p.ref.hidden.clone().requires_grad_(True), p.ref.weight)),
            ValueError,
            r"ExactReference.hidden requires grad",
        ),
        (
            lambda p: p.__setattr__("ref", sp.ExactReference(p.ref.hidden, p.ref.weight[:7])),
            ValueError,
            r"ExactReference.weight must be \[V, H'\]",
        ),
        (
            lambda p: p.__setattr__("ref", sp.LabelReference(p.labels.float())),
            ValueError,
            r"kl_weight needs a reference distribution",
        ),
        (lambda p: p.__setattr__("ref", "exact"), TypeError, r"ref must be ExactReference"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    p = _base()
    mutate(p)
    with pytest.raises(exc, match=match):
        sp.chunked_token_stats(*p.args(), **p.kwargs())


def _outside(r):
    """For every token, two ids outside its top-k."""
    free = torch.ones(r.ids.shape[0], 20, dtype=torch.bool).scatter(1, r.ids.long(), False)
    return free.float().multinomial(2).to(r.ids.dtype)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda r: sp.TopKReference(
                r.ids.clone().index_fill_(1, torch.tensor([1]), 0).index_fill_(1, torch.tensor([0]), 0),
                r.logprobs,
                r.label_logp,
            ),
            r"distinct within each token \(first at token 0 of sequence 0; 12 tokens in all\)",
        ),
        (lambda r: sp.TopKReference(r.ids + 20, r.logprobs, r.label_logp), r"topk ids must lie in \[0, V\)"),
        (lambda r: sp.TopKReference(r.ids, r.logprobs.clone().fill_(float("nan")), r.label_logp), r"contain NaN"),
        (lambda r: sp.TopKReference(r.ids, -r.logprobs, r.label_logp), r"must be log-probabilities"),
        (lambda r: sp.TopKReference(r.ids[:, :0], r.logprobs[:, :0], r.label_logp), r"1 <= k <= V"),
        (
            lambda r: sp.TopKReference(r.ids, r.logprobs, r.label_logp, r.ids[:, :2], r.logprobs[:, :2]),
            r"tail ids must lie outside the top-k ids of their token.*\(first at token 0 of sequence 0; 12 tokens in all\)",
        ),
        (lambda r: sp.TopKReference(r.ids, r.logprobs, r.label_logp, _outside(r), None), r"come together"),
        (
            lambda r: sp.TopKReference(
                r.ids, r.logprobs, r.label_logp, _outside(r), torch.full(_outside(r).shape, float("-inf"))
            ),
            r"tail log-probs must be finite",
        ),
        (
            lambda r: sp.TopKReference(
                r.ids, r.logprobs, r.label_logp, _outside(r) + 20, torch.full(_outside(r).shape, -3.0)
            ),
            r"tail ids must lie in \[0, V\)",
        ),
        (
            lambda r: sp.TopKReference(
                r.ids, r.logprobs, r.label_logp, _outside(r)[:-1], torch.full(_outside(r)[:-1].shape, -3.0)
            ),
            r"tail_ids must be an int \[N, m\] tensor",
        ),
    ],
)
def test_bad_topk_cache_raises_clear_errors(mutate, match):
    p = _base("topk")
    p.ref = mutate(p.ref)
    with pytest.raises(ValueError, match=match):
        sp.chunked_token_stats(*p.args(), **p.kwargs())


def test_raw_op_checks_values_too():
    # Direct callers of torch.ops.sparsepo_lite.token_stats get the same range checks.
    p = _base()
    bad = p.labels.clone()
    bad[0] = 20
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\)"):
        torch.ops.sparsepo_lite.token_stats(
            p.hidden.detach(),
            p.weight,
            bad,
            p.seq_ids,
            p.num_seqs,
            p.logp_weight.detach(),
            p.kl_weight.detach(),
            3,
            p.ref.hidden,
            p.ref.weight,
            None,
            None,
            None,
            None,
            None,
            4,
            False,
        )


def _damage_tokens(field, value, tokens):
    """A top-k reference (with tail draws) whose ``field`` is ``value`` in column 1 at ``tokens`` only
    ("repeat": column 0's id again; "top-k": an id of the token's own top-k)."""

    def damage(r):
        parts = dict(ids=r.ids, logprobs=r.logprobs, tail_ids=r.tail_ids, tail_logprobs=r.tail_logprobs)
        if field == "label_logp":
            label = r.label_logp.clone()
            label[tokens] = value
            return sp.TopKReference(label_logp=label, **parts)
        parts[field] = parts[field].clone()
        for t in tokens:
            if value == "repeat":
                parts[field][t, 1] = parts[field][t, 0]
            elif value == "top-k":
                parts[field][t, 1] = r.ids[t, 2]
            else:
                parts[field][t, 1] = value
        return sp.TopKReference(label_logp=r.label_logp, **parts)

    return damage


@pytest.mark.skipif(not sp.HAVE_EXTENSION, reason="compares the compiled op with the fallback")
@pytest.mark.parametrize("tokens", [[17], [17, 3, 29]])
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ids", "repeat", "topk ids must be distinct within each token"),
        ("logprobs", float("nan"), "topk log-probs contain NaN"),
        ("logprobs", 0.7, "topk log-probs must be log-probabilities (<= 0); found 0.7 "),
        ("logprobs", 0.0, "topk log-probs hold more than probability 1 for a token"),  # 1 + the others' mass
        ("label_logp", float("nan"), "reference label log-probs must be finite log-probabilities (<= 0)"),
        ("label_logp", float("-inf"), "reference label log-probs must be finite log-probabilities (<= 0)"),
        ("label_logp", 0.7, "reference label log-probs must be finite log-probabilities (<= 0)"),
        ("tail_ids", "top-k", "tail ids must lie outside the top-k ids of their token"),
        ("tail_logprobs", float("-inf"), "tail log-probs must be finite"),
        ("tail_logprobs", float("nan"), "tail log-probs must be finite"),
        ("tail_logprobs", 0.7, "tail log-probs must be log-probabilities (<= 0); found 0.7 "),
    ],
)
def test_a_bad_reference_value_names_its_token_and_sequence_in_both_implementations(field, value, message, tokens):
    """The compiled op and the pure-PyTorch one give the same message, naming the first bad token's
    row, its sequence (the batch row) and how many tokens are bad."""
    from sparsepo_lite.ops.fallback import token_stats_torch

    p = make_problem(30, 8, 40, "sampled", k=6, m=3)
    r = _damage_tokens(field, value, tokens)(p.ref)
    args = (p.hidden.detach(), p.weight, p.labels, p.seq_ids, p.num_seqs, p.logp_weight, p.kl_weight, 2)
    args += (None, None, r.ids, r.logprobs, r.tail_ids, r.tail_logprobs, r.label_logp, 7, False)
    first = min(tokens)
    n = len(tokens)
    where = f"(first at token {first} of sequence {int(p.seq_ids[first])}; {n} token{'s' if n > 1 else ''} in all)"
    said = []
    for op in (torch.ops.sparsepo_lite.token_stats, token_stats_torch):
        with pytest.raises(ValueError) as info:
            op(*args)
        said.append(str(info.value).splitlines()[0])
    assert said[0] == said[1], said
    assert said[1].startswith(message) and said[1].endswith(where), said[1]


def test_a_label_only_reference_checks_its_values_and_any_chunk_size_runs():
    """A LabelReference's log-probs were taken as given (NaN, +5); a head without rows divided by
    zero; a chunk past int64 failed in the op's schema."""
    p = make_problem(12, 8, 20, "exact")
    args = (p.hidden.detach(), p.weight, p.labels, p.seq_ids, p.num_seqs)
    for bad in (float("nan"), 5.0):
        label = torch.full((12,), -2.0)
        label[4] = bad
        with pytest.raises(ValueError, match=r"reference label log-probs must be finite .*first at token 4 of"):
            sp.chunked_token_stats(*args, ref=sp.LabelReference(label))
    with pytest.raises(ValueError, match=r"weight must have at least one row \(V >= 1\), got \[0, 8\]"):
        sp.chunked_token_stats(p.hidden.detach(), p.weight[:0], p.labels, p.seq_ids, p.num_seqs)
    # bfloat16 rounds a flat top-k's equal log-probs all one way: 983 of 1024 at -log 983 hold 1.0157
    ids = torch.stack([torch.randperm(1024)[:983] for _ in range(12)]).int()
    flat = torch.full((12, 983), -math.log(983)).to(torch.bfloat16)
    assert torch.logsumexp(flat.float(), dim=1)[0] > 1e-2
    head = torch.randn(1024, 8)
    sp.chunked_token_stats(
        p.hidden.detach(),
        head,
        p.labels,
        p.seq_ids,
        p.num_seqs,
        ref=sp.TopKReference(ids, flat, torch.full((12,), -7.0)),
    )
    whole = sp.chunked_token_stats(*args, chunk_size=2**63)
    assert torch.equal(whole.logp, sp.chunked_token_stats(*args, chunk_size=12).logp)


def test_empty_input_gives_zero_sums():
    h = torch.zeros(0, 8, requires_grad=True)
    out = sp.chunked_token_stats(
        h, torch.randn(20, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3
    )
    assert out.seq_sums.tolist() == [0.0, 0.0, 0.0] and out.logp.shape == (0,)
    out.seq_sums.sum().backward()
    assert h.grad.shape == (0, 8)


def test_extension_is_built():
    # CI builds the extension; a silent fallback would leave the compiled op untested.
    if os.environ.get("SPARSEPO_LITE_DISABLE_EXTENSION") == "1":
        pytest.skip("extension disabled on purpose")
    assert sp.HAVE_EXTENSION, f"sparsepo_lite._C failed to import: {sp.EXTENSION_ERROR}"


def test_torch_compile_smoke(seed):
    p = make_problem(30, 16, 64, "exact")

    def tdpo_like(hidden, ref_hidden, weight, labels, seq_ids, kl_weight):
        out = sp.chunked_token_stats(
            hidden,
            weight,
            labels,
            seq_ids,
            2,
            kl_weight=kl_weight,
            ref=sp.ExactReference(ref_hidden, weight),
            chunk_size=8,
        )
        return -torch.nn.functional.logsigmoid(0.1 * (out.seq_sums[0] - out.seq_sums[1]))

    seq_ids = (torch.arange(30) >= 12).long()
    args = (p.ref.hidden, p.weight, p.labels, seq_ids, p.kl_weight.detach())
    h1 = p.hidden.detach().clone().requires_grad_(True)
    h2 = p.hidden.detach().clone().requires_grad_(True)
    eager = tdpo_like(h1, *args)
    compiled = torch.compile(tdpo_like, fullgraph=True)(h2, *args)  # default backend (inductor)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(h2.grad, h1.grad)


_MEMORY_PROBE = textwrap.dedent("""
    import sys, torch, sparsepo_lite as sp
    from sparsepo_lite.peak_memory import PeakMemory
    impl, n = sys.argv[1], int(sys.argv[2])
    H, V = 64, 32000
    torch.manual_seed(0)
    W = torch.randn(V, H) / 8
    h = torch.randn(n, H, requires_grad=True); rh = h.detach() + 0.1 * torch.randn(n, H)
    y = torch.randint(0, V, (n,)); sid = (torch.arange(n) >= n // 2).long(); kw = torch.ones(n)
    with PeakMemory() as pm:
        if impl == "op":
            out = sp.chunked_token_stats(h, W, y, sid, 2, kl_weight=kw, ref=sp.ExactReference(rh, W), chunk_size=128)
            out.seq_sums.sum().backward()
        else:
            from sparsepo_lite.testing import token_stats_reference
            out = token_stats_reference(h, W, y, sid, 2, kl_weight=kw, ref=sp.ExactReference(rh, W))
            out.seq_sums.sum().backward()
    print(pm.peak_bytes)
""")


def _peak(impl, n):
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, impl, str(n)], capture_output=True, text=True, check=True
    )
    return int(res.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_tokens_beyond_n_by_h():
    n1, n2, H = 256, 2048, 64
    growth = _peak("op", n2) - _peak("op", n1)
    # Allowed per extra token: the [N, H] gradient factor, the [N, H] hidden gradient and its
    # temporary (fp32), plus a few [N] vectors; chunk buffers do not grow with N.
    allowed = (n2 - n1) * (4 * H * 4 + 64) + 4 * 2**20
    assert growth <= allowed, f"op peak grew by {growth / 2**20:.1f} MiB from N={n1} to N={n2}"
    # The same probe sees the full-logits oracle grow by [N, V] tensors: it can tell them apart.
    eager_growth = _peak("eager", n2) - _peak("eager", n1)
    assert eager_growth > 10 * allowed
