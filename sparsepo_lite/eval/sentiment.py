"""Sentiment control, the paper's first experiment in miniature: VADER reward, sampling, evaluation.

The reward of a continuation is VADER's compound score in [-1, 1] (``vadersentiment``). The
evaluation samples continuations of held-out prompts from the policy and from the reference (the
same model with its adapter disabled) and reports the mean reward of each, the policy's win rate
against the reference (ties count half), and the sequence KL(policy || reference), estimated on
the policy's own samples as the mean of sum_t [log pi(y_t) - log pi_ref(y_t)].

Policy and reference are sampled with common random numbers: the same seed before each of the two
``generate`` calls of a batch, so both draw the same noise at every step. Each side's samples keep
their own distribution (a fresh seed gives a valid sample of each model); only their pairing
changes: where the two models agree the two continuations coincide, so the paired reward
difference has a much smaller variance than two independent draws would give. The standard errors
reported are those of the means and of the mean paired difference, taken over prompts (the samples
of one prompt are averaged first, since they are not independent of each other).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..data import BadRow, pad_id, split_row, text_prompt_ids

logger = logging.getLogger(__name__)


class Sentiment:
    """VADER compound score of a text, in [-1, 1]."""

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError("the sentiment reward needs VADER: pip install vadersentiment") from None
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, text: str) -> float:
        return float(self.analyzer.polarity_scores(text)["compound"])

    #: What counts as a sentiment word (the mask lift's rule): the token's text, stripped of spaces and
    #: of the punctuation around it and lower-cased, is an entry of VADER's lexicon made of at least two
    #: letters. One-letter entries ("l", "x") and emoticons are left out: they rate sub-word pieces and
    #: symbols, not words.
    LEXICON_RULE = (
        "token text stripped of spaces and surrounding punctuation, lower-cased, in VADER's lexicon, "
        "alphabetic, at least 2 letters"
    )

    def is_sentiment_word(self, token_text: str) -> bool:
        """Whether this token is a sentiment word by :attr:`LEXICON_RULE`."""
        word = token_text.strip().lower().strip(".,;:!?\"'()")
        return len(word) >= 2 and word.isalpha() and word in self.analyzer.lexicon


@torch.no_grad()
def sample_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    top_p: float = 0.95,
) -> List[List[str]]:
    """``num_samples`` sampled continuations (text, special tokens dropped) per prompt."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
    try:
        ids = [text_prompt_ids(tokenizer, p) for p in prompts]  # as training encodes them
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad_id(tokenizer),
        )
    finally:
        model.train(was_training)
    new = out[:, enc["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


@dataclass
class SentimentEval:
    """Held-out evaluation of a policy against its reference (see the module docstring)."""

    reward_policy: float
    reward_reference: float
    win_rate: float
    kl: float
    reward_gain: float = 0.0  # mean over samples of reward_policy - reward_reference (paired)
    reward_gain_se: float = 0.0  # its standard error
    reward_policy_se: float = 0.0
    reward_reference_se: float = 0.0
    kl_se: float = 0.0  # standard error of kl
    samples: List[Dict[str, object]] = field(default_factory=list)

    def summary(self) -> Dict[str, float]:
        return {
            "reward_policy": self.reward_policy,
            "reward_reference": self.reward_reference,
            "win_rate": self.win_rate,
            "kl": self.kl,
            "reward_gain": self.reward_gain,
            "reward_gain_se": self.reward_gain_se,
            "reward_policy_se": self.reward_policy_se,
            "reward_reference_se": self.reward_reference_se,
            "kl_se": self.kl_se,
        }


@torch.no_grad()
def sequence_logratio(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str]) -> List[float]:
    """sum_t [log pi(y_t) - log pi_ref(y_t)] per (prompt, continuation); the reference is the
    adapter-off base. The prompt is encoded as :func:`sample_continuations` encodes it (the
    tokenizer's own special tokens, a BOS where it adds one). Uses the chunked op, so no
    [tokens x vocab] tensor is formed."""
    from ..data import PreferenceCollator, PreferenceExample, response_positions
    from ..models import backbone, unwrap
    from ..ops import ExactReference, chunked_token_stats
    from ..reference import reference_pass

    examples = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        p_ids = text_prompt_ids(tokenizer, p)  # with the BOS the samples were drawn after (and training saw)
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        examples.append(PreferenceExample(i, p_ids, c_ids, c_ids))
    pad = pad_id(tokenizer)
    batch = PreferenceCollator(pad)(examples)
    n = len(examples)
    ids, att = batch["input_ids"][:n].to(model.device), batch["attention_mask"][:n].to(model.device)
    response, seq_ids, pos, y = response_positions(batch["labels"][:n].to(model.device))
    was_training = model.training
    model.eval()
    try:
        ref = reference_pass(model, ids, att, response, seq_ids, pos)
        hidden = backbone(unwrap(model))(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state[
            seq_ids, pos
        ]
        stats = chunked_token_stats(hidden, ref.weight, y, seq_ids, n, ref=ExactReference(ref.hidden, ref.weight))
    finally:
        model.train(was_training)
    diff = torch.zeros(n, dtype=torch.float64).index_add(0, seq_ids.cpu(), (stats.logp - stats.ref_logp).double().cpu())
    return diff.tolist()


def mean_and_se(values: Sequence[float], per_prompt: int) -> tuple:
    """Mean and its standard error, with the ``per_prompt`` consecutive samples of one prompt as one
    cluster: samples of the same prompt are correlated, so the error is taken over prompt means
    (0 for a single prompt)."""
    means = [sum(values[i : i + per_prompt]) / per_prompt for i in range(0, len(values), per_prompt)]
    m = len(means)
    mean = sum(means) / m
    if m < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in means) / (m - 1)
    return mean, math.sqrt(var / m)


def evaluate_sentiment(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    score: Sentiment = None,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SentimentEval:
    """Sample from the policy and from its reference on ``prompts`` (paired, common random numbers);
    reward, win rate, KL. ``progress(done, total)`` is called after each batch of prompts."""
    if not prompts:
        raise ValueError("evaluate_sentiment: no prompts")
    score = score or Sentiment()
    rows = []
    with torch.random.fork_rng(devices=[]):  # sampling draws from the CPU generator
        for i in range(0, len(prompts), batch_size):
            part = list(prompts[i : i + batch_size])
            torch.manual_seed(seed * 1_000_003 + i)
            pol = sample_continuations(
                model, tokenizer, part, num_samples=samples_per_prompt, max_new_tokens=max_new_tokens
            )
            torch.manual_seed(seed * 1_000_003 + i)  # the same noise for the reference: paired samples
            with model.disable_adapter():
                ref = sample_continuations(
                    model, tokenizer, part, num_samples=samples_per_prompt, max_new_tokens=max_new_tokens
                )
            flat_p = [p for p, cs in zip(part, pol) for _ in cs]
            flat_c = [c for cs in pol for c in cs]
            kls = sequence_logratio(model, tokenizer, flat_p, flat_c)
            for j, p in enumerate(part):
                for s in range(samples_per_prompt):
                    rows.append(
                        {
                            "prompt": p,
                            "policy": pol[j][s],
                            "reference": ref[j][s],
                            "reward_policy": score(pol[j][s]),
                            "reward_reference": score(ref[j][s]),
                            "kl": kls[j * samples_per_prompt + s],
                        }
                    )
            if progress is not None:
                progress(min(i + batch_size, len(prompts)), len(prompts))
    return summarize(rows, samples_per_prompt)


def summarize(rows: Sequence[Dict[str, object]], samples_per_prompt: int) -> SentimentEval:
    """The evaluation's numbers from its paired samples (``SentimentEval.samples``: prompt-major,
    ``samples_per_prompt`` consecutive rows per prompt), e.g. to re-read a saved evaluation."""
    m = len(rows)
    if m == 0 or m % samples_per_prompt:
        raise ValueError(f"summarize: {m} samples do not split into prompts of {samples_per_prompt}")
    wins = sum(
        1.0
        if r["reward_policy"] > r["reward_reference"]
        else 0.5
        if r["reward_policy"] == r["reward_reference"]
        else 0.0
        for r in rows
    )
    k = samples_per_prompt
    pol_mean, pol_se = mean_and_se([r["reward_policy"] for r in rows], k)
    ref_mean, ref_se = mean_and_se([r["reward_reference"] for r in rows], k)
    gain, gain_se = mean_and_se([r["reward_policy"] - r["reward_reference"] for r in rows], k)
    kl, kl_se = mean_and_se([r["kl"] for r in rows], k)
    return SentimentEval(
        reward_policy=pol_mean,
        reward_reference=ref_mean,
        win_rate=wins / m,
        kl=kl,
        reward_gain=gain,
        reward_gain_se=gain_se,
        reward_policy_se=pol_se,
        reward_reference_se=ref_se,
        kl_se=kl_se,
        samples=list(rows),
    )


def row_prompt(row) -> Optional[str]:
    """The text prompt of a preference row: its ``prompt`` string, or the implicit prompt its string
    responses share, cut as training cuts it (:func:`~sparsepo_lite.data.split_row`). None for a
    message-list prompt (the evaluation continues text) and for a row whose fields
    :func:`~sparsepo_lite.data.split_row` refuses (training's other checks, on the responses and
    truncation, are not made: the evaluation samples its own responses)."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]  # an empty one is the caller's error to raise, naming the row
    try:
        prompt, _, _, conversational = split_row(row)
    except BadRow:
        return None
    return None if conversational else prompt


def check_generation_length(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Raise ``ValueError`` naming ``--max-new-tokens`` when the longest prompt and the continuation
    outrun the model's context: with a learned position table generation fails midway with an index
    error, with rotary positions it runs on past what the model was trained for, for as long as asked."""
    from ..models import context_length, unwrap

    limit = context_length(unwrap(model).config)
    longest = max(len(text_prompt_ids(tokenizer, p)) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} after the longest prompt ({longest} tokens) runs past the model's "
            f"context of {limit} tokens; lower it to {max(limit - longest, 0)} or less"
        )


#: Files ``evaluate_run`` writes into the run folder.
EVAL_FILE = "sentiment_eval.json"
REPORT_FILE = "sentiment_report.html"


def evaluate_run(
    run_dir: str,
    data: str,
    *,
    prompts: int = 64,
    samples: int = 2,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, float]:
    """Evaluate a training run on the first ``prompts`` held-out prompts of ``data`` and write
    ``sentiment_eval.json`` (summary, settings, every sample) and ``sentiment_report.html`` into the
    run folder. Returns the summary (:meth:`SentimentEval.summary`)."""
    import json
    import os

    from ..data import read_rows
    from ..validation import MAX_SEED, check_number
    from .runs import load_run
    from .views import sentiment_report_html

    for name, value in (("prompts", prompts), ("samples", samples), ("max_new_tokens", max_new_tokens)):
        check_number(name, value, low=1, integer=True)
    check_number("seed", seed, low=0, high=MAX_SEED, integer=True)
    model, tok, _, cfg = load_run(run_dir)
    rows = read_rows(data)
    texts, skipped = [], []
    for i, r in enumerate(rows):
        if len(texts) == prompts:
            break
        text = row_prompt(r)
        if text is None:
            skipped.append(i)
        elif not text.strip():  # sampling would continue padding alone; training refuses it too
            raise ValueError(f"{data}: row {i}: the prompt is empty")
        else:
            texts.append(text)
    if not texts:
        raise ValueError(f"{data}: no rows with a text prompt (a string 'prompt', or string responses that share one)")
    check_generation_length(model, tok, texts, max_new_tokens)
    if skipped:  # the evaluation takes later rows in their place: say which
        logger.warning(
            "%s: rows %s have no text prompt (a message-list prompt, or a malformed row) and are not evaluated",
            data,
            skipped[:10],
        )
    ev = evaluate_sentiment(
        model, tok, texts, samples_per_prompt=samples, max_new_tokens=max_new_tokens, seed=seed, progress=progress
    )
    summary = ev.summary()
    meta = {
        "run": run_dir,
        "data": data,
        "prompts": len(texts),
        "samples per prompt": samples,
        "max new tokens": max_new_tokens,
        "loss_type": cfg.get("loss_type"),
        "beta": cfg.get("beta"),
    }
    with open(os.path.join(run_dir, EVAL_FILE), "w") as f:
        json.dump({"summary": summary, "meta": meta, "samples": ev.samples}, f, indent=1)
    with open(os.path.join(run_dir, REPORT_FILE), "w") as f:
        f.write(sentiment_report_html(summary, ev.samples, meta))
    return summary
