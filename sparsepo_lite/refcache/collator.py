"""Feeding the loss from a cache: the collator that adds the cached reference tensors to a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch

from ..data import PreferenceCollator, PreferenceExample
from .keys import TOKENS, TOKENS_PER_ROW, batch_key
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
