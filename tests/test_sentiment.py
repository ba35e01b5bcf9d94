"""Sentiment-control evaluation: VADER reward, sampling, and the sequence log-ratio (KL estimate)."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsepo_lite.eval.sentiment import (
    Sentiment,
    evaluate_sentiment,
    sample_continuations,
    sequence_logratio,
    summarize,
)
from sparsepo_lite.models import ModelConfig, load_policy


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


def append_eos(tok):
    """Make ``tok`` end every text with EOS, as Llama-2's ``add_eos_token`` does."""
    from tokenizers.processors import TemplateProcessing

    eos = (tok.eos_token, tok.eos_token_id)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B:1 {eos[0]}:1", special_tokens=[eos]
    )
    assert tok("The film")["input_ids"][-1] == tok.eos_token_id
    return tok


def test_a_tokenizer_that_appends_eos_samples_and_trains_after_the_prompt_itself(policy, tiny_dir):
    from sparsepo_lite.data import tokenize_dataset
    from sparsepo_lite.models import load_tokenizer

    from conftest import review_rows

    model, tok = policy
    eos_tok = append_eos(load_tokenizer(tiny_dir))
    examples = [tokenize_dataset(review_rows(3), t, max_length=32, max_prompt_length=16)[0] for t in (tok, eos_tok)]
    assert examples[0] == examples[1]
    assert all(e.prompt_ids[-1] != tok.eos_token_id and e.chosen_ids[-1] == tok.eos_token_id for e in examples[1])
    samples = []
    for t in (tok, eos_tok):
        torch.manual_seed(0)
        samples.append(sample_continuations(model, t, ["The film was", "I watched it"], max_new_tokens=4))
    assert samples[0] == samples[1]


@pytest.fixture
def bos_policy(tiny_dir, request):
    """A fresh policy whose tokenizer adds a BOS token to every text (as Llama's do), or an EOS after
    every text (as Llama-2's with ``add_eos_token``), or neither; and the prompt ids it should give."""
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    tok.add_bos_token = request.param == "bos"
    if request.param == "eos":
        append_eos(tok)
    assert (tok("The film")["input_ids"][0] == tok.bos_token_id) == (request.param == "bos")
    bos = [tok.bos_token_id] if request.param == "bos" else []
    return model, tok, lambda text: bos + tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("bos_policy", ["no_bos", "bos", "eos"], indirect=True)
def test_sequence_logratio_matches_full_logits(bos_policy):
    """Scored in the context the continuations were sampled in: the prompt as training encodes it,
    with its BOS where the tokenizer adds one, without an EOS it appends (sample_continuations)."""
    model, tok, prompt_ids = bos_policy
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
        p_ids = prompt_ids(p)
        ids = torch.tensor([p_ids + tok(c, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
            with model.disable_adapter():
                lq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        tgt = ids[0, len(p_ids) :]
        rows = torch.arange(len(p_ids) - 1, ids.shape[1] - 1)
        want.append((lp[0, rows, tgt] - lq[0, rows, tgt]).sum().item())
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert any(abs(w) > 1e-2 for w in want)


def test_evaluate_reports_rewards_win_rate_and_kl(policy):
    model, tok = policy
    ev = evaluate_sentiment(
        model, tok, ["The film was", "Overall the acting"], samples_per_prompt=2, max_new_tokens=4, batch_size=1
    )
    assert len(ev.samples) == 4 and 0.0 <= ev.win_rate <= 1.0
    assert ev.reward_policy == pytest.approx(sum(r["reward_policy"] for r in ev.samples) / 4)
    assert set(ev.summary()) == {
        "reward_policy",
        "reward_reference",
        "win_rate",
        "kl",
        "reward_gain",
        "reward_gain_se",
        "reward_policy_se",
        "reward_reference_se",
        "kl_se",
    }
    diffs = torch.tensor([r["reward_policy"] - r["reward_reference"] for r in ev.samples], dtype=torch.float64)
    assert ev.reward_gain == pytest.approx(diffs.mean().item(), abs=1e-12)
    per_prompt = diffs.view(2, 2).mean(1)  # rows are prompt-major: the 2 samples of a prompt together
    assert [r["prompt"] for r in ev.samples] == ["The film was"] * 2 + ["Overall the acting"] * 2
    assert ev.reward_gain_se == pytest.approx((per_prompt.std() / 2**0.5).item(), abs=1e-12)
    kls = torch.tensor([r["kl"] for r in ev.samples], dtype=torch.float64)
    assert ev.kl == pytest.approx(kls.mean().item(), abs=1e-12)
    assert ev.kl_se == pytest.approx((kls.view(2, 2).mean(1).std() / 2**0.5).item(), abs=1e-12)
    assert summarize(ev.samples, 2).summary() == ev.summary()  # a saved evaluation re-reads the same
    with pytest.raises(ValueError, match="do not split into prompts of 2"):
        summarize(ev.samples[:3], 2)


def test_policy_and_reference_are_sampled_with_common_random_numbers(tiny_dir):
    """With the adapter at zero the policy is the reference: paired sampling must give the same
    continuation on both sides (independent draws would not), hence a gain of exactly 0."""
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)  # peft's init
    prompts = ["The film was", "Overall the acting", "I left the cinema", "The plot"]
    calls = []
    ev = evaluate_sentiment(
        model,
        tok,
        prompts,
        samples_per_prompt=3,
        max_new_tokens=6,
        batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(3, 4), (4, 4)]
    assert all(r["policy"] == r["reference"] for r in ev.samples)
    assert len({r["policy"] for r in ev.samples}) > 1  # still random across samples and prompts
    assert ev.reward_gain == 0.0 and ev.win_rate == 0.5 and ev.kl == pytest.approx(0.0, abs=1e-6)
    again = evaluate_sentiment(model, tok, prompts, samples_per_prompt=3, max_new_tokens=6, batch_size=3)
    assert [r["policy"] for r in again.samples] == [r["policy"] for r in ev.samples]  # seeded
    other = evaluate_sentiment(model, tok, prompts, samples_per_prompt=3, max_new_tokens=6, batch_size=3, seed=1)
    assert [r["policy"] for r in other.samples] != [r["policy"] for r in ev.samples]


def test_evaluate_refuses_no_prompts(policy):
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_sentiment(*policy, [])


def test_standard_errors_are_taken_over_prompts():
    from sparsepo_lite.eval.sentiment import mean_and_se

    # prompts with samples (1, 3) and (2, 6): prompt means 2 and 4 -> mean 3, SE = std(2, 4) / sqrt(2) = 1
    assert mean_and_se([1.0, 3.0, 2.0, 6.0], 2) == pytest.approx((3.0, 1.0))
    assert mean_and_se([1.0, 3.0, 2.0, 6.0], 1) == pytest.approx((3.0, (14 / 3) ** 0.5 / 2))  # iid samples
    assert mean_and_se([0.5, 0.7], 2) == pytest.approx((0.6, 0.0))  # one prompt: no spread to estimate
