"""sparsepo-lite: token-level preference optimisation (SparsePO, TDPO, DPO, MaPO) on one GPU.

Layers, top-down: ``ops/`` (the token_stats op), ``losses`` (pair formulas), ``masks``, ``models``
(loading and model access), ``reference`` (the reference forward), ``objective`` (``compute_loss``),
``refcache/`` (the offline reference), ``training/``, ``eval/``, ``cli/``; docs/layout.md.
"""

import os

# OpenMP threads that wait at a barrier spin by default (libgomp, used by torch, bitsandbytes and this
# package's CPU kernels). When other processes share the cores, a spinning thread burns the time slice
# its sibling needs to reach the barrier: 6 CPU training steps took 337 s beside two busy 2-thread
# processes with libgomp's default and 85 s with passive waiting (3.1x the time alone, the fair share
# of 2 cores among 3 processes), and 26 s vs 28 s alone (bench/results/cpu_contention.md). libgomp reads this once, when torch loads it, so it only takes effect when this package is
# imported first (as the sparsepo-lite command does); an explicit setting is kept, and
# SPARSEPO_LITE_OMP_PASSIVE=0 leaves libgomp's default alone.
if os.environ.get("SPARSEPO_LITE_OMP_PASSIVE", "1") != "0":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
