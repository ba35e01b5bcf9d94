"""What data-parallel training needs beyond what the Trainer does: averaging gradients that DDP's
hooks never see (``compute_loss`` runs the unwrapped model, and the mask nets live outside it)."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

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
