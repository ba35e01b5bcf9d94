"""The offline reference cache: the reference run once, per response token what the loss needs, on disk.

- :mod:`.format`: the directory layout, the manifest and its checks, ``CacheError``;
- :mod:`.keys`: the names of the cached tensors, in a shard and in a collated batch;
- :mod:`.fingerprint`: what a cache depends on, compared with the run that uses it;
- :mod:`.reader`: ``RefCache`` and ``verify_cache``;
- :mod:`.collator`: ``CachedReferenceCollator``, which adds the cached tensors to a batch, and
  ``select_pairs``, which takes some of a batch's pairs;
- :mod:`.writer`: ``precompute_reference`` (``sparsepo-lite precompute-ref``);
- :mod:`.accuracy`: the cache's KL against the live reference (``verify-ref --against-live``).

The writer and the accuracy check run the model and the loss; import them from their modules.
"""

from .collator import CachedExample, CachedReferenceCollator, select_pairs
from .fingerprint import run_fingerprint
from .format import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K, CacheError, read_manifest
from .reader import RefCache, verify_cache

__all__ = [
    "DEFAULT_TAIL_SAMPLES",
    "DEFAULT_TOP_K",
    "CacheError",
    "CachedExample",
    "CachedReferenceCollator",
    "RefCache",
    "read_manifest",
    "run_fingerprint",
    "select_pairs",
    "verify_cache",
]
