"""Self-contained HTML pages (no network, inline CSS and JS): the sentiment evaluation report and
the token-mask viewer of ``sparsepo-lite inspect-masks``."""

from __future__ import annotations

import html
from typing import Dict, List, Optional, Sequence, Tuple

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
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f"<p id='status' class='small'></p><script>{script}</script></body></html>"
    )


#: The report's summary table: a readable name, the :meth:`SentimentEval.summary` key and its
#: standard error's key (None: none).
METRIC_ROWS = (
    ("VADER reward, reference", "reward_reference", "reward_reference_se"),
    ("VADER reward, policy", "reward_policy", "reward_policy_se"),
    ("reward gain, policy - reference (paired)", "reward_gain", "reward_gain_se"),
    ("win rate of the policy (ties count half)", "win_rate", None),
    ("KL(policy || reference), nats per continuation", "kl", "kl_se"),
)


def sentiment_verdict(summary: Dict[str, float]) -> str:
    """One sentence: is the policy's reward above the reference's (gain beyond two standard errors),
    and at what KL."""
    gain, se = summary["reward_gain"], summary["reward_gain_se"]
    if gain - 2 * se > 0:
        side = "higher than the reference's"
    elif gain + 2 * se < 0:
        side = "lower than the reference's"
    else:
        side = "not distinguishable from the reference's (within two standard errors)"
    return (
        f"The policy's VADER reward is {side}: {gain:+.3f} \u00b1 {se:.3f}, win rate {summary['win_rate']:.0%}, "
        f"at a KL of {summary['kl']:.2f} nats per continuation."
    )


def _reward_chart(summary: Dict[str, float]) -> str:
    """A small inline SVG: the mean reward of each side with a bar of +- 2 standard errors."""
    sides = [
        ("reference", summary["reward_reference"], summary.get("reward_reference_se", 0.0), "#8a8a8a"),
        ("policy", summary["reward_policy"], summary.get("reward_policy_se", 0.0), "#2a9d4a"),
    ]
    lo = min(0.0, min(v - 2 * e for _, v, e, _ in sides))
    hi = max(0.0, max(v + 2 * e for _, v, e, _ in sides))
    span = (hi - lo) or 1.0
    width, row, left, right = 420, 34, 90, 70  # the right margin holds the value labels
    x = lambda v: left + (v - lo) / span * (width - left - right)
    parts = [
        f"<svg id='reward-chart' width='{width}' height='{row * 2 + 24}' role='img' "
        "aria-label='mean VADER reward per side'>",
        f"<line x1='{x(0):.1f}' y1='4' x2='{x(0):.1f}' y2='{row * 2 + 4}' stroke='#444'/>",
    ]
    for i, (name, v, e, colour) in enumerate(sides):
        y = 8 + i * row
        x0, x1 = sorted((x(0), x(v)))
        parts += [
            f"<text x='0' y='{y + 15}' font-size='13'>{name}</text>",
            f"<rect x='{x0:.1f}' y='{y}' width='{max(x1 - x0, 1):.1f}' height='20' fill='{colour}'/>",
            f"<line x1='{x(v - 2 * e):.1f}' y1='{y + 10}' x2='{x(v + 2 * e):.1f}' y2='{y + 10}' stroke='#000'/>",
            f"<text x='{x(max(v, 0) + 2 * e) + 4:.1f}' y='{y + 15}' font-size='12'>{v:+.3f}</text>",
        ]
    parts.append(
        f"<text x='{left}' y='{row * 2 + 20}' font-size='11' fill='#666'>mean reward, bars: \u00b1 2 SE</text>"
    )
    return "".join(parts) + "</svg>"


def sentiment_report_html(
    summary: Dict[str, float], samples: Sequence[Dict[str, object]], meta: Dict[str, object]
) -> str:
    """The quickstart's report: a one-line verdict, a chart of the reward per side, the summary table
    with readable names, the run's settings, then every held-out sample side by side."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class='num'>{summary[key]:.4f}</td>"
        f"<td class='num'>{'' if summary.get(se) is None else f'{summary[se]:.4f}'}</td></tr>"
        for name, key, se in METRIC_ROWS
    )
    info = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in meta.items())
    cells = []
    for s in samples:
        cells.append(
            f"<tr><td>{html.escape(str(s['prompt']))}</td>"
            f"<td>{html.escape(str(s['reference']))}<br><span class='small'>VADER {s['reward_reference']:+.3f}</span></td>"
            f"<td>{html.escape(str(s['policy']))}<br><span class='small'>VADER {s['reward_policy']:+.3f}, "
            f"log-ratio {s['kl']:.2f}</span></td></tr>"
        )
    body = (
        f"<p id='verdict'><b>{html.escape(sentiment_verdict(summary))}</b></p>{_reward_chart(summary)}"
        f"<table><tr><th>metric</th><th>value</th><th>standard error</th></tr>{rows}</table><ul>{info}</ul>"
        "<p class='small'>reward = mean VADER compound score of sampled continuations of held-out prompts; "
        "policy and reference are sampled in pairs with common random numbers (the same noise at every step); "
        "the gain is the mean paired difference policy - reference; standard errors treat the samples of "
        "one prompt as one cluster; KL = mean over the policy's samples of "
        "sum_t log pi(y_t) - log pi_ref(y_t).</p>"
        f"<h2>Samples</h2><table id='samples'><tr><th>prompt</th><th>reference</th><th>policy</th></tr>"
        f"{''.join(cells)}</table>"
    )
    script = (
        "document.getElementById('status').textContent='rendered '+"
        "(document.querySelectorAll('#samples tr').length-1)+' samples';"
    )
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
            f"{', sentiment word' if t['sentiment'] else ''}'>{html.escape(t['text'])}</span>"
            for t in tokens
        )

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
                f"<td class='num'>{t['kl']:.4f}</td></tr>"
                for t in ranked
            )
            kl_mask_line = f"<div>KL mask: {line(toks, 'kl_mask', top_d, '230,140,20')}</div>" if show_kl_mask else ""
            parts.append(
                f"<p><b>{side}</b></p><div>reward mask: {line(toks, 'reward_mask', top_u, '40,160,60')}</div>"
                f"{kl_mask_line}<div>per-token KL: {line(toks, 'kl', top_k, '40,90,220')}</div>"
                f"<details><summary>tokens by reward-mask weight</summary><table><tr><th>token</th>"
                f"<th>reward mask</th><th>KL mask</th><th>KL</th></tr>{ranked_cells}</table></details>"
            )
        parts.append("</div>")
        blocks.append("".join(parts))
    info = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in meta.items())
    kl_legend = "<span style='background:rgba(230,140,20,.6)'>KL mask</span>" if show_kl_mask else ""
    body = (
        f"<ul>{info}</ul><p class='legend'><span style='background:rgba(40,160,60,.6)'>reward mask</span>"
        f"{kl_legend}<span style='background:rgba(40,90,220,.6)'>KL(ref || policy) per token</span>"
        "<span class='tok lex'>sentiment word</span> colour = value / the page's 95th percentile "
        f"(reward mask {top_u:.3g}, KL {top_k:.3g}); hover a token for its numbers"
        f"{'' if show_kl_mask else '; one mask serves reward and KL (common net)'}.</p>" + "".join(blocks)
    )
    script = (
        "document.getElementById('status').textContent='rendered '+document.querySelectorAll('.pair').length+"
        "' pairs, '+document.querySelectorAll('.pair table .tok').length+' tokens';"
    )
    return _page("SparsePO token masks", body, script)


def mask_pairs(
    model,
    tokenizer,
    masks,
    examples,
    *,
    beta: float = 0.1,
    mask_normalize: bool = False,
    mask_on_reward: bool = True,
    mask_on_kl: bool = True,
    sentiment=None,
    batch_pairs: int = 4,
) -> List[dict]:
    """Per-token reward/KL masks and KL of each example, from the online reference (as the paper).

    ``masks``: the run's mask nets (``mask_normalize``, ``mask_on_reward`` and ``mask_on_kl`` as the
    run trained them: a mask the loss did not use is 1 on every token, as in the loss); ``sentiment``:
    an optional :class:`~sparsepo_lite.sentiment.Sentiment` to flag sentiment words.
    """
    from ..data import PreferenceCollator, pad_id
    from ..objective import LossConfig, compute_loss

    pad = pad_id(tokenizer)
    collate = PreferenceCollator(pad)
    config = LossConfig(
        loss_type="sparsepo",
        beta=beta,
        masks=masks,
        mask_normalize=mask_normalize,
        mask_on_reward=mask_on_reward,
        mask_on_kl=mask_on_kl,
    )
    out = []
    for a in range(0, len(examples), batch_pairs):
        part = examples[a : a + batch_pairs]
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
            rows[s].append(
                {
                    "text": text,
                    "reward_mask": u[i],
                    "kl_mask": d[i],
                    "kl": kl[i],
                    "sentiment": bool(sentiment and sentiment.is_sentiment_word(text)),
                }
            )
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
        lo, hi = (
            (boot[int(0.025 * len(boot))], boot[min(len(boot) - 1, int(0.975 * len(boot)))])
            if boot
            else (float("nan"), float("nan"))
        )
        out[name] = {
            "lift": ratio(on, n_on, off, n_off),
            "ci95": [lo, hi],
            "sentiment_tokens": int(n_on),
            "other_tokens": int(n_off),
            "mask_mean_sentiment": on / n_on if n_on else float("nan"),
            "mask_mean_other": off / n_off if n_off else float("nan"),
        }
    # the overall numbers at the top level, as before
    return {
        **out["all"],
        "chosen": out["chosen"],
        "rejected": out["rejected"],
        "pairs": len(pairs),
        "resamples": resamples,
    }


def lift_path(page: str) -> str:
    """Where :func:`write_mask_viewer` writes the lift of the page ``page``: ``mask_lift.json`` beside
    a run's own ``masks.html``, ``PAGE_lift.json`` beside any other page (so that pages sharing a
    folder keep their own)."""
    import os

    if os.path.basename(page) == "masks.html":
        return os.path.join(os.path.dirname(page), "mask_lift.json")
    return os.path.splitext(page)[0] + "_lift.json"


def write_mask_viewer(run_dir: str, data: str, *, pairs: int = 20, out: Optional[str] = None) -> Tuple[str, dict, int]:
    """Write the mask viewer of a SparsePO run over the first ``pairs`` rows of ``data`` (default file:
    ``RUN/masks.html``; ``out`` must name an .html file) and, when VADER is installed, the lift beside it
    (:func:`lift_path`): the reward mask on sentiment words against other tokens (:func:`mask_lift`).
    Returns (page path, lift or {}, pairs shown).
    """
    import json
    import os

    from ..data import tokenize_dataset
    from ..validation import check_number
    from .runs import load_run
    from .sentiment import Sentiment

    check_number("pairs", pairs, low=1, integer=True)
    if out is not None and os.path.splitext(out)[1].lower() not in (".html", ".htm"):
        # it is overwritten: a typo must not turn the data file, or any other, into a page
        raise ValueError(f"--out {out}: must name an .html file (the page is written over it)")
    model, tok, masks, cfg = load_run(run_dir)
    if masks is None:
        raise ValueError(f"{run_dir}: no mask network (mask_net.safetensors); inspect-masks needs a SparsePO run")
    examples, _ = tokenize_dataset(
        data, tok, max_length=int(cfg.get("max_length", 512)), max_prompt_length=int(cfg.get("max_prompt_length", 256))
    )
    try:
        sentiment = Sentiment()
    except ImportError:
        sentiment = None
    reward_mask = bool(cfg.get("mask_on_reward", True))
    items = mask_pairs(
        model,
        tok,
        masks,
        examples[:pairs],
        beta=float(cfg.get("beta", 0.1)),
        mask_normalize=bool(cfg.get("mask_normalize", False)),
        mask_on_reward=reward_mask,
        mask_on_kl=bool(cfg.get("mask_on_kl", True)),
        sentiment=sentiment,
    )
    # without a reward mask (the run turned it off) there is nothing to lift: it is 1 everywhere
    lift = mask_lift(items) if sentiment and reward_mask else {}
    meta = {"run": run_dir, "data": data, "pairs": len(items)}
    if lift:
        meta.update(
            {
                f"lift ({side})": f"{v['lift']:.3f}x, 95% CI [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                for side, v in (("all", lift), ("chosen", lift["chosen"]), ("rejected", lift["rejected"]))
            }
        )
        meta["sentiment words"] = Sentiment.LEXICON_RULE
    out = out or os.path.join(run_dir, "masks.html")
    with open(out, "w") as f:
        f.write(mask_viewer_html(items, meta))
    lift_file = lift_path(out)
    if lift:
        with open(lift_file, "w") as f:
            json.dump(lift, f, indent=1)
    elif os.path.isfile(lift_file):  # an earlier page's lift must not pass for this page's
        os.remove(lift_file)
    return out, lift, len(items)
