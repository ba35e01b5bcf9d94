"""Sentiment-control evaluation: VADER reward, sampling, and the sequence log-ratio (KL estimate)."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsepo_lite.modeling import ModelConfig, load_policy
from sparsepo_lite.sentiment import Sentiment, evaluate_sentiment, sample_continuations, sequence_logratio


def test_vader_reward_and_lexicon():
    s = Sentiment()
    assert s(" a wonderful, moving film") > 0.5 > -0.5 > s(" a dull, awful mess")
    assert s.is_sentiment_word(" Wonderful,") and not s.is_sentiment_word(" the")


@pytest.fixture(scope="module")
def policy(tiny_dir):
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    return model, tok


def test_sampling_gives_n_continuations_per_prompt(policy):
    model, tok = policy
    torch.manual_seed(0)
    out = sample_continuations(model, tok, ["The film was", "I watched it and"], num_samples=3, max_new_tokens=5)
    assert len(out) == 2 and all(len(c) == 3 and all(isinstance(t, str) for t in c) for c in out)
    assert tok.padding_side == "right"  # restored


def test_sequence_logratio_matches_full_logits(policy):
    model, tok = policy
    prompts, conts = ["The film was", "A long opening line of a review"], [" great fun.", " dull"]
    assert sequence_logratio(model, tok, prompts, conts) == pytest.approx([0.0, 0.0], abs=1e-6)  # adapter = 0
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    got = sequence_logratio(model, tok, prompts, conts)
    want = []
    for p, c in zip(prompts, conts):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + tok(c, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
            with model.disable_adapter():
                lq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        tgt = ids[0, len(p_ids):]
        rows = torch.arange(len(p_ids) - 1, ids.shape[1] - 1)
        want.append((lp[0, rows, tgt] - lq[0, rows, tgt]).sum().item())
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert any(abs(w) > 1e-2 for w in want)


def test_evaluate_reports_rewards_win_rate_and_kl(policy):
    model, tok = policy
    ev = evaluate_sentiment(model, tok, ["The film was", "Overall the acting"], samples_per_prompt=2,
                            max_new_tokens=4, batch_size=1)
    assert len(ev.samples) == 4 and 0.0 <= ev.win_rate <= 1.0
    assert ev.reward_policy == pytest.approx(sum(r["reward_policy"] for r in ev.samples) / 4)
    assert set(ev.summary()) == {"reward_policy", "reward_reference", "win_rate", "kl"}
