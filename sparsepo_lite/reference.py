"""The reference forward: one no-grad pass of the reference over a batch, gathered at response
positions. The loss runs it online; ``refcache.writer`` runs it once and stores what it returns.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .masks import MAPO_HOOK_TYPES, mapo_masks, record_activation_means
from .models import backbone, lm_head, reference_model, unwrap


def position_kwargs(position_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The backbone's ``position_ids`` argument where there are any: a model whose forward has none
    still runs right-padded batches."""
    return {} if position_ids is None else {"position_ids": position_ids}


class ReferencePass(NamedTuple):
    """What the loss needs from the reference, at the N response positions (row-major order).

    hidden [N, H] final hidden states; weight [V, H] its head; layer_states: L tensors [N, H]
    (SparsePO's mask input) or None; mapo_mask [N] fp32 MaPO token weights or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    layer_states: Optional[List[torch.Tensor]]
    mapo_mask: Optional[torch.Tensor]


def reference_pass(
    model: nn.Module,
    ids: torch.Tensor,
    att: torch.Tensor,
    response: torch.Tensor,
    seq_ids: torch.Tensor,
    pos: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    ref_model: Optional[nn.Module] = None,
    need_layers: bool = False,
    mapo_mapping: Optional[str] = None,
    mapo_hooks: Sequence[str] = MAPO_HOOK_TYPES,
) -> ReferencePass:
    """One no-grad forward of the reference (``ref_model``, or ``model`` with its adapter disabled).

    ids, att [2B, T] int; response [2B, T] bool (the response tokens); seq_ids, pos [N] int: the row
    and position of each response token. ``position_ids`` [2B, T]: where the model's default
    positions are wrong (a left-padded batch; :func:`~sparsepo_lite.objective.check_batch`).
    ``need_layers``: also return every layer's states (the SparsePO mask input). ``mapo_mapping``: also return MaPO's token weights with that mapping
    (``"uniform"`` gives ones without hooks); None: no MaPO weights.
    """
    lm = unwrap(model)
    use_hooks = mapo_mapping is not None and mapo_mapping != "uniform"
    with torch.no_grad(), reference_model(model, ref_model) as ref:
        ref_lm = unwrap(ref)
        ref_weight = lm_head(lm) if ref_lm is lm else lm_head(ref_lm)
        hooks = record_activation_means(ref, mapo_hooks) if use_hooks else contextlib.nullcontext({})
        with hooks as store:
            ref_out = backbone(ref_lm)(
                input_ids=ids,
                attention_mask=att,
                output_hidden_states=need_layers,
                use_cache=False,
                **position_kwargs(position_ids),
            )
        ref_last = ref_out.last_hidden_state
        layer_states = [h[seq_ids, pos] for h in ref_out.hidden_states[1:]] if need_layers else None
        mapo = None
        if mapo_mapping is not None:
            logit_means = None
            if use_hooks and "logits" in mapo_hooks:
                # mean_v (W h)_v = h . mean_v W_v: the logits' feature mean without [T, V]
                logit_means = ref_last.float() @ ref_weight.float().mean(0)
            mapo = mapo_masks(store, response, logit_means, mapo_mapping)[seq_ids, pos]
        return ReferencePass(ref_last[seq_ids, pos], ref_weight, layer_states, mapo)
