"""Pair losses of the family, written once over per-sequence sums.

Every method is

    z_i = [U(y_w) + D(y_w)] - [U(y_l) + D(y_l)]  (+ detached terms),   loss_i = -log sigmoid(beta z_i)

with U(y) = sum_t u_t (logp_t - ref_logp_t) and D(y) = sum_t d_t KL_t over response tokens, and
per-token weights (u_t, d_t) that say which method it is:

| method   | u_t (reward weight)       | d_t (KL weight)                      | extra                     |
|----------|---------------------------|--------------------------------------|---------------------------|
| dpo      | 1                         | 0                                    | label smoothing           |
| tdpo1    | 1                         | 1                                    |                           |
| tdpo2    | 1                         | 0 on chosen, alpha on rejected       | + alpha * sg[KL(y_w)]     |
| sparsepo | reward mask m^u (or 1)    | KL mask m^d (or 1)                   | + L1 on the masks         |
| mapo     | fixed activation mask m   | m                                    |                           |

(TDPO2: z = S_w - S_l - alpha (KL_l - sg[KL_w]); the rejected row's KL carries the gradient.)
Data-supplied ``token_weights`` multiply u and d as a further fixed mask (cDPO-style weighting).

Rows: 2B sequences, the B chosen rows first, then the B rejected rows in the same pair order.
Per-token math in fp32 (float64 for float64 inputs); sums over tokens formed in float64, mean over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .ops import Reference, TokenStats, chunked_token_stats

LOSS_TYPES = ("dpo", "tdpo1", "tdpo2", "sparsepo", "mapo")


@dataclass
class PairStats:
    """Per-sequence quantities of one batch of 2B rows (chosen first). All [2B].

    ``total`` = U(y) + D(y), differentiable (w.r.t. the policy and the masks); the others are
    detached, for metrics: ``reward`` = U(y) (masked log-ratio sum), ``masked_kl`` = D(y),
    ``logps`` = sum logp, ``kl`` = unmasked sum of the per-token KL (None without a reference
    distribution). ``tokens``: the op's per-token result (logp, ref_logp, kl; [N], detached).
    """

    total: torch.Tensor
    reward: torch.Tensor
    masked_kl: torch.Tensor
    logps: torch.Tensor
    kl: Optional[torch.Tensor]
    tokens: Optional[TokenStats] = None


def token_weights_for(
    loss_type: str,
    num_pairs: int,
    seq_ids: torch.Tensor,
    *,
    alpha: float = 0.5,
    reward_mask: Optional[torch.Tensor] = None,
    kl_mask: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
    dtype=torch.float32,
):
    """Per-token (u, d) weights [N] of ``loss_type`` for tokens of sequences ``seq_ids`` [N].

    reward_mask / kl_mask: [N] learned SparsePO masks (None: weight 1); fixed_mask: [N] MaPO mask
    or data token weights, multiplied into both.
    """
    n = seq_ids.shape[0]
    ones = torch.ones(n, dtype=dtype, device=seq_ids.device)
    rejected = seq_ids >= num_pairs
    if loss_type == "dpo":
        u, d = ones, None
    elif loss_type in ("tdpo1", "mapo"):
        u, d = ones, ones
    elif loss_type == "tdpo2":
        u, d = ones, rejected.to(dtype) * alpha
    elif loss_type == "sparsepo":
        u = ones if reward_mask is None else reward_mask.to(dtype)
        d = ones if kl_mask is None else kl_mask.to(dtype)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if fixed_mask is not None:
        fixed_mask = fixed_mask.detach().to(dtype)
        u = u * fixed_mask
        d = None if d is None else d * fixed_mask
    return u, d


def pair_stats(hidden, weight, labels, seq_ids, num_pairs, ref: Reference, u, d, chunk_size=None) -> PairStats:
    """Run the chunked op and form the per-sequence sums of :class:`PairStats`.

    hidden [N, H] policy states at response positions, weight [V, H] frozen head, labels [N],
    seq_ids [N] in [0, 2B), u/d [N] token weights (d None: no KL term). The sums are in the op's
    float dtype, formed in float64.
    """
    stats = chunked_token_stats(
        hidden,
        weight,
        labels,
        seq_ids,
        2 * num_pairs,
        logp_weight=u.detach(),
        kl_weight=None if d is None else d.detach(),
        ref=ref,
        chunk_size=chunk_size,
    )
    acc = stats.seq_sums.dtype

    def sums(x):
        return torch.zeros(2 * num_pairs, dtype=torch.float64, device=hidden.device).index_add(
            0, seq_ids, x.to(torch.float64)
        )

    # U + D is small (a log-ratio), but the op's seq_sums is a float32 sum of log-probs of a few
    # units each: subtracting the reference's sum from it would cancel away ~1e-2 of U at 2k
    # tokens. So the value is summed here per token, in float64, from the op's per-token results;
    # seq_sums - seq_sums.detach() (zero) carries the gradient to the hidden states, and the masks
    # get theirs (logp - ref_logp for u, KL for d) from this sum, the op having detached weights.
    per_token = u.to(torch.float64) * (stats.logp.to(torch.float64) - stats.ref_logp.to(torch.float64))
    masked_kl = None
    if d is not None:
        per_token = per_token + d.to(torch.float64) * stats.kl.to(torch.float64)
        masked_kl = sums(d.detach() * stats.kl).to(acc)
    total = (sums(per_token) + (stats.seq_sums - stats.seq_sums.detach())).to(acc)
    if masked_kl is None:
        masked_kl = torch.zeros_like(total).detach()
    return PairStats(
        total=total,
        reward=total.detach() - masked_kl,
        masked_kl=masked_kl,
        logps=sums(stats.logp).to(acc),
        kl=None if stats.kl is None else sums(stats.kl).to(acc),
        tokens=stats,
    )


def preference_loss(
    ps: PairStats, loss_type: str, beta: float, *, alpha: float = 0.5, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-pair loss [B] from :class:`PairStats` (rows: B chosen, then B rejected)."""
    b = ps.total.shape[0] // 2
    z = ps.total[:b] - ps.total[b:]
    if loss_type == "tdpo2":
        z = z + alpha * ps.kl[:b]  # + alpha sg[KL_w]; the chosen rows carry d = 0
    logits = beta * z
    if label_smoothing:
        return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return -F.logsigmoid(logits)
