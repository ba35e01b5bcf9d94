"""Self-contained HTML pages (no network, inline CSS and JS): the sentiment evaluation report and
the token-mask viewer of ``sparsepo-lite inspect-masks``."""

from __future__ import annotations

import html
from typing import Dict, List, Sequence

import torch

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre;border-radius:3px;padding:0 1px;margin:0 0 2px 0;display:inline-block}
.pair{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.legend span{padding:0 .4em;margin-right:1em}.small{color:#666;font-size:.9em}
.lex{text-decoration:underline 2px #b03060;text-underline-offset:3px}
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
            f"<p id='status' class='small'></p><script>{script}</script></body></html>")


def sentiment_report_html(summary: Dict[str, float], samples: Sequence[Dict[str, object]], meta: Dict[str, object]) -> str:
    """The quickstart's report: the summary table, then every held-out sample side by side."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{v:.4f}</td></tr>" for k, v in summary.items())
    info = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in meta.items())
    cells = []
    for s in samples:
        cells.append(
            f"<tr><td>{html.escape(str(s['prompt']))}</td>"
            f"<td>{html.escape(str(s['reference']))}<br><span class='small'>VADER {s['reward_reference']:+.3f}</span></td>"
            f"<td>{html.escape(str(s['policy']))}<br><span class='small'>VADER {s['reward_policy']:+.3f}, "
            f"log-ratio {s['kl']:.2f}</span></td></tr>")
    body = (f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table><ul>{info}</ul>"
            "<p class='small'>reward = mean VADER compound score of sampled continuations of held-out prompts; "
            "policy and reference are sampled in pairs with common random numbers (the same noise at every step); "
            "reward_gain = mean paired difference policy - reference, with its standard error (_se); "
            "win_rate = share of pairs where the policy's reward beats the reference's (ties half); "
            "kl = mean over the policy's samples of sum_t log pi(y_t) - log pi_ref(y_t).</p>"
            f"<h2>Samples</h2><table id='samples'><tr><th>prompt</th><th>reference</th><th>policy</th></tr>"
            f"{''.join(cells)}</table>")
    script = ("document.getElementById('status').textContent='rendered '+"
              "(document.querySelectorAll('#samples tr').length-1)+' samples';")
    return _page("Sentiment control: policy vs reference", body, script)


def _colour(weight: float, top: float, rgb: str) -> str:
    a = 0.0 if top <= 0 else max(0.0, min(1.0, weight / top))
    return f"background:rgba({rgb},{a:.3f})"


def _scale(values: Sequence[float], q: float = 0.95) -> float:
    """The colour scale's top: the ``q`` quantile of the values (one extreme token would otherwise
    wash out every other colour on the page); 1 if all are 0."""
    vals = sorted(values)
    if not vals:
        return 1.0
    top = vals[min(len(vals) - 1, int(q * len(vals)))]
    return top if top > 0 else (vals[-1] or 1.0)


def mask_viewer_html(pairs: Sequence[Dict[str, object]], meta: Dict[str, object]) -> str:
    """Each pair's response tokens coloured by the reward mask (green), the KL mask (orange, only when
    it differs from the reward mask) and the per-token KL (blue), sentiment words underlined, with the
    tokens sorted by reward-mask weight below. Colours run from 0 to the page's 95th percentile.

    ``pairs``: dicts with ``prompt`` and, for ``chosen`` and ``rejected``, a list of tokens
    ``{"text", "reward_mask", "kl_mask", "kl", "sentiment"}``.
    """
    every = [t for p in pairs for side in ("chosen", "rejected") for t in p[side]]
    top_u = _scale([t["reward_mask"] for t in every])
    top_d = _scale([t["kl_mask"] for t in every])
    top_k = _scale([t["kl"] for t in every])
    show_kl_mask = any(abs(t["kl_mask"] - t["reward_mask"]) > 1e-6 for t in every)

    def line(tokens, key, top, rgb):
        return "".join(
            f"<span class='tok{' lex' if t['sentiment'] else ''}' style='{_colour(t[key], top, rgb)}' "
            f"title='reward mask {t['reward_mask']:.3f}, KL mask {t['kl_mask']:.3f}, KL {t['kl']:.4f}"
            f"{', sentiment word' if t['sentiment'] else ''}'>{html.escape(t['text'])}</span>" for t in tokens)

    blocks = []
    for i, p in enumerate(pairs):
        parts = [f"<div class='pair' data-pair='{i}'><b>Prompt</b>: {html.escape(str(p['prompt']))}"]
        for side in ("chosen", "rejected"):
            toks = p[side]
            ranked = sorted(toks, key=lambda t: -t["reward_mask"])
            ranked_cells = "".join(
                f"<tr><td><span class='tok{' lex' if t['sentiment'] else ''}' "
                f"style='{_colour(t['reward_mask'], top_u, '40,160,60')}'>{html.escape(t['text'])}</span></td>"
                f"<td class='num'>{t['reward_mask']:.3f}</td><td class='num'>{t['kl_mask']:.3f}</td>"
                f"<td class='num'>{t['kl']:.4f}</td></tr>" for t in ranked)
            kl_mask_line = (f"<div>KL mask: {line(toks, 'kl_mask', top_d, '230,140,20')}</div>" if show_kl_mask
                            else "")
            parts.append(
                f"<p><b>{side}</b></p><div>reward mask: {line(toks, 'reward_mask', top_u, '40,160,60')}</div>"
                f"{kl_mask_line}<div>per-token KL: {line(toks, 'kl', top_k, '40,90,220')}</div>"
                f"<details><summary>tokens by reward-mask weight</summary><table><tr><th>token</th>"
                f"<th>reward mask</th><th>KL mask</th><th>KL</th></tr>{ranked_cells}</table></details>")
        parts.append("</div>")
        blocks.append("".join(parts))
    info = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in meta.items())
    kl_legend = "<span style='background:rgba(230,140,20,.6)'>KL mask</span>" if show_kl_mask else ""
    body = (f"<ul>{info}</ul><p class='legend'><span style='background:rgba(40,160,60,.6)'>reward mask</span>"
            f"{kl_legend}<span style='background:rgba(40,90,220,.6)'>KL(ref || policy) per token</span>"
            "<span class='tok lex'>sentiment word</span> colour = value / the page's 95th percentile "
            f"(reward mask {top_u:.3g}, KL {top_k:.3g}); hover a token for its numbers"
            f"{'' if show_kl_mask else '; one mask serves reward and KL (common net)'}.</p>" + "".join(blocks))
    script = ("document.getElementById('status').textContent='rendered '+document.querySelectorAll('.pair').length+"
              "' pairs, '+document.querySelectorAll('.pair table .tok').length+' tokens';")
    return _page("SparsePO token masks", body, script)


def mask_pairs(model, tokenizer, masks, examples, *, beta: float = 0.1, mask_normalize: bool = False, sentiment=None,
               batch_pairs: int = 4) -> List[dict]:
    """Per-token reward/KL masks and KL of each example, from the online reference (as the paper).

    ``masks``: the run's mask nets (``mask_normalize`` as the run trained them); ``sentiment``: an
    optional :class:`~sparsepo_lite.sentiment.Sentiment` to flag sentiment words.
    """
    from .data import PreferenceCollator, pad_id
    from .objective import LossConfig, compute_loss

    pad = pad_id(tokenizer)
    collate = PreferenceCollator(pad)
    config = LossConfig(loss_type="sparsepo", beta=beta, masks=masks, mask_normalize=mask_normalize)
    out = []
    for a in range(0, len(examples), batch_pairs):
        part = examples[a:a + batch_pairs]
        batch = {k: v.to(model.device) for k, v in collate(part).items()}
        with torch.no_grad():
            _, _, det = compute_loss(model, batch, config, return_details=True)
        b = len(part)
        seq = det["seq_ids"].tolist()
        u = det["reward_mask"].float().tolist() if det["reward_mask"] is not None else [1.0] * len(seq)
        d = det["kl_mask"].float().tolist() if det["kl_mask"] is not None else [1.0] * len(seq)
        kl = det["kl"].float().tolist()
        labels = det["labels"].tolist()
        rows = [[] for _ in range(2 * b)]
        for i, s in enumerate(seq):
            text = tokenizer.decode([labels[i]])
            rows[s].append({"text": text, "reward_mask": u[i], "kl_mask": d[i], "kl": kl[i],
                            "sentiment": bool(sentiment and sentiment.is_sentiment_word(text))})
        for j, e in enumerate(part):
            out.append({"prompt": tokenizer.decode(e.prompt_ids), "chosen": rows[j], "rejected": rows[b + j]})
    return out


def mask_lift(pairs: Sequence[Dict[str, object]], *, resamples: int = 2000, seed: int = 0) -> Dict[str, object]:
    """Mean reward-mask weight on sentiment tokens over that on other tokens (the lift), overall and
    for the chosen and the rejected responses, each with a 95% bootstrap interval over pairs (the
    pairs are resampled with replacement, ``resamples`` times; percentile interval).

    ``pairs``: :func:`mask_pairs`'s output; a token is a sentiment token by
    ``Sentiment.LEXICON_RULE`` (its ``sentiment`` flag).
    """
    import random

    def sums(items, sides):
        on = off = n_on = n_off = 0.0
        for p in items:
            for side in sides:
                for t in p[side]:
                    if t["sentiment"]:
                        on, n_on = on + t["reward_mask"], n_on + 1
                    else:
                        off, n_off = off + t["reward_mask"], n_off + 1
        return on, n_on, off, n_off

    def ratio(on, n_on, off, n_off):
        if not n_on or not n_off or off <= 0:
            return float("nan")
        return (on / n_on) / (off / n_off)

    rng = random.Random(seed)
    draws = [[rng.randrange(len(pairs)) for _ in pairs] for _ in range(resamples)] if pairs else []
    out: Dict[str, object] = {}
    for name, sides in (("all", ("chosen", "rejected")), ("chosen", ("chosen",)), ("rejected", ("rejected",))):
        on, n_on, off, n_off = sums(pairs, sides)
        boot = sorted(r for r in (ratio(*sums([pairs[i] for i in d], sides)) for d in draws) if r == r)
        lo, hi = (boot[int(0.025 * len(boot))], boot[min(len(boot) - 1, int(0.975 * len(boot)))]) if boot \
            else (float("nan"), float("nan"))
        out[name] = {"lift": ratio(on, n_on, off, n_off), "ci95": [lo, hi], "sentiment_tokens": int(n_on),
                     "other_tokens": int(n_off), "mask_mean_sentiment": on / n_on if n_on else float("nan"),
                     "mask_mean_other": off / n_off if n_off else float("nan")}
    # the overall numbers at the top level, as before
    return {**out["all"], "chosen": out["chosen"], "rejected": out["rejected"], "pairs": len(pairs),
            "resamples": resamples}
