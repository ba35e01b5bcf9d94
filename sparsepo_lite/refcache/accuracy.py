"""How close a reference cache's KL is to the live reference's, for a given policy and data.

``sparsepo-lite verify-ref DIR --against-live N --policy RUN`` and ``bench/bench_ref_cache.py`` use
:func:`cache_accuracy`: the same batches go through ``compute_loss`` twice, once with the cache and
once with the live reference (the adapter-off base), and the per-token KL, the sequence KL, the
chosen-minus-rejected KL difference and the losses are compared.
"""

from __future__ import annotations

import statistics
from typing import Dict, Optional, Sequence

import torch

from ..data import PreferenceCollator, PreferenceExample, pad_id
from ..objective import LossConfig, compute_loss
from .collator import CachedExample, CachedReferenceCollator
from .reader import RefCache


def _per_sequence(values: torch.Tensor, seq_ids: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.float64).index_add(0, seq_ids.cpu(), values.double().cpu())


@torch.no_grad()
def cache_accuracy(
    model,
    tokenizer,
    cache: RefCache,
    examples: Sequence[PreferenceExample],
    *,
    split: str = "train",
    batches: int = 4,
    batch_size: int = 4,
    losses: Optional[Dict[str, LossConfig]] = None,
) -> Dict[str, object]:
    """Errors of ``cache``'s KL against the live reference, with ``model`` (a peft policy) as the policy,
    over the first ``batches`` x ``batch_size`` pairs of ``examples`` (the cache's ``split``).

    Returns ``{"pairs", "tokens", "token_kl", "sequence_kl", "margin", "losses"}``:
    - token_kl: mean and worst |KL_cache - KL_live| per token, and the mean live KL;
    - sequence_kl: per response, |error| / KL_live averaged over responses ("mean_rel_error"),
      sum |error| / sum KL_live ("total_rel_error"), the worst relative error, the mean live KL;
    - margin: the chosen-minus-rejected sequence KL of each pair: mean |error| / mean |margin|
      ("rel_error"), the worst |error|, the mean |margin|;
    - losses: for each of ``losses`` (default TDPO2), the mean |loss_cache - loss_live| / |loss_live|.
    """
    losses = {"tdpo2": LossConfig(loss_type="tdpo2")} if losses is None else losses
    return caches_accuracy(
        model,
        tokenizer,
        {"cache": cache},
        examples,
        split=split,
        batches=batches,
        batch_size=batch_size,
        losses={"cache": losses},
    )["cache"]


@torch.no_grad()
def caches_accuracy(
    model,
    tokenizer,
    caches: Dict[str, RefCache],
    examples: Sequence[PreferenceExample],
    *,
    split: str = "train",
    batches: int = 4,
    batch_size: int = 4,
    losses: Optional[Dict[str, Dict[str, LossConfig]]] = None,
) -> Dict[str, Dict[str, object]]:
    """:func:`cache_accuracy` for several caches of the same examples at once: the live reference runs
    once per batch for all of them. ``losses`` maps a cache's name to the losses whose error it
    reports (none for a name left out). Returns one :func:`cache_accuracy` result per cache."""
    pad = pad_id(tokenizer)
    plain = PreferenceCollator(pad)
    losses = losses or {}
    probe = LossConfig(loss_type="tdpo1")  # any loss with a KL term: its details hold the per-token KL
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc = {
        name: {"tok_err": [], "seq_err": [], "margin_err": [], "loss_err": {n: [] for n in losses.get(name, {})}}
        for name in caches
    }
    tok_live, seq_live, margin_live = [], [], []
    try:
        for i in range(batches):
            part = list(examples[i * batch_size : (i + 1) * batch_size])
            if not part:
                break
            live_b = {k: v.to(device) for k, v in plain(part).items()}
            _, _, live = compute_loss(model, live_b, probe, return_details=True)
            rows, b = 2 * len(part), len(part)
            kl_live = live["kl"].double().cpu()
            s_live = _per_sequence(kl_live, live["seq_ids"], rows)
            tok_live.append(kl_live)
            seq_live.append(s_live)
            margin_live.append(s_live[:b] - s_live[b:])
            live_loss = {}
            for name, cache in caches.items():
                a = acc[name]
                cache_b = {
                    k: v.to(device)
                    for k, v in CachedReferenceCollator(pad, cache)([CachedExample(e, split) for e in part]).items()
                }
                _, _, approx = compute_loss(model, cache_b, probe, return_details=True)
                kl_cache = approx["kl"].double().cpu()
                s_cache = _per_sequence(kl_cache, approx["seq_ids"], rows)
                a["tok_err"].append((kl_cache - kl_live).abs())
                a["seq_err"].append(s_cache - s_live)
                a["margin_err"].append((s_cache[:b] - s_cache[b:]) - (s_live[:b] - s_live[b:]))
                for lname, cfg in losses.get(name, {}).items():
                    if lname not in live_loss:
                        live_loss[lname] = compute_loss(model, live_b, cfg)[0].item()
                    l_cache = compute_loss(model, cache_b, cfg)[0].item()
                    a["loss_err"][lname].append(abs(l_cache - live_loss[lname]) / max(abs(live_loss[lname]), 1e-12))
    finally:
        model.train(was_training)
    tok_live, seq_live, margin_live = torch.cat(tok_live), torch.cat(seq_live), torch.cat(margin_live)
    out = {}
    for name, a in acc.items():
        tok_err, seq_err, margin_err = torch.cat(a["tok_err"]), torch.cat(a["seq_err"]), torch.cat(a["margin_err"])
        rel = seq_err.abs() / seq_live.clamp_min(1e-12)
        out[name] = {
            "pairs": int(margin_live.numel()),
            "tokens": int(tok_live.numel()),
            "token_kl": {
                "mean_abs_error": tok_err.mean().item(),
                "worst_abs_error": tok_err.max().item(),
                "mean_kl": tok_live.mean().item(),
            },
            "sequence_kl": {
                "mean_rel_error": rel.mean().item(),
                "total_rel_error": (seq_err.abs().sum() / seq_live.sum()).item(),
                "worst_rel_error": rel.max().item(),
                "mean_signed_rel_error": (seq_err.sum() / seq_live.sum()).item(),
                "mean_kl": seq_live.mean().item(),
            },
            "margin": {
                "rel_error": (margin_err.abs().mean() / margin_live.abs().mean().clamp_min(1e-12)).item(),
                "worst_abs_error": margin_err.abs().max().item(),
                "mean_abs_margin": margin_live.abs().mean().item(),
            },
            "losses": {lname: statistics.mean(v) for lname, v in a["loss_err"].items()},
        }
    return out


def format_accuracy(acc: Dict[str, object]) -> str:
    """A few lines for the terminal."""
    t, s, m = acc["token_kl"], acc["sequence_kl"], acc["margin"]
    lines = [
        f"{acc['pairs']} pairs, {acc['tokens']} response tokens; live KL {t['mean_kl']:.4f} nats per token, "
        f"{s['mean_kl']:.3f} per sequence",
        f"per token: mean |error| {t['mean_abs_error']:.4f}, worst {t['worst_abs_error']:.4f} nats",
        f"per sequence: mean relative error {s['mean_rel_error']:.2%} (total {s['total_rel_error']:.2%}, "
        f"bias {s['mean_signed_rel_error']:+.2%}), worst {s['worst_rel_error']:.2%}",
        f"chosen - rejected KL: mean |error| / mean |difference| {m['rel_error']:.2%}, worst |error| "
        f"{m['worst_abs_error']:.4f} nats",
    ]
    lines += [f"{name} loss: mean relative error {v:.2e}" for name, v in acc["losses"].items()]
    return "\n".join(lines)
