"""The names of cached reference tensors, in a shard file and in a collated batch.

The collator (``collator.py``) writes a batch key for every tensor a shard holds and
``objective.compute_loss`` reads them back; both use these names.
"""

from typing import List, Optional

# per response token, in a shard and (with BATCH_PREFIX) in a batch
LABEL_LOGP = "label_logp"  # [N] float32 log q(y_t)
TOPK_IDS = "topk_ids"  # [N, k] int32
TOPK_LOGP = "topk_logp"  # [N, k] 16-bit
TAIL_IDS = "tail_ids"  # [N, m] int32
TAIL_LOGP = "tail_logp"  # [N, m] 16-bit
HIDDEN = "hidden"  # [N, H] model dtype
MAPO_MASK = "mapo_mask"  # [N] float32
#: every per-token tensor, in shard order
ALL = (LABEL_LOGP, TOPK_IDS, TOPK_LOGP, TAIL_IDS, TAIL_LOGP, HIDDEN, MAPO_MASK)
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
    held = {
        LABEL_LOGP: True,
        TOPK_IDS: contents["top_k"],
        TOPK_LOGP: contents["top_k"],
        TAIL_IDS: contents["tail_samples"],
        TAIL_LOGP: contents["tail_samples"],
        HIDDEN: contents["store_hidden"],
        MAPO_MASK: contents["mapo_masks"],
    }
    return [name for name in ALL if held[name]]


def shortfall(loss_type: str, mapo_mapping: str, names) -> Optional[str]:
    """What a loss of ``loss_type`` (and ``mapo_mapping``) needs from a cache holding the tensors
    ``names`` (e.g. :func:`token_tensors`) and does not find there, as a sentence; None when nothing."""
    if loss_type == "mapo" and mapo_mapping != "uniform" and MAPO_MASK not in names:
        return (
            f"loss_type='mapo' with mapo_mapping={mapo_mapping!r} needs the cache's precomputed MaPO masks, "
            "and it has none; precompute the cache with loss_type: mapo in the config"
        )
    if loss_type != "dpo" and HIDDEN not in names and TOPK_IDS not in names:
        return (
            f"loss_type={loss_type!r} needs the reference distribution, but the cache holds "
            "label log-probs only; precompute with --top-k K or --store hidden"
        )
    return None
