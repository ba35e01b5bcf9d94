"""Pure-PyTorch chunked implementation of ``sparsepo_lite::token_stats``.

Used, with one warning, when the compiled extension is not built (or lacks CUDA), and
tested against the same float64 oracle as the compiled op. Same schema, same memory
bound O(chunk x V + N x H), same GEMM count; only slower row arithmetic.
"""

from __future__ import annotations

import torch

from .kinds import LOGP_SLACK, TOPK_LOG_MASS_SLACK, RefKind


def _check_range(t: torch.Tensor, hi: int, name: str, bound: str) -> None:
    if t.numel() == 0:
        return
    lo, top = int(t.min()), int(t.max())
    if lo < 0 or top >= hi:
        raise ValueError(f"{name} must lie in [0, {bound}) with {bound} = {hi}; got values in [{lo}, {top}]")


def _first_at(bad: torch.Tensor, seq_ids: torch.Tensor) -> str:
    """Where the first flagged token sits, for an error message (as the compiled op says it): its
    row of the [N, ...] inputs, its sequence and how many are flagged. ``bad``: [N] bool, at least
    one True; ``seq_ids``: [N] int."""
    row, count = int(bad.nonzero()[0, 0]), int(bad.sum())
    return f" (first at token {row} of sequence {int(seq_ids[row])}; {count} token{'s' if count > 1 else ''} in all)"


def _check_tail(
    ids: torch.Tensor, tail_ids: torch.Tensor, tail_logp: torch.Tensor, seq_ids: torch.Tensor, vocab: int
) -> None:
    _check_range(tail_ids, vocab, "tail ids", "V")
    if tail_ids.numel() == 0:
        return
    srt = ids.long().sort(dim=1).values
    pos = torch.searchsorted(srt, tail_ids.long()).clamp_max(srt.shape[1] - 1)
    hit = (srt.gather(1, pos) == tail_ids.long()).any(dim=1)
    if bool(hit.any()):
        raise ValueError(
            "tail ids must lie outside the top-k ids of their token (they are samples of the reference's tail)"
            + _first_at(hit, seq_ids)
        )
    inf = ~torch.isfinite(tail_logp).all(dim=1)
    if bool(inf.any()):
        raise ValueError(
            "tail log-probs must be finite (a sampled token has reference probability > 0)" + _first_at(inf, seq_ids)
        )
    above = (tail_logp > LOGP_SLACK).any(dim=1)
    if bool(above.any()):
        raise ValueError(
            f"tail log-probs must be log-probabilities (<= 0); found {float(tail_logp.max()):g}"
            + _first_at(above, seq_ids)
        )


def _check_topk(ids: torch.Tensor, logp: torch.Tensor, seq_ids: torch.Tensor, vocab: int) -> None:
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
            raise ValueError("topk ids must be distinct within each token" + _first_at(dup, seq_ids))
    nan = logp.isnan().any(dim=1)
    if bool(nan.any()):
        raise ValueError("topk log-probs contain NaN" + _first_at(nan, seq_ids))
    # one mask decides and locates, as in the compiled op
    above = (logp > LOGP_SLACK).any(dim=1)
    if bool(above.any()):
        raise ValueError(
            f"topk log-probs must be log-probabilities (<= 0); found {float(logp.max()):g}" + _first_at(above, seq_ids)
        )
    # k probabilities of one distribution: their sum is at most 1 (up to 16-bit rounding)
    mass = torch.logsumexp(logp.float(), dim=1) > TOPK_LOG_MASS_SLACK
    if bool(mass.any()):
        raise ValueError("topk log-probs hold more than probability 1 for a token" + _first_at(mass, seq_ids))


def _check_label(label_logp: torch.Tensor, seq_ids: torch.Tensor) -> None:
    """The reference's log-prob of each label: finite (the reference gives a token of the data
    probability > 0) and a log-probability."""
    bad = ~torch.isfinite(label_logp) | (label_logp > LOGP_SLACK)
    if bool(bad.any()):
        raise ValueError("reference label log-probs must be finite log-probabilities (<= 0)" + _first_at(bad, seq_ids))


def token_stats_torch(
    hidden,
    weight,
    labels,
    seq_ids,
    num_seqs,
    logp_weight,
    kl_weight,
    ref_kind,
    ref_hidden,
    ref_weight,
    topk_ids,
    topk_logp,
    tail_ids,
    tail_logp,
    ref_label_logp,
    chunk_size,
    need_grad,
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
    exact, topk = ref_kind == RefKind.EXACT, ref_kind == RefKind.TOPK
    m = 0
    if topk:
        _check_topk(topk_ids, topk_logp, seq_ids, vocab)
        if tail_ids is not None:
            _check_tail(topk_ids, tail_ids, tail_logp, seq_ids, vocab)
            m = tail_ids.shape[1]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    labels = labels.long()
    a = logp_weight.to(acc)
    b = kl_weight.to(acc)
    logp = hidden.new_empty(n, dtype=acc)
    if exact:
        ref_logp = hidden.new_empty(n, dtype=acc)
    elif ref_kind == RefKind.NONE:
        ref_logp = hidden.new_empty(0, dtype=acc)
    else:
        if n:
            _check_label(ref_label_logp.reshape(n), seq_ids)
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
            # Coarsened KL over the top-k ids plus one tail bucket (see testing.topk_tail_kl).
            kl_top = torch.where(q_top > 0, q_top * (lq_top - lp_top), torch.zeros_like(q_top)).sum(-1)
            q_sum = q_top.sum(-1)
            r = (1 - q_sum).clamp_min(0) if ids.shape[1] < vocab else torch.zeros_like(q_sum)
            in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
            log_tail = torch.logsumexp(lp.masked_fill(in_top, float("-inf")), dim=-1)
            has_tail = torch.isfinite(log_tail)  # False: the policy has no mass outside the top-k
            log_tail = log_tail.clamp_min(torch.finfo(acc).min)  # empty tail: finite, r = 0 there
            log_r = r.clamp_min(torch.finfo(acc).tiny).log()
            tail_term = torch.where(r > 0, r * (log_r - log_tail), torch.zeros_like(r))
            # Sampled-tail correction r mean_j[(rho_j - 1) - log rho_j] (see testing.topk_tail_kl).
            corr_grad = torch.zeros_like(r)  # c = r/m sum_j (rho_j - 1): its gradient's tail part
            if m:
                live = (r > 0) & has_tail
                tids = tail_ids[sl].long()
                log_rho = lp.gather(1, tids) - log_tail[:, None] + log_r[:, None] - tail_logp[sl].to(acc)
                log_rho = torch.where(live[:, None], log_rho, torch.zeros_like(log_rho))
                rho = log_rho.exp()
                tail_term = tail_term + torch.where(live, r * (rho - 1 - log_rho).mean(-1), torch.zeros_like(r))
                corr_grad = torch.where(live, r * (rho - 1).mean(-1), torch.zeros_like(r))
            kl[sl] = kl_top + tail_term
            if need_grad:
                # d/dz_u for u outside the top-k: the bucket's -r p_u / s and the correction's -c p_u / s,
                # plus (r / m)(rho_j - 1) at each sampled id.
                tail_share = torch.where(
                    r[:, None] > 0, (r + corr_grad)[:, None] * (lp - log_tail[:, None]).exp(), torch.zeros_like(p)
                ).masked_fill(in_top, 0)
                dkl = (q_sum + r)[:, None] * p - tail_share
                dkl.scatter_add_(1, ids, -q_top)
                if m:
                    dkl.scatter_add_(
                        1, tids, torch.where(live[:, None], r[:, None] * (rho - 1) / m, torch.zeros_like(rho))
                    )
                g += b[sl, None] * dkl
        if need_grad:
            g.scatter_add_(1, y[:, None], a[sl, None])
            grad_factor[sl] = g.to(weight.dtype) @ weight

    contrib = a * logp
    if exact or topk:
        contrib = contrib + b * kl
    seq_sums = hidden.new_zeros(num_seqs, dtype=acc).index_add_(0, seq_ids.long(), contrib)
    return seq_sums, logp, ref_logp, kl, grad_factor
