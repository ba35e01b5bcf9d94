"""Plain-PyTorch full-logits implementation of :func:`chunked_token_stats`: the test oracle.

It materialises [N, V] and lets autograd differentiate the textbook formulas, so it shares
no gradient code with the op. Run it in float64 (it computes in the inputs' dtype, promoted
to at least float32). Memory O(N V): tests and small problems only.
"""

from __future__ import annotations

from typing import Optional

import torch

from .token_stats import ExactReference, LabelReference, Reference, TokenStats, TopKReference


def topk_tail_kl(lq_top: torch.Tensor, lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL between coarsened distributions: the k reference ids plus one "other" bucket.

    lq_top: [N, k] reference log-probs of ``ids``; lp: [N, V] policy log-probs.
    The reference tail mass is r = max(0, 1 - sum exp(lq_top)) (0 when k = V), the policy's
    is P_o = sum of p outside the ids, and KL = sum_top q (log q - log p) + r (log r - log P_o).
    """
    vocab = lp.shape[1]
    q_top = lq_top.exp()
    lp_top = lp.gather(1, ids)
    kl_top = torch.where(q_top > 0, q_top * (lq_top - lp_top), torch.zeros_like(q_top)).sum(-1)
    if ids.shape[1] == vocab:
        return kl_top
    r = (1 - q_top.sum(-1)).clamp_min(0)
    in_top = torch.zeros_like(lp, dtype=torch.bool).scatter(1, ids, True)
    log_tail = torch.logsumexp(lp.masked_fill(in_top, float("-inf")), dim=-1)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    return kl_top + torch.where(r > 0, r * (safe_r.log() - log_tail), torch.zeros_like(r))


def token_stats_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    logp_weight: Optional[torch.Tensor] = None,
    kl_weight: Optional[torch.Tensor] = None,
    ref: Optional[Reference] = None,
) -> TokenStats:
    """Same contract as :func:`sparsepo_lite.chunked_token_stats`, computed from full logits.

    Unlike the op, ``logp``, ``ref_logp`` and ``kl`` keep their autograd graph (useful to
    check per-token gradients); ``seq_sums`` is differentiable as in the op.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    n = hidden.shape[0]
    labels = labels.long()
    lp = torch.log_softmax((hidden.to(dtype) @ weight.to(dtype).T), dim=-1)
    logp = lp.gather(1, labels[:, None]).squeeze(1)
    ref_logp = kl = None
    if isinstance(ref, ExactReference):
        lq = torch.log_softmax(ref.hidden.to(dtype) @ ref.weight.to(dtype).T, dim=-1)
        ref_logp = lq.gather(1, labels[:, None]).squeeze(1)
        kl = (lq.exp() * (lq - lp)).sum(-1)
    elif isinstance(ref, TopKReference):
        ref_logp = ref.label_logp.to(dtype)
        kl = topk_tail_kl(ref.logprobs.to(dtype), lp, ref.ids.long())
    elif isinstance(ref, LabelReference):
        ref_logp = ref.label_logp.to(dtype)
    a = torch.ones(n, dtype=dtype, device=hidden.device) if logp_weight is None else logp_weight.to(dtype)
    contrib = a * logp
    if kl is not None and kl_weight is not None:
        contrib = contrib + kl_weight.to(dtype) * kl
    seq_sums = torch.zeros(num_seqs, dtype=dtype, device=hidden.device).index_add(0, seq_ids.long(), contrib)
    return TokenStats(seq_sums, logp, ref_logp, kl)
