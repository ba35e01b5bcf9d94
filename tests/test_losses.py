"""Pair losses over per-sequence sums: the method table and its reductions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparsepo_lite as sp
from sparsepo_lite.losses import pair_stats, preference_loss, token_weights_for

from conftest import make_problem


def _pairs(seed_n=24, pairs=3, h=8, v=40):
    p = make_problem(seed_n, h, v, "exact", dtype=torch.float64)
    p.seq_ids = torch.arange(2 * pairs).repeat_interleave(seed_n // (2 * pairs))
    return p


def _loss(p, loss_type, alpha=0.5, **kw):
    u, d = token_weights_for(
        loss_type, p.seq_ids.max().item() // 2 + 1, p.seq_ids, alpha=alpha, dtype=torch.float64, **kw
    )
    ps = pair_stats(p.hidden, p.weight, p.labels, p.seq_ids, p.seq_ids.max().item() // 2 + 1, p.ref, u, d)
    return preference_loss(ps, loss_type, 0.1, alpha=alpha), ps


def test_loss_is_log2_when_policy_equals_reference():
    p = _pairs()
    p.ref = sp.ExactReference(p.hidden.detach(), p.weight)
    for lt in ("dpo", "tdpo1", "tdpo2"):
        loss, ps = _loss(p, lt)
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
        assert ps.kl.abs().max() < 1e-12


def test_tdpo2_is_tdpo1_when_alpha_is_1_and_the_stop_gradient_is_removed(seed):
    p = _pairs()
    b = 3
    tdpo1, _ = _loss(p, "tdpo1")
    g1 = torch.autograd.grad(tdpo1.sum(), [p.hidden])[0]
    # TDPO2 with alpha = 1 has TDPO1's value; its gradient differs only by the chosen KL's.
    tdpo2, ps = _loss(p, "tdpo2", alpha=1.0)
    torch.testing.assert_close(tdpo2, tdpo1)
    # Without the stop-gradient (d = alpha on the chosen rows too) the gradient matches as well.
    u, d = token_weights_for("tdpo2", b, p.seq_ids, alpha=1.0, dtype=torch.float64)
    d = torch.ones_like(d)
    ps = pair_stats(p.hidden, p.weight, p.labels, p.seq_ids, b, p.ref, u, d)
    no_sg = preference_loss(ps, "tdpo1", 0.1)
    torch.testing.assert_close(no_sg, tdpo1)
    torch.testing.assert_close(torch.autograd.grad(no_sg.sum(), [p.hidden])[0], g1)
    g2 = torch.autograd.grad(_loss(p, "tdpo2", alpha=1.0)[0].sum(), [p.hidden])[0]
    assert (g2 - g1).abs().max() > 1e-8  # the stop-gradient does something


def test_sparsepo_with_unit_masks_is_tdpo1(seed):
    p = _pairs()
    ones = torch.ones(p.labels.shape[0], dtype=torch.float64)
    sparse, _ = _loss(p, "sparsepo", reward_mask=ones, kl_mask=ones)
    tdpo1, _ = _loss(p, "tdpo1")
    torch.testing.assert_close(sparse, tdpo1)


def test_dpo_value_and_label_smoothing_match_the_formula(seed):
    p = _pairs()
    loss, ps = _loss(p, "dpo")
    lp = torch.log_softmax(p.hidden.double() @ p.weight.T, -1).gather(1, p.labels[:, None]).squeeze(1)
    lq = torch.log_softmax(p.ref.hidden @ p.weight.T, -1).gather(1, p.labels[:, None]).squeeze(1)
    s = torch.zeros(6, dtype=torch.float64).index_add(0, p.seq_ids, lp - lq)
    z = s[:3] - s[3:]
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * z))
    smooth = preference_loss(ps, "dpo", 0.1, label_smoothing=0.2)
    torch.testing.assert_close(smooth, -0.8 * F.logsigmoid(0.1 * z) - 0.2 * F.logsigmoid(-0.1 * z))


def test_masks_learn_through_the_reward_and_kl_terms(seed):
    # d loss / d m^u_t = -g delta_t on chosen tokens, delta = logp - ref_logp.
    p = _pairs()
    n = p.labels.shape[0]
    m_u = torch.rand(n, dtype=torch.float64, requires_grad=True)
    m_d = torch.rand(n, dtype=torch.float64, requires_grad=True)
    loss, ps = _loss(p, "sparsepo", reward_mask=m_u, kl_mask=m_d)
    gu, gd = torch.autograd.grad(loss.sum(), [m_u, m_d])
    z = ps.total[:3] - ps.total[3:]
    g = 0.1 * torch.sigmoid(-0.1 * z)
    sign = torch.where(p.seq_ids < 3, -1.0, 1.0).double()
    lp = torch.log_softmax(p.hidden.detach() @ p.weight.T, -1)
    lq = torch.log_softmax(p.ref.hidden @ p.weight.T, -1)
    delta = (lp - lq).gather(1, p.labels[:, None]).squeeze(1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    pair = p.seq_ids % 3
    torch.testing.assert_close(gu, sign * g[pair] * delta)
    torch.testing.assert_close(gd, sign * g[pair] * kl)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'ipo'"):
        token_weights_for("ipo", 1, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("loss_type", ["dpo", "tdpo1"])
def test_long_sequences_keep_the_small_log_ratio_in_fp32(seed, loss_type):
    """Two 2048-token responses whose label log-probs are about -8 each: the sums of log-probs are
    ~-16k, where float32 steps by 1e-3, but U + D is a small log-ratio. Its fp32 value must match
    float64 to well below what a float32 sum of log-probs minus the reference's sum would lose."""
    T, h, v = 2048, 16, 3000
    hidden = torch.randn(2 * T, h, dtype=torch.float64) * 1.5
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.5
    ref_hidden = hidden + 0.05 * torch.randn_like(hidden)
    labels = torch.randint(0, v, (2 * T,))
    seq_ids = torch.arange(2).repeat_interleave(T)
    lp = torch.log_softmax(hidden @ weight.T, -1)
    lq = torch.log_softmax(ref_hidden @ weight.T, -1)
    per_token = (lp - lq).gather(1, labels[:, None]).squeeze(1)
    if loss_type == "tdpo1":
        per_token = per_token + (lq.exp() * (lq - lp)).sum(-1)
    expected = torch.zeros(2, dtype=torch.float64).index_add(0, seq_ids, per_token)
    assert lp.gather(1, labels[:, None]).mean() < -7  # the regime where the sums are large

    u, d = token_weights_for(loss_type, 1, seq_ids)
    ref = sp.ExactReference(ref_hidden.float(), weight.float())
    ps = pair_stats(hidden.float().requires_grad_(), weight.float(), labels, seq_ids, 1, ref, u, d)
    assert ps.total.dtype == torch.float32
    torch.testing.assert_close(ps.total.double(), expected, rtol=0, atol=2e-3)
