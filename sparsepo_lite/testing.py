"""Plain-PyTorch full-logits implementation of :func:`chunked_token_stats`: the test oracle.

It materialises [N, V] and lets autograd differentiate the textbook formulas, so it shares
no gradient code with the op. Run it in float64 (it computes in the inputs' dtype, promoted
to at least float32). Memory O(N V): tests and small problems only.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import ExactReference, LabelReference, Reference, TokenStats, TopKReference


def topk_tail_kl(
    lq_top: torch.Tensor,
    lp: torch.Tensor,
    ids: torch.Tensor,
    tail_ids: Optional[torch.Tensor] = None,
    tail_lq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KL from a top-k reference: the k ids plus one "other" bucket, plus (with tail samples) the
    bucket's unbiased correction.

    lq_top: [N, k] reference log-probs of ``ids``; lp: [N, V] policy log-probs.
    The reference tail mass is r = max(0, 1 - sum exp(lq_top)) (0 when k = V), the policy's
    is s = sum of p outside the ids, and the bucket KL is
    sum_top q (log q - log p) + r (log r - log s), a lower bound of the exact KL.
    tail_ids / tail_lq: [N, m] ids drawn from the reference's tail q(v) / r (outside the top-k) and
    their reference log-probs. The exact KL is the bucket plus r KL(q~ || p~) between the two
    normalised tails, and with rho_j = (p(v_j) / s) / (q(v_j) / r) (so E_q~[rho] = 1),
    r * mean_j [(rho_j - 1) - log rho_j] estimates that term without bias.
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
    kl = kl_top + torch.where(r > 0, r * (safe_r.log() - log_tail), torch.zeros_like(r))
    if tail_ids is None or tail_ids.shape[1] == 0:
        return kl
    log_rho = lp.gather(1, tail_ids) - log_tail[:, None] + safe_r.log()[:, None] - tail_lq
    correction = r * (log_rho.exp() - 1 - log_rho).mean(-1)
    return kl + torch.where(r > 0, correction, torch.zeros_like(r))


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
        tail_lq = None if ref.tail_logprobs is None else ref.tail_logprobs.to(dtype)
        tail_ids = None if ref.tail_ids is None else ref.tail_ids.long()
        kl = topk_tail_kl(ref.logprobs.to(dtype), lp, ref.ids.long(), tail_ids, tail_lq)
    elif isinstance(ref, LabelReference):
        ref_logp = ref.label_logp.to(dtype)
    a = torch.ones(n, dtype=dtype, device=hidden.device) if logp_weight is None else logp_weight.to(dtype)
    contrib = a * logp
    if kl is not None and kl_weight is not None:
        contrib = contrib + kl_weight.to(dtype) * kl
    seq_sums = torch.zeros(num_seqs, dtype=dtype, device=hidden.device).index_add(0, seq_ids.long(), contrib)
    return TokenStats(seq_sums, logp, ref_logp, kl)
