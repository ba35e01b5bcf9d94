"""sparsepo-lite: token-level preference optimisation (SparsePO, TDPO, DPO, MaPO) on one GPU.

The core op is :func:`chunked_token_stats`; see README.md.
"""

from ._ops import EXTENSION_ERROR, EXTENSION_HAS_CUDA, HAVE_EXTENSION
from .losses import LOSS_TYPES
from .masks import SparsePOMaskNet, SparsePOMasks
from .objective import LossConfig, compute_loss
from .token_stats import (
    DEFAULT_CHUNK_BYTES,
    ExactReference,
    LabelReference,
    TokenStats,
    TopKReference,
    chunked_token_stats,
    default_chunk_size,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EXTENSION_ERROR",
    "EXTENSION_HAS_CUDA",
    "ExactReference",
    "HAVE_EXTENSION",
    "LOSS_TYPES",
    "LabelReference",
    "LossConfig",
    "SparsePOMaskNet",
    "SparsePOMasks",
    "TokenStats",
    "TopKReference",
    "chunked_token_stats",
    "compute_loss",
    "default_chunk_size",
]
