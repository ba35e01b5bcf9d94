"""Write a small preference set: helpful, polite answers (chosen) vs curt dismissals (rejected).

    python examples/data/make_polite_pairs.py    # writes polite_pairs.train.jsonl / .eval.jsonl

Deterministic (seed 0). Conversational rows (TRL format), so the chat template is exercised.
Used by examples/smollm2_cpu.yaml and the SmolLM2 training tests.
"""

import json
import os
import random

TASKS = [
    ("bake bread", "mixing flour, water, yeast and salt, then letting the dough rise for an hour"),
    ("learn to swim", "practising floating in shallow water with an instructor"),
    ("start running", "walking and jogging in short intervals three times a week"),
    ("write a cover letter", "naming the role and one achievement that fits it"),
    ("fix a flat tyre", "finding the puncture with soapy water and patching it"),
    ("grow tomatoes", "planting them in a sunny spot and watering them at the base"),
    ("save money", "writing down every expense for a month"),
    ("sleep better", "keeping the same bedtime and dimming screens an hour before"),
    ("learn a language", "practising ten minutes a day with spoken phrases"),
    ("make coffee", "using freshly ground beans and water just off the boil"),
    ("clean a laptop keyboard", "turning it off and using compressed air between the keys"),
    ("plan a trip", "choosing dates first and then booking transport"),
    ("prepare for an interview", "reading about the company and practising answers aloud"),
    ("paint a room", "taping the edges and applying a primer"),
    ("study for an exam", "spacing short review sessions over several days"),
    ("make a budget", "listing income and fixed costs before anything else"),
    ("cook rice", "rinsing it and using about one and a half cups of water per cup"),
    ("back up photos", "copying them to an external drive and a second location"),
    ("stretch after exercise", "holding each stretch gently for thirty seconds"),
    ("write a short story", "picking one character who wants something badly"),
    ("care for a houseplant", "checking the soil and watering only when it is dry"),
    ("learn to juggle", "starting with one ball and throwing it hand to hand"),
    ("reduce stress", "taking slow breaths and short walks during the day"),
    ("organise a desk", "removing everything and keeping only daily items"),
]
ASK = ["How do I {t}?", "Can you tell me how to {t}?", "What's a good way to {t}?", "Any tips to {t}?"]
GOOD = [
    "Happy to help! To {t}, start by {s}. Take it step by step and you'll get there.",
    "Great question. A good first step to {t} is {s}. Let me know if you want more detail.",
    "Sure! Try {s}. That makes it much easier to {t}, and you can build from there.",
]
BAD = ["Figure it out yourself.", "Why would I know? Look it up.", "Not my problem.", "That's a boring question."]


def main():
    rng = random.Random(0)
    rows = []
    for t, s in TASKS:
        for ask in ASK:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": ask.format(t=t)}],
                    "chosen": [{"role": "assistant", "content": rng.choice(GOOD).format(t=t, s=s)}],
                    "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
                }
            )
    rng.shuffle(rows)
    here = os.path.dirname(os.path.abspath(__file__))
    split = int(0.8 * len(rows))
    for name, part in (("train", rows[:split]), ("eval", rows[split:])):
        with open(os.path.join(here, f"polite_pairs.{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"wrote {split} train and {len(rows) - split} eval pairs")


if __name__ == "__main__":
    main()
