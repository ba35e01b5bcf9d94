"""Pure-PyTorch chunked implementation of ``sparsepo_lite::token_stats``.

Used, with one warning, when the compiled extension is not built (or lacks CUDA), and
tested against the same float64 oracle as the compiled op. Same schema, same memory
bound O(chunk x V + N x H), same GEMM count; only slower row arithmetic.
"""

from __future__ import annotations

import torch

from .row_kinds import REF_EXACT, REF_LABEL, REF_NONE, REF_TOPK


def _check_range(t: torch.Tensor, hi: int, name: str, bound: str) -> None:
    if t.numel() == 0:
        return
    lo, top = int(t.min()), int(t.max())
    if lo < 0 or top >= hi:
        raise ValueError(
            f"{name} must lie in [0, {bound}) with {bound} = {hi}; got values in [{lo}, {top}]"
        )


def _check_topk(ids: torch.Tensor, logp: torch.Tensor, vocab: int) -> None:
    _check_range(ids, vocab, "topk ids", "V")
    if ids.numel() == 0:
        return
    k = ids.shape[1]
    if k > vocab:
        raise ValueError(f"top-k reference has k = {k} ids per token but V = {vocab}")
    if k > 1:
        s = ids.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise ValueError(f"topk ids must be distinct within each token; token {row} repeats an id")
    if bool(logp.isnan().any()):
        raise ValueError("topk log-probs contain NaN")
    top = float(logp.max())
    if top > 1e-2:
        raise ValueError(f"topk log-probs must be log-probabilities (<= 0); found {top}")


def token_stats_torch(
    hidden, weight, labels, seq_ids, num_seqs, logp_weight, kl_weight, ref_kind,
    ref_hidden, ref_weight, topk_ids, topk_logp, ref_label_logp, chunk_size, need_grad,
):
    """Same arguments and results as ``torch.ops.sparsepo_lite.token_stats``.

    Returns ``(seq_sums [S], logp [N], ref_logp [N] or [0], kl [N] or [0], grad_factor [N, H]
    or [0, H])``; float outputs in float32 (float64 for float64 inputs), ``grad_factor`` in
    ``hidden.dtype``.
    """
    n, h = hidden.shape
    vocab = weight.shape[0]
    _check_range(labels, vocab, "labels", "V")
    _check_range(seq_ids, num_seqs, "seq_ids", "num_seqs")
    exact, topk = ref_kind == REF_EXACT, ref_kind == REF_TOPK
    if topk:
        _check_topk(topk_ids, topk_logp, vocab)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    labels = labels.long()
    a = logp_weight.to(acc)
    b = kl_weight.to(acc)
    logp = hidden.new_empty(n, dtype=acc)
    if exact:
        ref_logp = hidden.new_empty(n, dtype=acc)
    elif ref_kind == REF_NONE:
        ref_logp = hidden.new_empty(0, dtype=acc)
    else:
        ref_logp = ref_label_logp.to(acc, copy=True)
    kl = hidden.new_empty(n if (exact or topk) else 0, dtype=acc)
    grad_factor = hidden.new_empty((n if need_grad else 0, h))
    chunk = max(1, min(int(chunk_size), n))

    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        y = labels[sl]
        z = (hidden[sl] @ weight.T).to(acc)
        lp = torch.log_softmax(z, dim=-1)
        logp[sl] = lp.gather(1, y[:, None]).squeeze(1)
        p = lp.exp()
        g = -a[sl, None] * p if need_grad else None
        if exact:
            lq = torch.log_softmax((ref_hidden[sl] @ ref_weight.T).to(acc), dim=-1)
            q = lq.exp()
            ref_logp[sl] = lq.gather(1, y[:, None]).squeeze(1)
            kl[sl] = (q * (lq - lp)).sum(-1)
            if need_grad:
                g += b[sl, None] * (p - q)
        elif topk:
            ids = topk_ids[sl].long()
            lq_top = topk_logp[sl].to(acc)
            q_top = lq_top.exp()
            lp_top = lp.gather(1, ids)
            # Coarsened KL over the top-k ids plus one tail bucket (see reference_impl).
            kl_top = torch.where(q_top > 0, q_top * (lq_top - lp_top), torch.zeros_like(q_top)).sum(-1)
            q_sum = q_top.sum(-1)
            r = (1 - q_sum).clamp_min(0) if ids.shape[1] < vocab else torch.zeros_like(q_sum)
            in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
            log_tail = torch.logsumexp(lp.masked_fill(in_top, float("-inf")), dim=-1)
            log_tail = log_tail.clamp_min(torch.finfo(acc).min)  # empty tail: finite, r = 0 there
            tail_term = torch.where(r > 0, r * (r.clamp_min(torch.finfo(acc).tiny).log() - log_tail),
                                    torch.zeros_like(r))
            kl[sl] = kl_top + tail_term
            if need_grad:
                tail_share = torch.where(r[:, None] > 0, r[:, None] * (lp - log_tail[:, None]).exp(),
                                         torch.zeros_like(p)).masked_fill(in_top, 0)
                dkl = (q_sum + r)[:, None] * p - tail_share
                dkl.scatter_add_(1, ids, -q_top)
                g += b[sl, None] * dkl
        if need_grad:
            g.scatter_add_(1, y[:, None], a[sl, None])
            grad_factor[sl] = g.to(weight.dtype) @ weight

    contrib = a * logp
    if exact or topk:
        contrib = contrib + b * kl
    seq_sums = hidden.new_zeros(num_seqs, dtype=acc).index_add_(0, seq_ids.long(), contrib)
    return seq_sums, logp, ref_logp, kl, grad_factor
