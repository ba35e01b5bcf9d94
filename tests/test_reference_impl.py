"""The oracle itself, against independent textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparsepo_lite as sp
from sparsepo_lite.testing import token_stats_reference, topk_tail_kl


def test_logp_and_exact_kl_match_torch_functional(seed):
    n, h, v = 17, 8, 40
    hid, rh = torch.randn(n, h, dtype=torch.float64), torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64)
    y = torch.randint(0, v, (n,))
    sid = torch.zeros(n, dtype=torch.long)
    out = token_stats_reference(
        hid, w, y, sid, 1, ref=sp.ExactReference(rh, w), kl_weight=torch.ones(n, dtype=torch.float64)
    )
    torch.testing.assert_close(out.logp, -F.cross_entropy(hid @ w.T, y, reduction="none"))
    lp, lq = F.log_softmax(hid @ w.T, -1), F.log_softmax(rh @ w.T, -1)
    kl = F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)  # KL(q || p)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.seq_sums, (out.logp + kl).sum().reshape(1))


def test_topk_tail_kl_on_a_hand_example():
    # p = (0.5, 0.3, 0.2), reference top-1 = token 0 with q = 0.6, tail r = 0.4 vs P_o = 0.5
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    kl = topk_tail_kl(torch.log(torch.tensor([[0.6]], dtype=torch.float64)), lp, torch.tensor([[0]]))
    want = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert kl.item() == pytest.approx(want, rel=1e-12)


def test_seq_sums_follow_weights_and_sequences(seed):
    n, v = 6, 5
    hid = torch.randn(n, 3, dtype=torch.float64)
    w = torch.randn(v, 3, dtype=torch.float64)
    y = torch.randint(0, v, (n,))
    sid = torch.tensor([0, 0, 2, 2, 2, 0])
    a = torch.randn(n, dtype=torch.float64)
    out = token_stats_reference(hid, w, y, sid, 3, logp_weight=a)
    want = torch.stack([(a * out.logp)[sid == s].sum() for s in range(3)])
    torch.testing.assert_close(out.seq_sums, want)
    assert out.seq_sums[1] == 0
