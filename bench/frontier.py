"""Reward-vs-KL frontier on the sentiment pairs, as the paper's Figure (in miniature, on the CPU).

    python bench/frontier.py                       # writes bench/results/frontier.{png,md,json}
    python bench/frontier.py --betas 0.1 0.8 --seeds 0 1 2 --steps 32

For each method (DPO, TDPO1, TDPO2, SparsePO with a common and with independent masks, SparsePO with
its masks frozen at their init, MaPO), each beta and each seed: train SmolLM2-135M-Instruct (4-bit
+ LoRA) with examples/sentiment_smollm2.yaml for ``--steps`` steps, then sample held-out prompts from
the policy and the reference and measure the mean VADER reward and the sequence KL(policy ||
reference) (``sparsepo-lite eval-sentiment``; policy and reference are sampled with common random
numbers, so every run is compared with the same reference samples). The seed sets the LoRA and mask
inits and the data order; the evaluation's sampling seed is the same for every run. For SparsePO it
also reports the mask lift on sentiment words (``sparsepo-lite inspect-masks``, 40 held-out pairs).
The frozen-mask run is the control for "the masks learned something". Each run is its own process;
runs already in runs/frontier/ are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from _common import HERE, ROOT, command_line, machine_info, sentiment_run, write_markdown

METHODS = {
    "dpo": ["--loss_type", "dpo"],
    "tdpo1": ["--loss_type", "tdpo1"],
    "tdpo2": ["--loss_type", "tdpo2"],
    "sparsepo": ["--loss_type", "sparsepo"],
    "sparsepo_indp": ["--loss_type", "sparsepo", "--independent_masks", "true"],
    "sparsepo_frozen": ["--loss_type", "sparsepo", "--mask_learning_rate", "0"],
    "mapo": ["--loss_type", "mapo"],
}
KEYS = ("reward_policy", "reward_gain", "kl", "win_rate")


def spread(values):
    """(mean, sample standard deviation over seeds; 0 for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows, methods, betas):
    """One row per (method, beta): each key's mean and seed-to-seed standard deviation, and the lift's."""
    out = []
    for method in methods:
        for beta in betas:
            group = [r for r in rows if r["method"] == method and r["beta"] == beta]
            if not group:
                continue
            agg = {
                "method": method,
                "beta": beta,
                "seeds": [r["seed"] for r in group],
                "reward_reference": group[0]["reward_reference"],
            }
            for key in KEYS:
                agg[key], agg[key + "_sd"] = spread([r[key] for r in group])
            lifts = [r["mask_lift"]["lift"] for r in group if r.get("mask_lift")]
            if lifts:
                agg["lift"], agg["lift_sd"] = spread(lifts)
                agg["lift_chosen"], _ = spread([r["mask_lift"]["chosen"]["lift"] for r in group])
                agg["lift_rejected"], _ = spread([r["mask_lift"]["rejected"]["lift"] for r in group])
            drifts = [r["mask"]["drift"] for r in group if r.get("mask")]
            if drifts:
                agg["mask_drift"], _ = spread(drifts)
            out.append(agg)
    return out


def at_equal_kl(frontier, kl):
    """The reward of a method's mean frontier (its betas' mean points) at ``kl``, linear between the
    points, None outside them."""
    pts = sorted((a["kl"], a["reward_policy"]) for a in frontier)
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r0
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    # TRL's default beta and the paper's beta for IMDB sentiment control
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=58)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "frontier"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "frontier"))
    # Small models scale poorly over threads: on 2 cores two 1-thread runs side by side finish sooner
    # than one 2-thread run after another.
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, each with cores/jobs threads")
    ap.add_argument(
        "--only-existing",
        action="store_true",
        help="tabulate the runs already trained and evaluated in --runs; train none",
    )
    a = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None

    def one(method, beta, seed):
        run = os.path.join(a.runs, f"{method}_beta{beta:g}_seed{seed}")
        t0 = time.perf_counter()
        row = sentiment_run(
            run,
            METHODS[method] + ["--beta", str(beta), "--max_steps", str(a.steps), "--seed", str(seed)],
            prompts=a.prompts,
            samples=a.samples,
            lift_pairs=40 if method.startswith("sparsepo") else None,
            threads=threads,
        )
        row = {"method": method, "beta": beta, "seed": seed, **row, "seconds": time.perf_counter() - t0}
        print(json.dumps(row), flush=True)
        return row

    cells = [(m, b, s) for m in a.methods for b in a.betas for s in a.seeds]
    if a.only_existing:
        cells = [
            c
            for c in cells
            if os.path.isfile(os.path.join(a.runs, f"{c[0]}_beta{c[1]:g}_seed{c[2]}", "sentiment_eval.json"))
        ]
    with ThreadPoolExecutor(a.jobs) as pool:  # each run is its own process; threads only wait
        rows = list(pool.map(lambda c: one(*c), cells))
    agg = aggregate(rows, a.methods, a.betas)
    plot(a, rows, agg)
    with open(a.out + ".json", "w") as f:
        json.dump(
            {"command": command_line(), "machine": machine_info("cpu"), "jobs": a.jobs, "rows": rows, "aggregate": agg},
            f,
            indent=1,
        )
    write_markdown(a.out + ".md", markdown(a, rows, agg))
    print(f"wrote {a.out}.png, .md, .json")


def plot(a, rows, agg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, method in enumerate(a.methods):
        colour = f"C{i}"
        pts = sorted((g for g in agg if g["method"] == method), key=lambda g: g["kl"])
        ax.scatter(
            [r["kl"] for r in rows if r["method"] == method],
            [r["reward_policy"] for r in rows if r["method"] == method],
            s=8,
            alpha=0.35,
            color=colour,
        )
        ax.errorbar(
            [g["kl"] for g in pts],
            [g["reward_policy"] for g in pts],
            xerr=[g["kl_sd"] for g in pts],
            yerr=[g["reward_policy_sd"] for g in pts],
            marker="o",
            capsize=2,
            color=colour,
            label=method,
            ls="--" if method == "sparsepo_frozen" else "-",
        )
        for g in pts:
            ax.annotate(
                f"{g['beta']:g}", (g["kl"], g["reward_policy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.axhline(rows[0]["reward_reference"], color="grey", ls=":", lw=1, label="reference")
    ax.set_xlabel("sequence KL(policy || reference), nats")
    ax.set_ylabel("mean VADER reward (held-out prompts)")
    ax.set_title(
        f"Sentiment control, SmolLM2-135M 4-bit, {a.steps} steps, up to {len(a.seeds)} seeds per point "
        "(bars: seed sd; labels: beta)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.savefig(a.out + ".png", dpi=120)


def markdown(a, rows, agg):
    md = [
        "# Reward-vs-KL frontier, sentiment control (SmolLM2-135M-Instruct, 4-bit + LoRA, CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"{a.steps} training steps of 4 pairs per run, the other settings from examples/sentiment_smollm2.yaml; "
        f"seeds {a.seeds}; {a.prompts} held-out prompts x {a.samples} paired samples per run (the same "
        f"reference samples for every run: reference reward {rows[0]['reward_reference']:+.3f}). Each cell is "
        "the mean over seeds +- the seed-to-seed standard deviation. KL = mean over the policy's samples of "
        "sum_t log pi(y_t) - log pi_ref(y_t). Lift: mean reward mask on sentiment words / on other tokens, 40 "
        "held-out pairs (per seed in frontier.json, with 95% bootstrap intervals). ![frontier](frontier.png)",
        "",
        "| method | beta | seeds | reward | gain | KL | win rate | mask drift | lift (all / chosen / rejected) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in agg:
        lift = (
            f"{g['lift']:.2f} +- {g['lift_sd']:.2f} / {g['lift_chosen']:.2f} / {g['lift_rejected']:.2f}"
            if "lift" in g
            else "-"
        )
        drift = f"{g['mask_drift']:.3f}" if "mask_drift" in g else "-"
        md.append(
            f"| {g['method']} | {g['beta']:g} | {len(g['seeds'])} | {g['reward_policy']:+.3f} +- {g['reward_policy_sd']:.3f} | "
            f"{g['reward_gain']:+.3f} +- {g['reward_gain_sd']:.3f} | {g['kl']:.2f} +- {g['kl_sd']:.2f} | "
            f"{g['win_rate']:.2f} | {drift} | {lift} |"
        )
    tdpo1 = [g for g in agg if g["method"] == "tdpo1"]
    if tdpo1:
        md += [
            "",
            "SparsePO against TDPO1 at equal KL (TDPO1's reward read off its mean frontier, linear between its "
            "betas, at each SparsePO seed's KL; differences per seed):",
            "",
        ]
        for method in ("sparsepo", "sparsepo_indp", "sparsepo_frozen"):
            diffs = []
            for r in rows:
                if r["method"] == method:
                    base = at_equal_kl(tdpo1, r["kl"])
                    if base is not None:
                        diffs.append(r["reward_policy"] - base)
            if diffs:
                m, sd = spread(diffs)
                md.append(
                    f"- {method}: {m:+.3f} +- {sd:.3f} reward over TDPO1 at the same KL ({len(diffs)} runs "
                    "inside TDPO1's KL range)"
                )
    return md


if __name__ == "__main__":
    main()
