"""sparsepo-lite: token-level preference optimisation (SparsePO, TDPO, DPO, MaPO) on one GPU.

Layers, top-down: ``ops/`` (the token_stats op), ``losses`` (pair formulas), ``masks``, ``models``
(loading and model access), ``reference`` (the reference forward), ``objective`` (``compute_loss``),
``refcache/`` (the offline reference), ``training/``, ``eval/``, ``cli/``; docs/layout.md.
"""

from .waits import choose_wait_policy

# Before anything loads torch (and with it libgomp, which reads the policy once): see waits.py.
OMP_WAIT_DECISION = choose_wait_policy()

__version__ = "0.1.0"

from .losses import LOSS_TYPES  # noqa: E402  (after the wait policy above)
from .masks import SparsePOMaskNet, SparsePOMasks  # noqa: E402
from .objective import LossConfig, compute_loss  # noqa: E402
from .ops import (  # noqa: E402
    DEFAULT_CHUNK_BYTES,
    EXTENSION_ERROR,
    EXTENSION_HAS_CUDA,
    HAVE_EXTENSION,
    ExactReference,
    LabelReference,
    RefKind,
    TokenStats,
    TopKReference,
    chunked_token_stats,
    default_chunk_size,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EXTENSION_ERROR",
    "EXTENSION_HAS_CUDA",
    "ExactReference",
    "HAVE_EXTENSION",
    "LOSS_TYPES",
    "LabelReference",
    "LossConfig",
    "RefKind",
    "SparsePOMaskNet",
    "SparsePOMasks",
    "TokenStats",
    "TopKReference",
    "chunked_token_stats",
    "compute_loss",
    "default_chunk_size",
]
