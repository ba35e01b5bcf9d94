"""Registration of ``torch.ops.sparsepo_lite.token_stats``.

The compiled extension (``sparsepo_lite._C``) defines the op with ``TORCH_LIBRARY`` and
registers CPU (and, if built with CUDA, CUDA) kernels. Without it, the same schema is
defined here with the pure-PyTorch chunked kernel, which warns once when first used.
Either way this module adds the fake (meta) implementation and the autograd formula, so
the op works under ``torch.compile``.

Set ``SPARSEPO_LITE_DISABLE_EXTENSION=1`` to force the PyTorch kernel (tests use this).
"""

from __future__ import annotations

import os
import warnings

import torch

from .fallback import token_stats_torch
from .kinds import RefKind

OP_NAME = "sparsepo_lite::token_stats"
SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor labels, Tensor seq_ids, int num_seqs, "
    "Tensor logp_weight, Tensor kl_weight, int ref_kind, Tensor? ref_hidden, "
    "Tensor? ref_weight, Tensor? topk_ids, Tensor? topk_logp, Tensor? tail_ids, Tensor? tail_logp, "
    "Tensor? ref_label_logp, "
    "int chunk_size, bool need_grad) -> "
    "(Tensor seq_sums, Tensor logp, Tensor ref_logp, Tensor kl, Tensor grad_factor)"
)

_C = None
EXTENSION_ERROR: str | None = None
if os.environ.get("SPARSEPO_LITE_DISABLE_EXTENSION") == "1":
    EXTENSION_ERROR = "disabled by SPARSEPO_LITE_DISABLE_EXTENSION=1"
else:
    try:
        from .. import _C  # noqa: F811  (registers the op as a side effect)
    except ImportError as exc:
        EXTENSION_ERROR = str(exc)

HAVE_EXTENSION = _C is not None
EXTENSION_HAS_CUDA = bool(HAVE_EXTENSION and _C.with_cuda)

_warned = False


def _fallback_kernel(*args):
    global _warned
    if not _warned:
        _warned = True
        where = "built without CUDA" if HAVE_EXTENSION else f"not available ({EXTENSION_ERROR})"
        warnings.warn(
            f"sparsepo_lite._C is {where}; token_stats runs the slower pure-PyTorch kernel. "
            "Build it with: pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=2,
        )
    return token_stats_torch(*args)


if not HAVE_EXTENSION:
    torch.library.define(OP_NAME, SCHEMA)
    torch.library.impl(OP_NAME, "cpu", _fallback_kernel)
if not EXTENSION_HAS_CUDA:
    torch.library.impl(OP_NAME, "cuda", _fallback_kernel)


@torch.library.register_fake(OP_NAME)
def _token_stats_fake(
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
    n, h = hidden.shape
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (
        hidden.new_empty(num_seqs, dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(0 if ref_kind == RefKind.NONE else n, dtype=acc),
        hidden.new_empty(n if ref_kind in (RefKind.TOPK, RefKind.EXACT) else 0, dtype=acc),
        hidden.new_empty((n if need_grad else 0, h)),
    )


def _setup_context(ctx, inputs, output):
    hidden, _, _, seq_ids, _, logp_weight, kl_weight = inputs[:7]
    _, logp, _, kl, grad_factor = output
    ctx.save_for_backward(seq_ids, logp, kl, grad_factor)
    ctx.dtypes = (hidden.dtype, logp_weight.dtype, kl_weight.dtype)


def _backward(ctx, grad_sums, _grad_logp, _grad_ref_logp, _grad_kl, _grad_factor):
    # seq_sums[s] = sum_t a_t logp_t + b_t kl_t  =>  per token: d/dh_t = G_t (formed in the
    # forward), d/da_t = logp_t, d/db_t = kl_t. Backward runs no GEMM.
    seq_ids, logp, kl, grad_factor = ctx.saved_tensors
    h_dtype, a_dtype, b_dtype = ctx.dtypes
    per_token = grad_sums.index_select(0, seq_ids.long())
    grad_hidden = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        if grad_factor.shape[0] != per_token.shape[0]:
            raise RuntimeError("token_stats ran with need_grad=False; no gradient for hidden was formed")
        grad_hidden = grad_factor * per_token.to(h_dtype)[:, None]
    if ctx.needs_input_grad[5]:
        grad_a = (per_token * logp).to(a_dtype)
    if ctx.needs_input_grad[6] and kl.numel():
        grad_b = (per_token * kl).to(b_dtype)
    return (grad_hidden, None, None, None, None, grad_a, grad_b) + (None,) * 10


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)

token_stats_op = torch.ops.sparsepo_lite.token_stats
