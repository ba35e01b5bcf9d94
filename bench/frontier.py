"""Reward-vs-KL frontier on the sentiment pairs, as the paper's Figure (in miniature, on the CPU).

    python bench/frontier.py                       # writes bench/results/frontier.{png,md,json}
    python bench/frontier.py --betas 0.05 0.1 0.2 --steps 48 --prompts 32

For each method (DPO, TDPO1, TDPO2, SparsePO with a common and with independent masks, MaPO) and
each beta: train SmolLM2-135M-Instruct (4-bit + LoRA) with examples/sentiment_smollm2.yaml for
``--steps`` steps, then sample held-out prompts from the policy and the reference and measure the
mean VADER reward and the sequence KL(policy || reference) (``sparsepo-lite eval-sentiment``; policy
and reference are sampled with common random numbers, so every run is compared with the same
reference samples and the paired reward gain has a small standard error).
For SparsePO it also reports the lift: the mean reward-mask weight on tokens in VADER's lexicon
over that on other tokens (``sparsepo-lite inspect-masks``). Each run is its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = {
    "dpo": ["--loss_type", "dpo"],
    "tdpo1": ["--loss_type", "tdpo1"],
    "tdpo2": ["--loss_type", "tdpo2"],
    "sparsepo": ["--loss_type", "sparsepo"],
    "sparsepo_indp": ["--loss_type", "sparsepo", "--independent_masks", "true"],
    "mapo": ["--loss_type", "mapo"],
}


def cli(*args):
    subprocess.run([sys.executable, "-m", "sparsepo_lite.cli", *args], check=True, cwd=ROOT)


def _evaluated(path: str, prompts: int, samples: int) -> bool:
    """An earlier evaluation of this run with the same prompts and samples."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    meta = saved.get("meta", {})
    return meta.get("prompts") == prompts and meta.get("samples per prompt") == samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    # TRL's default beta and the paper's beta for IMDB sentiment control
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=58)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "sentiment_smollm2.yaml"))
    ap.add_argument("--data-eval", default=os.path.join(ROOT, "examples", "data", "sentiment_pairs.eval.jsonl"))
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "frontier"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "frontier"))
    a = ap.parse_args()
    sys.path.insert(0, HERE)
    from bench_token_stats import machine_info

    from sparsepo_lite.sentiment import summarize

    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    rows, reference = [], None
    for method in a.methods:
        for beta in a.betas:
            run = os.path.join(a.runs, f"{method}_beta{beta:g}")
            t0 = time.perf_counter()
            if not os.path.isfile(os.path.join(run, "adapter_model.safetensors")):
                # no eval-loss pass: the frontier's evaluation is the sampled one below
                cli("train", a.config, *METHODS[method], "--beta", str(beta), "--max_steps", str(a.steps),
                    "--output_dir", run, "--overwrite_output_dir", "--eval_strategy", "no", "--eval_file", "")
            done = os.path.join(run, "sentiment_eval.json")
            if not _evaluated(done, a.prompts, a.samples):
                cli("eval-sentiment", run, "--data", a.data_eval, "--prompts", str(a.prompts), "--samples", str(a.samples))
            with open(done) as f:  # one summary formula for every run, however old its evaluation
                s = summarize(json.load(f)["samples"], a.samples).summary()
            row = {"method": method, "beta": beta, **s, "seconds": time.perf_counter() - t0}
            if method.startswith("sparsepo"):
                lift = os.path.join(run, "mask_lift.json")
                if not (os.path.isfile(lift) and os.path.getmtime(lift) > os.path.getmtime(
                        os.path.join(run, "adapter_model.safetensors"))):
                    cli("inspect-masks", run, "--data", a.data_eval, "--pairs", "40")
                with open(lift) as f:
                    row["mask_lift"] = json.load(f)
            rows.append(row)
            reference = s["reward_reference"] if reference is None else reference
            print(json.dumps(row), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in a.methods:
        pts = sorted((r["kl"], r["reward_policy"], r["beta"], r["reward_policy_se"]) for r in rows
                     if r["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[3] for p in pts], marker="o", capsize=2,
                    label=method)
        for kl, rew, beta, _ in pts:
            ax.annotate(f"{beta:g}", (kl, rew), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(sum(r["reward_reference"] for r in rows) / len(rows), color="grey", ls="--", lw=1, label="reference")
    ax.set_xlabel("sequence KL(policy || reference), nats")
    ax.set_ylabel("mean VADER reward (held-out prompts)")
    ax.set_title(f"Sentiment control, SmolLM2-135M 4-bit, {a.steps} steps (labels: beta)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.savefig(a.out + ".png", dpi=120)
    with open(a.out + ".json", "w") as f:
        json.dump({"command": command, "machine": machine_info("cpu"), "rows": rows}, f, indent=1)
    md = ["# Reward-vs-KL frontier, sentiment control (SmolLM2-135M-Instruct, 4-bit + LoRA, CPU)", "",
          f"Command: `{command}`", "", f"{a.steps} training steps of 4 pairs per run, the other settings from "
          f"`{os.path.relpath(a.config, ROOT)}`; {a.prompts} held-out prompts x "
          f"{a.samples} samples for policy and reference. KL = mean over the policy's samples of "
          "sum_t log pi(y_t) - log pi_ref(y_t). ![frontier](frontier.png)", "",
          "Error bars and +- are one standard error; the gain is the mean paired difference policy - reference.", "",
          "| method | beta | reward (policy) | reward (reference) | gain | win rate | KL | mask lift on VADER words |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lift = r.get("mask_lift", {})
        lift_s = (f"{lift['lift']:.2f}x ({lift['mask_mean_sentiment']:.3f} vs {lift['mask_mean_other']:.3f})"
                  if lift else "-")
        md.append(f"| {r['method']} | {r['beta']:g} | {r['reward_policy']:+.3f} +- {r['reward_policy_se']:.3f} | "
                  f"{r['reward_reference']:+.3f} | {r['reward_gain']:+.3f} +- {r['reward_gain_se']:.3f} | "
                  f"{r['win_rate']:.3f} | {r['kl']:.2f} | {lift_s} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {a.out}.png, .md, .json")


if __name__ == "__main__":
    main()
