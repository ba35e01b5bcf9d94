"""``chunked_token_stats``: the lm_head, log-softmax, label log-prob and KL to a reference,
computed chunk by chunk over response tokens, with per-sequence weighted sums that carry
gradients (see docs/op.md).

Shapes: N response tokens, H hidden size, V vocabulary, S sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .kinds import RefKind
from .registration import token_stats_op

#: Default budget for the per-chunk [chunk, V] buffers (bytes). Larger chunks make the head GEMMs
#: more efficient (on 2 CPU cores: ~90 GFLOP/s at 256 rows, ~125 at 768); 384 MiB gives 384 rows
#: with an exact reference at V = 128k, and keeps the op's peak at T = 2048 near 0.5 GB.
DEFAULT_CHUNK_BYTES = 384 * 2**20

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INTS = (torch.int64, torch.int32)


@dataclass(frozen=True)
class ExactReference:
    """Reference distribution from reference hidden states: q = softmax(weight @ hidden_t).

    hidden: [N, H'] reference final hidden states at the same response positions.
    weight: [V, H'] reference head (often the policy's own frozen head).
    Both in the policy's dtype; neither may require grad.
    """

    hidden: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class TopKReference:
    """Cached reference: its top-k ids and log-probs per token plus its exact label log-prob, and
    optionally m tokens sampled from its tail.

    ids: [N, k] int32/int64, distinct per row.  logprobs: [N, k] float (16-bit is fine).
    label_logp: [N] float, log q(label).
    tail_ids: [N, m] int32/int64 or None: ids drawn (with replacement) from the reference restricted
        to the tokens outside ``ids``, i.e. from q(v) / r with r the tail mass 1 - sum(exp(logprobs)).
    tail_logprobs: [N, m] float: their reference log-probs on the scale of ``logprobs``:
        log(q(v) r_hat / r), r the reference's exact tail mass and r_hat = 1 - sum(exp(logprobs)) the
        one the op sees; log q(v) when ``logprobs`` are exact (precompute handles rounded ones).

    Without tail samples the KL is taken between the coarsened distributions (the k tokens plus
    one "other" bucket): a lower bound of the exact KL, equal when the top-k hold all the reference
    mass. With them, the bucket's missing part r KL(q~ || p~) between the normalised tails is added
    as the unbiased estimate r mean_j[(rho_j - 1) - log rho_j], rho_j = (p(v_j) / s) / (q(v_j) / r),
    s the policy's mass outside ``ids``: the KL value is then unbiased, and its gradient is the exact
    gradient of that estimate (docs/reference-cache.md derives both).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    label_logp: torch.Tensor
    tail_ids: Optional[torch.Tensor] = None
    tail_logprobs: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LabelReference:
    """Reference label log-probs only ([N] float): enough for DPO, no KL."""

    label_logp: torch.Tensor


Reference = Union[ExactReference, TopKReference, LabelReference]


class TokenStats(NamedTuple):
    """Result of :func:`chunked_token_stats` (float32; float64 for float64 inputs).

    seq_sums: [S] sum over each sequence's tokens of logp_weight*logp + kl_weight*kl,
        differentiable with respect to hidden, logp_weight and kl_weight.
    logp: [N] policy label log-probs, detached.
    ref_logp: [N] reference label log-probs (detached), or None without a reference.
    kl: [N] KL(reference || policy) per token (detached), or None without a distribution.
    """

    seq_sums: torch.Tensor
    logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]


def chunk_row_bytes(vocab: int, dtype: torch.dtype, exact: bool) -> int:
    """Bytes of the op's [chunk, V] buffers per chunk row (policy and, if exact, reference logits)."""
    acc_bytes = 8 if dtype == torch.float64 else 4
    per_row = vocab * acc_bytes * (2 if exact else 1)
    if dtype not in (torch.float32, torch.float64):
        per_row += vocab * torch.finfo(dtype).bits // 8  # low-precision GEMM output / g copy
    return per_row


def default_chunk_size(
    num_tokens: int, vocab: int, dtype: torch.dtype, exact: bool, budget_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Rows per chunk: the fewest chunks whose [chunk, V] buffers stay within ``budget_bytes``, made
    equal (a multiple of 16 rows where the budget allows), so that no short last chunk runs its
    head GEMMs at a poor rate: 1024 tokens at 784 rows a chunk become 2 x 512, not 784 + 240."""
    rows = max(1, budget_bytes // chunk_row_bytes(vocab, dtype, exact))
    if rows >= 16:
        rows -= rows % 16
    n = max(num_tokens, 1)
    if rows >= n:
        return int(n)
    chunks = -(-n // rows)
    even = -(-n // chunks)
    if rows >= 16:
        even = min(rows, -(-even // 16) * 16)
    return int(even)


def _need(cond: bool, exc: type, msg: str) -> None:
    if not cond:
        raise exc(msg)


def _check_1d(t, name: str, n: int, dtypes, device) -> None:
    _need(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.dtype in dtypes, TypeError, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    _need(t.dim() == 1 and t.shape[0] == n, ValueError, f"{name} must have shape [N] = [{n}], got {list(t.shape)}")
    _need(t.device == device, ValueError, f"{name} is on {t.device} but hidden is on {device}")


def _check_frozen(t: torch.Tensor, name: str) -> None:
    _need(
        not (t.requires_grad and torch.is_grad_enabled()),
        ValueError,
        f"{name} requires grad, but chunked_token_stats never computes its gradient (the head "
        f"and the reference are frozen); pass {name}.detach() or freeze it",
    )


def chunked_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    logp_weight: Optional[torch.Tensor] = None,
    kl_weight: Optional[torch.Tensor] = None,
    ref: Optional[Reference] = None,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """Per-token label log-probs and KL to a reference, and their weighted per-sequence sums.

    Never materialises [N, V]: the head GEMM, log-softmax, label gather, KL and the gradient
    factor run over chunks of ``chunk_size`` tokens (default: a 384 MiB buffer budget, DEFAULT_CHUNK_BYTES).

    Args:
        hidden: [N, H] policy final hidden states at response positions (fp32/bf16/fp16;
            float64 for tests). Gradients flow to it through ``seq_sums``.
        weight: [V, H] frozen head, same dtype and device; must not require grad.
        labels: [N] int64/int32 next-token ids in [0, V).
        seq_ids: [N] int64/int32 sequence index of each token in [0, num_seqs).
        num_seqs: S, the number of sequences (length of ``seq_sums``).
        logp_weight: [N] per-token weight a_t of logp (default 1). May require grad.
        kl_weight: [N] per-token weight b_t of the KL (default 0). May require grad.
            Needs a reference with a distribution (exact or top-k).
        ref: ``ExactReference``, ``TopKReference``, ``LabelReference`` or None.
        chunk_size: tokens per chunk.

    Returns:
        :class:`TokenStats`.
    """
    _need(
        isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor),
        TypeError,
        "hidden and weight must be torch.Tensors",
    )
    _need(
        hidden.dtype in _FLOATS, TypeError, f"hidden must be floating point (fp32/bf16/fp16/fp64), got {hidden.dtype}"
    )
    _need(hidden.dim() == 2, ValueError, f"hidden must be [N, H], got shape {list(hidden.shape)}")
    n, h = hidden.shape
    device = hidden.device
    _need(
        weight.dim() == 2 and weight.shape[1] == h,
        ValueError,
        f"weight must be [V, H] with H = {h} (hidden's last dim), got {list(weight.shape)}",
    )
    _need(
        weight.dtype == hidden.dtype, TypeError, f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}"
    )
    _need(weight.device == device, ValueError, f"weight is on {weight.device} but hidden is on {device}")
    _check_frozen(weight, "weight")
    vocab = weight.shape[0]
    _need(vocab >= 1, ValueError, f"weight must have at least one row (V >= 1), got {list(weight.shape)}")
    _check_1d(labels, "labels", n, _INTS, device)
    _check_1d(seq_ids, "seq_ids", n, _INTS, device)
    _need(isinstance(num_seqs, int) and num_seqs >= 0, ValueError, f"num_seqs must be an int >= 0, got {num_seqs!r}")

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if logp_weight is None:
        logp_weight = torch.ones(n, dtype=acc, device=device)
    else:
        _check_1d(logp_weight, "logp_weight", n, _FLOATS, device)

    ref_hidden = ref_weight = topk_ids = topk_logp = ref_label_logp = tail_ids = tail_logp = None
    if ref is None:
        kind = RefKind.NONE
    elif isinstance(ref, ExactReference):
        kind = RefKind.EXACT
        ref_hidden, ref_weight = ref.hidden, ref.weight
        for t, name in ((ref_hidden, "ExactReference.hidden"), (ref_weight, "ExactReference.weight")):
            _need(isinstance(t, torch.Tensor) and t.dim() == 2, ValueError, f"{name} must be a 2-D tensor")
            _need(
                t.dtype == hidden.dtype, TypeError, f"{name} dtype {t.dtype} differs from hidden dtype {hidden.dtype}"
            )
            _need(t.device == device, ValueError, f"{name} is on {t.device} but hidden is on {device}")
            _check_frozen(t, name)
        _need(
            ref_hidden.shape[0] == n,
            ValueError,
            f"ExactReference.hidden must have N = {n} rows, got {ref_hidden.shape[0]}",
        )
        _need(
            ref_weight.shape == (vocab, ref_hidden.shape[1]),
            ValueError,
            f"ExactReference.weight must be [V, H'] = [{vocab}, {ref_hidden.shape[1]}], got {list(ref_weight.shape)}",
        )
    elif isinstance(ref, TopKReference):
        kind = RefKind.TOPK
        topk_ids, topk_logp, ref_label_logp = ref.ids, ref.logprobs, ref.label_logp
        _need(
            isinstance(topk_ids, torch.Tensor)
            and topk_ids.dtype in _INTS
            and topk_ids.dim() == 2
            and topk_ids.shape[0] == n,
            ValueError,
            f"TopKReference.ids must be an int [N, k] tensor with N = {n}",
        )
        _need(
            1 <= topk_ids.shape[1] <= vocab,
            ValueError,
            f"TopKReference needs 1 <= k <= V = {vocab}, got k = {topk_ids.shape[1]}",
        )
        _need(
            isinstance(topk_logp, torch.Tensor) and topk_logp.dtype in _FLOATS and topk_logp.shape == topk_ids.shape,
            ValueError,
            f"TopKReference.logprobs must be a float tensor shaped like ids {list(topk_ids.shape)}",
        )
        for t, name in ((topk_ids, "TopKReference.ids"), (topk_logp, "TopKReference.logprobs")):
            _need(t.device == device, ValueError, f"{name} is on {t.device} but hidden is on {device}")
            _check_frozen(t, name)
        _check_1d(ref_label_logp, "TopKReference.label_logp", n, _FLOATS, device)
        tail_ids, tail_logp = ref.tail_ids, ref.tail_logprobs
        _need(
            (tail_ids is None) == (tail_logp is None),
            ValueError,
            "TopKReference.tail_ids and tail_logprobs come together (both or neither)",
        )
        if tail_ids is not None:
            _need(
                isinstance(tail_ids, torch.Tensor)
                and tail_ids.dtype in _INTS
                and tail_ids.dim() == 2
                and tail_ids.shape[0] == n,
                ValueError,
                f"TopKReference.tail_ids must be an int [N, m] tensor with N = {n}",
            )
            _need(
                isinstance(tail_logp, torch.Tensor)
                and tail_logp.dtype in _FLOATS
                and tail_logp.shape == tail_ids.shape,
                ValueError,
                f"TopKReference.tail_logprobs must be a float tensor shaped like tail_ids {list(tail_ids.shape)}",
            )
            _need(
                tail_ids.shape[1] == 0 or topk_ids.shape[1] < vocab,
                ValueError,
                "TopKReference with k = V has no tail to sample from (m must be 0)",
            )
            for t, name in ((tail_ids, "TopKReference.tail_ids"), (tail_logp, "TopKReference.tail_logprobs")):
                _need(t.device == device, ValueError, f"{name} is on {t.device} but hidden is on {device}")
                _check_frozen(t, name)
    elif isinstance(ref, LabelReference):
        kind = RefKind.LABEL
        ref_label_logp = ref.label_logp
        _check_1d(ref_label_logp, "LabelReference.label_logp", n, _FLOATS, device)
    else:
        raise TypeError(f"ref must be ExactReference, TopKReference, LabelReference or None, got {type(ref).__name__}")
    if ref_label_logp is not None:
        _check_frozen(ref_label_logp, "reference label_logp")

    has_kl = kind in (RefKind.TOPK, RefKind.EXACT)
    if kl_weight is None:
        kl_weight = torch.zeros(n, dtype=acc, device=device)
    else:
        _need(
            has_kl,
            ValueError,
            f"kl_weight needs a reference distribution (ExactReference or TopKReference); got ref={type(ref).__name__}",
        )
        _check_1d(kl_weight, "kl_weight", n, _FLOATS, device)

    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, hidden.dtype, kind == RefKind.EXACT)
    _need(
        isinstance(chunk_size, int) and chunk_size >= 1,
        ValueError,
        f"chunk_size must be an int >= 1, got {chunk_size!r}",
    )
    chunk_size = min(chunk_size, max(n, 1))  # no chunk is longer than the tokens (nor than an int64)

    need_grad = bool(torch.is_grad_enabled() and hidden.requires_grad)
    seq_sums, logp, ref_logp, kl, _ = token_stats_op(
        hidden,
        weight,
        labels,
        seq_ids,
        num_seqs,
        logp_weight,
        kl_weight,
        int(kind),
        ref_hidden,
        ref_weight,
        topk_ids,
        topk_logp,
        tail_ids,
        tail_logp,
        ref_label_logp,
        chunk_size,
        need_grad,
    )
    return TokenStats(
        seq_sums=seq_sums,
        logp=logp.detach(),
        ref_logp=None if kind == RefKind.NONE else ref_logp.detach(),
        kl=kl.detach() if has_kl else None,
    )
