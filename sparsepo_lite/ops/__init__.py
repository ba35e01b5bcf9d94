"""The ``sparsepo_lite::token_stats`` op: lm_head, log-softmax, label log-prob and KL to a reference,
chunk by chunk over response tokens (docs/op.md).

- :mod:`.kinds`: ``RefKind``, the op's reference kinds (mirrors ``csrc/row_pass.h``);
- :mod:`.registration`: the op's schema, its kernels (the compiled ``sparsepo_lite._C`` or the
  PyTorch fallback), fake and autograd registrations;
- :mod:`.fallback`: the pure-PyTorch kernel;
- :mod:`.token_stats`: ``chunked_token_stats``, the checked public entry point, and the reference
  types it takes.
"""

from .kinds import RefKind
from .registration import EXTENSION_ERROR, EXTENSION_HAS_CUDA, HAVE_EXTENSION, token_stats_op
from .token_stats import (
    DEFAULT_CHUNK_BYTES,
    ExactReference,
    LabelReference,
    Reference,
    TokenStats,
    TopKReference,
    chunk_row_bytes,
    chunked_token_stats,
    default_chunk_size,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EXTENSION_ERROR",
    "EXTENSION_HAS_CUDA",
    "ExactReference",
    "HAVE_EXTENSION",
    "LabelReference",
    "RefKind",
    "Reference",
    "TokenStats",
    "TopKReference",
    "chunk_row_bytes",
    "chunked_token_stats",
    "default_chunk_size",
    "token_stats_op",
]
