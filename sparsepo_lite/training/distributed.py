"""What data-parallel training needs beyond what the Trainer does: averaging gradients that DDP's
hooks never see (``compute_loss`` runs the unwrapped model, and the mask nets live outside it), and
metrics that each process measured on its own shard."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import torch


def all_reduce_mean_(params: List[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` over all processes, in place, one collective per dtype.

    Every rank must take part with the same tensors in the same order, so a missing gradient
    (a parameter that got none on this rank, or a skipped non-finite micro-batch) counts as zeros.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype[p.grad.dtype].append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def gather_metric_totals(totals: Dict[str, Tuple[float, int]]) -> Dict[str, Tuple[float, int]]:
    """``{metric: (sum, count)}`` of this process's micro-batches, summed with every other process's
    (one object collective: a rank may hold a metric another has none of, after a skipped batch).
    Every rank must call it at the same point, as the Trainer calls ``log``."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, totals)
    merged: Dict[str, Tuple[float, int]] = {}
    for part in gathered:
        for k, (total, count) in part.items():
            old = merged.get(k, (0.0, 0))
            merged[k] = (old[0] + total, old[1] + count)
    return merged
