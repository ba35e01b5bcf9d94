"""sparsepo-lite: token-level preference optimisation (SparsePO, TDPO, DPO, MaPO) on one GPU.

The core op is :func:`chunked_token_stats`; see docs/op.md.
"""

import os

# OpenMP threads that wait at a barrier spin by default (libgomp, used by torch, bitsandbytes and this
# package's CPU kernels). When other processes share the cores, a spinning thread burns the time slice
# its sibling needs to reach the barrier: a CPU training step ran 9x slower beside two busy processes,
# 3x (a fair share) with passive waiting, and passive waiting costs nothing alone (bench/results/
# cpu_contention.md). libgomp reads this once, when torch loads it, so it only takes effect when this
# package is imported first (as the sparsepo-lite command does); an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
