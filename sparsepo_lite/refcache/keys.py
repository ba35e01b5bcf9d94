"""The names of cached reference tensors, in a shard file and in a collated batch.

The collator (``collator.py``) writes a batch key for every tensor a shard holds and
``objective.compute_loss`` reads them back; both use these names.
"""

from typing import List

# per response token, in a shard and (with BATCH_PREFIX) in a batch
LABEL_LOGP = "label_logp"  # [N] float32 log q(y_t)
TOPK_IDS = "topk_ids"  # [N, k] int32
TOPK_LOGP = "topk_logp"  # [N, k] 16-bit
TAIL_IDS = "tail_ids"  # [N, m] int32
TAIL_LOGP = "tail_logp"  # [N, m] 16-bit
HIDDEN = "hidden"  # [N, H] model dtype
MAPO_MASK = "mapo_mask"  # [N] float32
# per example, in a shard only
ROW_INDEX = "row_index"  # [E] int64
TOKENS = "tokens"  # [E, 2] int64 response tokens of (chosen, rejected)

BATCH_PREFIX = "ref_"
#: [2B] int64: response tokens per batch row, which the loss checks against the batch's own count.
TOKENS_PER_ROW = BATCH_PREFIX + "tokens_per_row"


def batch_key(name: str) -> str:
    """The batch key of the cached tensor ``name`` (e.g. ``ref_label_logp``)."""
    return BATCH_PREFIX + name


def token_tensors(contents: dict) -> List[str]:
    """The per-token tensors a cache with these manifest ``contents`` holds, in shard order."""
    names = [LABEL_LOGP]
    if contents["top_k"]:
        names += [TOPK_IDS, TOPK_LOGP]
    if contents["tail_samples"]:
        names += [TAIL_IDS, TAIL_LOGP]
    if contents["store_hidden"]:
        names.append(HIDDEN)
    if contents["mapo_masks"]:
        names.append(MAPO_MASK)
    return names
