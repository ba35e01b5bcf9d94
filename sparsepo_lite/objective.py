"""``compute_loss``: a training loss from a causal LM and a collated batch, usable outside a trainer.

The reference is the same model with its peft adapter disabled (or ``config.ref_model``). Both
backbones run without their lm_head; hidden states are gathered at response positions and the
head, log-softmax, KL and gradient run through :func:`chunked_token_stats`, so no
[tokens x vocab] tensor is ever built.

Batch format (2B rows, the B chosen responses first, then the B rejected ones in the same pair
order; right or left padding):
    input_ids       [2B, T] int   prompt + response (+ padding)
    attention_mask  [2B, T] int   1 on real tokens
    labels          [2B, T] int   input_ids with prompt and padding positions set to -100
    token_weights   [2B, T] float optional per-token weights aligned with ``labels`` (a fixed
                                  mask multiplying the method's weights: cDPO-style weighting)
Cached reference (optional, from ``refcache.CachedReferenceCollator``; N response tokens in
row-major order; the key names are in ``refcache/keys.py``): ``ref_label_logp`` [N] fp32,
``ref_tokens_per_row`` [2B], and ``ref_topk_ids``/``ref_topk_logp`` [N, k] (and
``ref_tail_ids``/``ref_tail_logp`` [N, m]) or ``ref_hidden`` [N, H], ``ref_mapo_mask`` [N].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .data import IGNORE_INDEX, ResponsePositions, response_positions
from .losses import LOSS_TYPES, pair_stats, preference_loss, token_weights_for
from .masks import MAPO_HOOK_TYPES, SparsePOMasks, normalize_per_sequence
from .models import backbone, embedding_rows, lm_head, unwrap
from .ops import ExactReference, LabelReference, TopKReference
from .refcache import keys
from .reference import ReferencePass, position_kwargs, reference_pass
from .validation import check_choice, check_number


@dataclass
class LossConfig:
    """What ``compute_loss`` computes. Defaults follow the official SparsePO code (see docs/losses.md)."""

    loss_type: str = "sparsepo"  # dpo | tdpo1 | tdpo2 | sparsepo | mapo
    beta: float = 0.1
    alpha: float = 0.5  # TDPO2
    label_smoothing: float = 0.0  # DPO
    # SparsePO
    masks: Optional[SparsePOMasks] = None  # required for sparsepo: SparsePOMasks.for_model(model)
    mask_on_reward: bool = True
    mask_on_kl: bool = True
    l1_reward: float = 0.0  # lambda_u
    l1_kl: float = 0.0  # lambda_d (both halved with a common net and both masks on)
    mask_normalize: bool = False  # divide each response's masks by their mean over its tokens
    # MaPO
    mapo_mapping: str = "zn_rescale"  # or "uniform" (= TDPO1)
    mapo_hooks: Tuple[str, ...] = MAPO_HOOK_TYPES
    # plumbing
    ref_model: Optional[nn.Module] = None  # None: the policy with its peft adapter disabled
    chunk_size: Optional[int] = None

    def __post_init__(self):
        check_loss_settings(self)
        if self.loss_type == "sparsepo" and self.masks is None:
            raise ValueError("loss_type='sparsepo' needs masks=SparsePOMasks.for_model(model)")


MAPO_MAPPINGS = ("zn_rescale", "uniform")


def check_loss_settings(c) -> None:
    """Raise ``ValueError`` naming the first loss setting of ``c`` (a :class:`LossConfig` or the
    trainer's config, which checks before loading a model) that is unknown, non-finite or out of range."""
    loss_type, beta, alpha, label_smoothing = c.loss_type, c.beta, c.alpha, c.label_smoothing
    l1_reward, l1_kl, mapo_mapping, chunk_size = c.l1_reward, c.l1_kl, c.mapo_mapping, c.chunk_size
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_number("beta", beta, low=0, low_open=True)
    check_number("alpha", alpha, low=0)
    check_number("label_smoothing", label_smoothing, low=0, high=0.5, high_open=True)
    check_number("l1_reward", l1_reward, low=0)
    check_number("l1_kl", l1_kl, low=0)
    check_choice("mapo_mapping", mapo_mapping, MAPO_MAPPINGS)
    check_number("chunk_size", chunk_size, low=1, integer=True, optional=True)


def check_batch(
    batch: Dict[str, torch.Tensor], vocab_size: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, ResponsePositions, Optional[torch.Tensor]]:
    """``input_ids``, ``attention_mask``, the response positions and the position ids of a batch in
    the module's format (the position ids are None for a right-padded batch, whose default positions
    are right; [2B, T] counted over the attended tokens for a left-padded one), after checking their
    shapes and dtypes, the ids against ``vocab_size`` (the model's embedding rows) where given, that
    each label is ``IGNORE_INDEX`` or the id at its position on an attended token, that every row has
    response tokens, that ``token_weights``, if any, are finite floats shaped like the labels, and
    that cached reference tensors, if any, hold as many tokens per row; a ``ValueError``, ``TypeError`` or ``KeyError`` names what is wrong."""
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r} (needs input_ids, attention_mask, labels)")
        if not isinstance(batch[key], torch.Tensor):
            raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(batch[key]).__name__}")
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.dim() != 2 or ids.shape != att.shape or ids.shape != labels.shape:
        raise ValueError(
            f"input_ids {list(ids.shape)}, attention_mask {list(att.shape)} and labels "
            f"{list(labels.shape)} must all be [2B, T]"
        )
    for key, tensor in (("input_ids", ids), ("labels", labels)):
        if tensor.dtype not in (torch.int64, torch.int32):  # what an embedding takes
            raise TypeError(f"{key} must hold token ids as int64 or int32, got {tensor.dtype}")
    if vocab_size is not None and ids.numel():
        # the embedding's own error for an id past its rows names neither the tensor nor the row
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
        if low < 0 or high >= vocab_size:
            row = int(((ids < 0) | (ids >= vocab_size)).any(dim=1).nonzero()[0])
            raise ValueError(
                f"input_ids must lie in [0, {vocab_size}) (the model's embedding rows); got values in "
                f"[{low}, {high}], first in batch row {row}"
            )
    weights = batch.get("token_weights")
    if weights is not None:
        if weights.shape != labels.shape:
            raise ValueError(f"token_weights {list(weights.shape)} must be shaped like labels {list(labels.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"token_weights must be floating point, got {weights.dtype}")
        if not bool(weights.isfinite().all()):
            row = int((~weights.isfinite()).any(dim=1).nonzero()[0])
            raise ValueError(f"token_weights hold a non-finite value (batch row {row})")
    if ids.shape[0] == 0 or ids.shape[0] % 2:
        raise ValueError(f"batch needs an even, non-zero number of rows (B chosen then B rejected), got {ids.shape[0]}")
    positions = response_positions(labels)
    # a response label is the token it follows (the loss scores it given the ids before it): a label
    # that differs, or sits on padding, is a broken collator, whose loss would be plausible and wrong
    bad = positions.response & ((labels[:, 1:] != ids[:, 1:]) | (att[:, 1:] == 0))
    have = positions.response.sum(dim=1)
    left = att[:, 0] == 0  # a row that starts with padding (one without tokens is refused below)
    broken, no_response, left_padded = torch.stack([bad.any(), (have == 0).any(), left.any()]).tolist()  # one sync
    if broken:
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"each label must be {IGNORE_INDEX} or the input id at its position, on an attended token; "
            f"batch row {row}, position {col + 1}: label {int(labels[row, col + 1])}, "
            f"input id {int(ids[row, col + 1])}, attention_mask {int(att[row, col + 1])}"
        )
    if no_response:
        empty = (have == 0).nonzero().flatten().tolist()
        raise ValueError(f"batch rows {empty} have no response tokens (labels all -100 after the shift)")
    counts = batch.get(keys.TOKENS_PER_ROW)
    if counts is None and keys.batch_key(keys.LABEL_LOGP) in batch:
        raise KeyError(f"batch has cached reference tensors but no {keys.TOKENS_PER_ROW!r}")
    if counts is not None and (not isinstance(counts, torch.Tensor) or counts.shape != have.shape):
        shape = list(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"{keys.TOKENS_PER_ROW!r} must hold one count per batch row, [{len(have)}]; got {shape}")
    if counts is not None and not torch.equal(counts.to(have.device), have):
        counts = counts.to(have.device)
        bad = (counts != have).nonzero().flatten().tolist()
        raise ValueError(
            f"reference cache does not match the batch: rows {bad} have {have[bad].tolist()} "
            f"response tokens but the cache holds {counts[bad].tolist()}"
        )
    # a model with learned positions (GPT-2, OPT) reads the default 0..T-1 as the tokens' positions:
    # after left padding, each row's first token must be at 0 (as generate counts them)
    position_ids = (att.long().cumsum(dim=1) - 1).clamp_min(0) if left_padded else None
    return ids, att, positions, position_ids


def _cached_reference(batch, config: LossConfig, weight, dtype):
    """The op's reference from a batch that carries cached reference tensors (see refcache/)."""

    def get(name):
        return batch.get(keys.batch_key(name))

    missing = keys.shortfall(config.loss_type, config.mapo_mapping, [k for k in keys.ALL if get(k) is not None])
    if missing:
        raise ValueError(missing)
    label = get(keys.LABEL_LOGP)
    fixed = None
    if config.loss_type == "mapo" and config.mapo_mapping != "uniform":
        fixed = get(keys.MAPO_MASK)
    elif config.loss_type == "mapo":
        fixed = torch.ones_like(label)
    if config.loss_type == "dpo":  # no KL term: the label log-probs are all it needs
        return LabelReference(label), fixed
    hidden = get(keys.HIDDEN)
    if hidden is not None:
        if hidden.dtype != dtype:
            raise TypeError(
                f"cached reference hidden states are {hidden.dtype} but the policy's "
                f"are {dtype}; precompute in the training dtype"
            )
        return ExactReference(hidden, weight), fixed
    return TopKReference(get(keys.TOPK_IDS), get(keys.TOPK_LOGP), label, get(keys.TAIL_IDS), get(keys.TAIL_LOGP)), fixed


def online_reference(model, batch: Dict[str, torch.Tensor], config: LossConfig, *, ref_model=None) -> ReferencePass:
    """The reference pass :func:`compute_loss` runs on a batch without cached reference tensors.

    ``ref_model``: the reference to run (default: ``config.ref_model``, else ``model`` with its
    adapter disabled). Passing ``model`` itself, already inside ``reference_model(model)``, lets
    several threads run shards of one batch through one adapter switch.
    """
    ids, att, positions, position_ids = check_batch(batch, embedding_rows(model))
    ref_model = config.ref_model if ref_model is None else ref_model
    return _reference(model, ids, att, positions, position_ids, config, ref_model)


def _reference(
    model, ids, att, positions: ResponsePositions, position_ids, config: LossConfig, ref_model
) -> ReferencePass:
    response, seq_ids, pos, _ = positions
    return reference_pass(
        model,
        ids,
        att,
        response,
        seq_ids,
        pos,
        position_ids=position_ids,
        ref_model=ref_model,
        need_layers=config.loss_type == "sparsepo",
        mapo_mapping=config.mapo_mapping if config.loss_type == "mapo" else None,
        mapo_hooks=config.mapo_hooks,
    )


def runs_in_shards(batch: Dict[str, torch.Tensor], config: LossConfig) -> bool:
    """Whether shards of this batch's pairs may run :func:`compute_loss` at once on several threads.
    Not MaPO's activation means from an online reference: they are recorded by forward hooks, which
    every thread running the model would share."""
    return not (
        config.loss_type == "mapo" and config.mapo_mapping != "uniform" and keys.batch_key(keys.LABEL_LOGP) not in batch
    )


def compute_loss(
    model,
    batch: Dict[str, torch.Tensor],
    config: LossConfig,
    *,
    reference: Optional[ReferencePass] = None,
    return_details: bool = False,
):
    """Loss of ``config.loss_type`` on one batch, and metrics (floats).

    ``reference``: this batch's :func:`online_reference`, when the caller has already run it
    (ignored for a batch with cached reference tensors). Returns ``(loss, metrics)``, or
    ``(loss, metrics, details)`` with ``return_details`` where details holds the per-token tensors
    (``seq_ids``, ``positions``, ``reward_mask``, ``kl_mask``, ``logp``...) for inspection and tests.
    """
    ids, att, positions, position_ids = check_batch(batch, embedding_rows(model))
    rows = ids.shape[0]
    num_pairs = rows // 2
    response, seq_ids, pos, y = positions

    lm = unwrap(model)
    weight = lm_head(lm)
    need_layers = config.loss_type == "sparsepo"
    cached = keys.batch_key(keys.LABEL_LOGP) in batch
    ref_pass = reference
    if not cached and ref_pass is None:
        # the reference first: its activations are freed before the policy's graph grows
        ref_pass = _reference(model, ids, att, positions, position_ids, config, config.ref_model)
    # With a cache (refcache/) there is no reference forward; the mask net then reads the
    # policy's own hidden states, detached: the reference's layers are too large to cache.
    out = backbone(lm)(
        input_ids=ids,
        attention_mask=att,
        output_hidden_states=cached and need_layers,
        use_cache=False,
        **position_kwargs(position_ids),
    )
    hidden = out.last_hidden_state[seq_ids, pos]
    if cached:
        layer_states = [h[seq_ids, pos].detach() for h in out.hidden_states[1:]] if need_layers else None
        ref, fixed = _cached_reference(batch, config, weight, hidden.dtype)
    else:
        layer_states, fixed = ref_pass.layer_states, ref_pass.mapo_mask
        if hidden.dtype != ref_pass.hidden.dtype:
            raise TypeError(
                f"policy hidden states are {hidden.dtype} but the reference's are "
                f"{ref_pass.hidden.dtype}; load both in one dtype"
            )
        ref = ExactReference(ref_pass.hidden, ref_pass.weight)
    del out

    reward_mask = kl_mask = None
    if need_layers:
        m_u, m_d = config.masks(layer_states)
        if config.mask_normalize:
            m_u, m_d = (normalize_per_sequence(m, seq_ids, rows) for m in (m_u, m_d))
        reward_mask = m_u if config.mask_on_reward else None
        kl_mask = m_d if config.mask_on_kl else None
    if "token_weights" in batch and batch["token_weights"] is not None:
        if config.loss_type == "tdpo2":
            # TDPO2's chosen KL enters as a detached per-sequence sum; weighting it per token is
            # not implemented, and weighting only the rejected side would be inconsistent.
            raise ValueError(
                "token_weights are not supported with loss_type='tdpo2' (use tdpo1, dpo, sparsepo or mapo)"
            )
        tw = batch["token_weights"][:, 1:][seq_ids, pos]
        fixed = tw if fixed is None else fixed * tw

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    u, d = token_weights_for(
        config.loss_type,
        num_pairs,
        seq_ids,
        alpha=config.alpha,
        reward_mask=reward_mask,
        kl_mask=kl_mask,
        fixed_mask=fixed,
        dtype=acc,
    )
    ps = pair_stats(hidden, weight, y, seq_ids, num_pairs, ref, u, d, chunk_size=config.chunk_size)
    losses = preference_loss(
        ps, config.loss_type, config.beta, alpha=config.alpha, label_smoothing=config.label_smoothing
    )
    l1 = _l1_penalty(config, seq_ids, rows, reward_mask, kl_mask, acc)
    if l1 is not None:
        losses = losses + l1
    loss = losses.mean()

    metrics = _metrics(ps, config, num_pairs, seq_ids, reward_mask, kl_mask, fixed)
    metrics["loss"] = float(loss.detach())
    if not return_details:
        return loss, metrics
    details = dict(
        seq_ids=seq_ids,
        positions=pos,
        labels=y,
        u=u.detach(),
        d=None if d is None else d.detach(),
        reward_mask=None if reward_mask is None else reward_mask.detach(),
        kl_mask=None if kl_mask is None else kl_mask.detach(),
        fixed_mask=fixed,
        pair_losses=losses.detach(),
        logp=ps.tokens.logp,
        ref_logp=ps.tokens.ref_logp,
        kl=ps.tokens.kl,
    )
    return loss, metrics, details


def _l1_penalty(config, seq_ids, rows, reward_mask, kl_mask, acc):
    """Per-pair L1 of the SparsePO masks over both responses (the halving rule: docs/losses.md)."""
    if config.loss_type != "sparsepo":
        return None
    common = not config.masks.independent
    half = 0.5 if (common and config.mask_on_reward and config.mask_on_kl) else 1.0
    total = None
    for mask, lam in ((reward_mask, config.l1_reward), (kl_mask, config.l1_kl)):
        if mask is None or lam == 0:
            continue
        per_seq = torch.zeros(rows, dtype=acc, device=mask.device).index_add(0, seq_ids, mask.to(acc).abs())
        term = half * lam * (per_seq[: rows // 2] + per_seq[rows // 2 :])
        total = term if total is None else total + term
    return total


def _mask_health(prefix: str, mask: torch.Tensor, seq_ids: torch.Tensor, b: int) -> Dict[str, float]:
    """A learned mask's mean, its dead share (response tokens at exactly 0) and the share of pairs
    whose mask is 0 on every token of both responses (no gradient reaches the policy from them)."""
    alive = torch.zeros(2 * b, device=mask.device).index_add(0, seq_ids, (mask != 0).float())
    pair_alive = alive[:b] + alive[b:]
    return {
        prefix + "mean": mask.float().mean().item(),
        prefix + "dead": (mask == 0).float().mean().item(),
        prefix + "dead_pairs": (pair_alive == 0).float().mean().item(),
    }


def _metrics(ps, config, b, seq_ids, reward_mask, kl_mask, fixed) -> Dict[str, float]:
    beta = config.beta
    rc, rr = beta * ps.reward[:b], beta * ps.reward[b:]
    m = {
        "rewards/chosen": rc.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (rc > rr).float().mean().item(),
        "rewards/margins": (rc - rr).mean().item(),
        "logps/chosen": ps.logps[:b].mean().item(),
        "logps/rejected": ps.logps[b:].mean().item(),
    }
    if ps.kl is not None:
        m["kl/chosen"] = ps.kl[:b].mean().item()
        m["kl/rejected"] = ps.kl[b:].mean().item()
    if config.loss_type == "sparsepo":
        for prefix, mask in (
            ("mask/", reward_mask if reward_mask is not None else kl_mask),
            ("mask/kl_", kl_mask if config.masks.independent and reward_mask is not None else None),
        ):
            if mask is not None:
                m.update(_mask_health(prefix, mask, seq_ids, b))
    elif config.loss_type == "mapo" and fixed is not None:
        m["mask/sparsity"] = (fixed == 0).float().mean().item()
        m["mask/mean"] = fixed.float().mean().item()
    return m


def metric_weight(name: str, pairs: int, tokens: int) -> int:
    """What a metric of :func:`compute_loss` averages over: the response tokens for a mask's mean,
    dead share and sparsity, the pairs for everything else (rewards, log-probs, KL, dead pairs)."""
    per_token = name.startswith("mask/") and name.endswith(("mean", "dead", "sparsity"))
    return tokens if per_token else pairs


def merge_metrics(parts: Sequence[Tuple[Dict[str, float], int, int]]) -> Dict[str, float]:
    """The metrics of one batch from those of disjoint shards of its pairs: ``parts`` holds each
    shard's metrics, pairs and response tokens; every metric is its shards' mean weighted by what
    it averages over (:func:`metric_weight`), so the result is the batch's own up to rounding."""
    out = {}
    for name in parts[0][0]:
        weights = [metric_weight(name, pairs, tokens) for _, pairs, tokens in parts]
        out[name] = sum(w * m[name] for w, (m, _, _) in zip(weights, parts)) / sum(weights)
    return out
