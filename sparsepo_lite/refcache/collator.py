"""Feeding the loss from a cache: the collator that adds the cached reference tensors to a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch

from ..data import PreferenceCollator, PreferenceExample
from .keys import BATCH_PREFIX, TOKENS, TOKENS_PER_ROW, batch_key
from .reader import RefCache


@dataclass(frozen=True)
class CachedExample:
    """A :class:`PreferenceExample` tagged with the cache split that holds its reference."""

    example: PreferenceExample
    split: str


class CachedReferenceCollator:
    """:class:`PreferenceCollator` plus the cached reference tensors ``compute_loss`` reads.

    Token order matches ``compute_loss``: rows are the B chosen then the B rejected sequences,
    tokens row by row in position order.
    """

    def __init__(self, pad_token_id: int, cache: RefCache):
        self.base = PreferenceCollator(pad_token_id)
        self.cache = cache

    def __call__(self, items: Sequence[CachedExample]) -> Dict[str, torch.Tensor]:
        if not all(isinstance(it, CachedExample) for it in items):
            raise TypeError("CachedReferenceCollator takes CachedExample items (example + cache split)")
        batch = self.base([it.example for it in items])
        entries = [self.cache.split(it.split).lookup(it.example.index) for it in items]
        chosen_parts, rejected_parts = [], []
        counts_c, counts_r = [], []
        for e in entries:
            nc, nr = (int(x) for x in e[TOKENS])
            counts_c.append(nc)
            counts_r.append(nr)
            chosen_parts.append({k: v[:nc] for k, v in e.items() if k != TOKENS})
            rejected_parts.append({k: v[nc : nc + nr] for k, v in e.items() if k != TOKENS})
        parts = chosen_parts + rejected_parts
        for name in parts[0]:
            batch[batch_key(name)] = torch.cat([p[name] for p in parts])
        batch[TOKENS_PER_ROW] = torch.tensor(counts_c + counts_r, dtype=torch.long)
        return batch


def select_pairs(batch: Dict[str, torch.Tensor], start: int, stop: int) -> Dict[str, torch.Tensor]:
    """Pairs ``start:stop`` of a batch from :class:`PreferenceCollator` or
    :class:`CachedReferenceCollator`, as the batch those pairs alone would give (padding aside).

    Row tensors [2B, ...] keep rows ``start:stop`` of each half (chosen, then rejected); the cached
    per-token tensors [N, ...] keep those rows' tokens, found from ``ref_tokens_per_row``.
    """
    rows = batch["input_ids"].shape[0]
    b = rows // 2
    if not 0 <= start < stop <= b:
        raise ValueError(f"pairs {start}:{stop} are not a non-empty range of the batch's {b} pairs")
    keep = torch.cat([torch.arange(start, stop), torch.arange(b + start, b + stop)])
    counts = batch.get(TOKENS_PER_ROW)
    if counts is not None:
        ends = counts.cumsum(0)
        token_keep = torch.cat([torch.arange(int(ends[r] - counts[r]), int(ends[r])) for r in keep.tolist()])
    out = {}
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
        elif name.startswith(BATCH_PREFIX) and name != TOKENS_PER_ROW:
            if counts is None:
                raise ValueError(f"batch has the cached tensor {name!r} but not {TOKENS_PER_ROW!r}")
            out[name] = value[token_keep.to(value.device)]
        elif value.dim() and value.shape[0] == rows:
            out[name] = value[keep.to(value.device)]
        else:
            raise ValueError(
                f"batch key {name!r} {list(value.shape)} has neither one entry per row nor per cached token"
            )
    return out
