"""``sparsepo-lite eval-sentiment RUN --data EVAL.jsonl``: sample held-out prompts from a run's policy
and its reference; VADER reward, win rate and KL, written as JSON and an HTML report in the run."""

from __future__ import annotations

import os
from typing import List

HELP = "VADER reward, win rate and KL of a run on held-out prompts"


def add_parser(sub) -> None:
    p = sub.add_parser("eval-sentiment", help=HELP, description=__doc__)
    p.add_argument("run_dir", help="a training run folder")
    p.add_argument(
        "--data",
        required=True,
        help="preference rows with text prompts, explicit or implicit (e.g. the eval split); message-list rows are skipped",
    )
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to sample (the first N rows)")
    p.add_argument("--samples", type=int, default=2, help="continuations per prompt and model")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per continuation")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (policy and reference share the noise)")


def run(args, rest: List[str]) -> dict:
    from ..eval.sentiment import REPORT_FILE, evaluate_run

    summary = evaluate_run(
        args.run_dir,
        args.data,
        prompts=args.prompts,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        progress=lambda done, total: print(f"  sampled {done}/{total} prompts", flush=True),
    )
    print(f"{'':<12}{'reference':>12}{'policy':>12}")
    print(f"{'VADER':<12}{summary['reward_reference']:>12.3f}{summary['reward_policy']:>12.3f}")
    print(f"{'(SE)':<12}{summary['reward_reference_se']:>12.3f}{summary['reward_policy_se']:>12.3f}")
    print(f"reward gain {summary['reward_gain']:+.3f} +- {summary['reward_gain_se']:.3f} (paired SE)")
    print(f"win rate {summary['win_rate']:.3f}, KL(policy || reference) {summary['kl']:.3f} nats per continuation")
    print(f"report: {os.path.join(args.run_dir, REPORT_FILE)}", flush=True)
    return summary
