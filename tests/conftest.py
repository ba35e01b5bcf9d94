"""Shared test helpers: fresh random seeds and random token-statistics problems."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

# First, as a user should: the import picks libgomp's waits before torch loads it (sparsepo_lite/waits.py).
import sparsepo_lite as sp

# isort: split
import pytest
import torch

from sparsepo_lite.ops import RefKind
from sparsepo_lite.testing import token_stats_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def seed(request):
    """A fresh seed per test (reported on failure), or SPARSEPO_TEST_SEED to replay one."""
    s = int(os.environ.get("SPARSEPO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"replay with SPARSEPO_TEST_SEED={seeds[0]}"))


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor
    num_seqs: int
    logp_weight: torch.Tensor
    kl_weight: torch.Tensor | None
    ref: object

    def args(self):
        return (self.hidden, self.weight, self.labels, self.seq_ids, self.num_seqs)

    def kwargs(self):
        return dict(logp_weight=self.logp_weight, kl_weight=self.kl_weight, ref=self.ref)


def sample_tail(lq: torch.Tensor, ids: torch.Tensor, m: int, generator=None) -> torch.Tensor:
    """m ids per row drawn with replacement from the reference restricted to its tail (outside ``ids``)."""
    tail = lq.double().exp().scatter(1, ids.long(), 0.0)
    return torch.multinomial(tail.cpu(), m, replacement=True, generator=generator).to(lq.device)


def make_problem(
    n, h, v, ref_kind, *, dtype=torch.float32, device="cpu", k=8, num_seqs=None, ref_noise=0.5, logit_scale=2.0, m=6
):
    """Random tokens in unequal sequences (one of length 1, one empty), labels hitting 0 and V-1,
    some zero weights (masked tokens), and a reference near the policy. ``ref_kind`` "sampled" is a
    top-k reference with ``m`` tail samples."""
    num_seqs = num_seqs or max(2, n // 5)
    hidden = torch.randn(n, h, dtype=torch.float64) * logit_scale
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.5
    ref_hidden = hidden + ref_noise * torch.randn(n, h, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[0], labels[-1] = 0, v - 1
    # sequence 0 has exactly one token, the others unequal lengths (the last empty if num_seqs > 2)
    seq_ids = (
        torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(1, max(2, num_seqs - 1), (n - 1,)).sort().values])
        if n
        else torch.zeros(0, dtype=torch.long)
    )
    logp_weight = torch.randn(n, dtype=torch.float64)
    logp_weight[torch.rand(n) < 0.2] = 0.0
    kl_weight = torch.rand(n, dtype=torch.float64) if ref_kind in ("exact", "topk", "sampled") else None

    cast = lambda t: t.to(dtype).to(device)
    hidden, weight, ref_hidden = cast(hidden), cast(weight), cast(ref_hidden)
    lq = torch.log_softmax(ref_hidden.double() @ weight.double().T, dim=-1)
    label_logp = lq.gather(1, labels.to(device)[:, None]).squeeze(1)
    label_logp = label_logp if dtype == torch.float64 else label_logp.float()
    if ref_kind == "exact":
        ref = sp.ExactReference(ref_hidden, weight)
    elif ref_kind in ("topk", "sampled"):
        vals, ids = lq.topk(min(k, v), dim=-1)
        cast_lp = (lambda t: t) if dtype == torch.float64 else (lambda t: t.float())
        ref = sp.TopKReference(ids, cast_lp(vals), label_logp)
        if ref_kind == "sampled" and k < v:
            tail_ids = sample_tail(lq, ids, m)
            ref = sp.TopKReference(ids, cast_lp(vals), label_logp, tail_ids, cast_lp(lq.gather(1, tail_ids)))
    elif ref_kind == "label":
        ref = sp.LabelReference(label_logp)
    else:
        ref = None
    wdt = torch.float64 if dtype == torch.float64 else torch.float32  # token weights: fp32 or fp64
    return Problem(
        hidden.requires_grad_(True),
        weight,
        labels.to(device),
        seq_ids.to(device),
        num_seqs,
        logp_weight.to(wdt).to(device).requires_grad_(True),
        None if kl_weight is None else kl_weight.to(wdt).to(device).requires_grad_(True),
        ref,
    )


def as_float64(p: Problem) -> Problem:
    """The same problem upcast to float64, as fresh leaves (for the oracle)."""
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    ref = p.ref
    if isinstance(ref, sp.ExactReference):
        ref = sp.ExactReference(ref.hidden.double(), ref.weight.double())
    elif isinstance(ref, sp.TopKReference):
        ref = sp.TopKReference(
            ref.ids,
            ref.logprobs.double(),
            ref.label_logp.double(),
            ref.tail_ids,
            None if ref.tail_logprobs is None else ref.tail_logprobs.double(),
        )
    elif isinstance(ref, sp.LabelReference):
        ref = sp.LabelReference(ref.label_logp.double())
    return Problem(
        d(p.hidden), p.weight.double(), p.labels, p.seq_ids, p.num_seqs, d(p.logp_weight), d(p.kl_weight), ref
    )


def leaves(p: Problem):
    return [t for t in (p.hidden, p.logp_weight, p.kl_weight) if t is not None]


def save_tiny_llama(path, seed: int = 0) -> str:
    """A 2-layer Llama (hidden 32) with SmolLM2's tokenizer, saved under ``path``; returns it."""
    import transformers

    from sparsepo_lite.smollm2 import smollm2_path

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def review_rows(n, offset=0):
    """Toy preference rows: a film review prompt, a positive chosen and a negative rejected word."""
    good = [" great", " wonderful", " superb", " lovely"]
    bad = [" awful", " terrible", " boring", " dreadful"]
    return [
        {
            "prompt": f"Review {i + offset}: the film was",
            "chosen": good[i % 4] + ".",
            "rejected": bad[(i + 1) % 4] + ".",
        }
        for i in range(n)
    ]


def bench_module(name: str):
    """Import bench/NAME.py as the benchmarks run it (their folder on the import path)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


#: The op's reference kinds by the names make_problem takes ("sampled": top-k plus tail draws).
OP_KINDS = {
    "exact": RefKind.EXACT,
    "topk": RefKind.TOPK,
    "sampled": RefKind.TOPK,
    "label": RefKind.LABEL,
    "none": RefKind.NONE,
}


def raw_op_args(p, kind, chunk, need_grad):
    """The positional arguments of torch.ops.sparsepo_lite.token_stats for a make_problem problem."""
    r = p.ref
    n = p.hidden.shape[0]
    kl_w = p.kl_weight.detach() if p.kl_weight is not None else torch.zeros(n, dtype=p.logp_weight.dtype)
    return (
        p.hidden.detach(),
        p.weight,
        p.labels,
        p.seq_ids,
        p.num_seqs,
        p.logp_weight.detach(),
        kl_w,
        OP_KINDS[kind],
        r.hidden if kind == "exact" else None,
        r.weight if kind == "exact" else None,
        r.ids if kind in ("topk", "sampled") else None,
        r.logprobs if kind in ("topk", "sampled") else None,
        r.tail_ids if kind == "sampled" else None,
        r.tail_logprobs if kind == "sampled" else None,
        r.label_logp if kind in ("topk", "sampled", "label") else None,
        chunk,
        need_grad,
    )


# Tolerances against the float64 oracle, per input dtype: (rtol, atol) for per-token values and
# sums, and for gradients (atol scaled by the largest gradient). bf16/fp16 round the GEMM inputs
# and outputs (logits) to 8/11 bits. Worst errors seen over 20 seeds (logit scale 1, H = 32,
# V = 211): logp 8e-3 / 1e-3 / 9e-7 and relative hidden grad 1e-2 / 1e-3 / 8e-7 (bf16/fp16/fp32).
OP_TOL = {
    torch.float32: dict(val=(1e-5, 1e-5), grad=(1e-4, 1e-5)),
    torch.float16: dict(val=(5e-3, 3e-3), grad=(1e-2, 3e-3)),
    torch.bfloat16: dict(val=(2e-2, 2e-2), grad=(5e-2, 2e-2)),
}


def upstream_loss(seq_sums):
    """A non-linear function of the sums, so every sequence gets a different upstream gradient."""
    w = torch.linspace(-1.0, 1.5, seq_sums.shape[0], dtype=seq_sums.dtype, device=seq_sums.device)
    return (w * seq_sums).sum() + 0.1 * (seq_sums**2).sum()


def compare_with_oracle(p, chunk, dtype, seed):
    """chunked_token_stats on problem ``p`` against the float64 oracle: values, sums and gradients,
    within OP_TOL for the input dtype; NaN never passes."""
    out = sp.chunked_token_stats(*p.args(), **p.kwargs(), chunk_size=chunk)
    p64 = as_float64(p)
    ora = token_stats_reference(*p64.args(), **p64.kwargs())
    rtol, atol = OP_TOL[dtype]["val"]
    msg = lambda what: f"{what} (seed {seed})"
    for got, want, name in (
        (out.logp, ora.logp, "logp"),
        (out.ref_logp, ora.ref_logp, "ref_logp"),
        (out.kl, ora.kl, "kl"),
    ):
        if want is None:
            assert got is None, name
            continue
        assert torch.isfinite(got).all(), msg(f"{name} has NaN/inf")
        torch.testing.assert_close(got.double().cpu(), want.detach().cpu(), rtol=rtol, atol=atol, msg=msg(name))
    n_max = int(torch.bincount(p.seq_ids.cpu(), minlength=p.num_seqs).max()) if p.labels.numel() else 1
    torch.testing.assert_close(
        out.seq_sums.double().cpu(),
        ora.seq_sums.detach().cpu(),
        rtol=rtol,
        atol=atol * max(n_max, 1),
        msg=msg("seq_sums"),
    )

    grads = torch.autograd.grad(upstream_loss(out.seq_sums), leaves(p))
    want = torch.autograd.grad(upstream_loss(ora.seq_sums), leaves(p64))
    rtol, atol = OP_TOL[dtype]["grad"]
    for g, w, name in zip(grads, want, ("hidden", "logp_weight", "kl_weight")):
        assert g.dtype == getattr(p, name if name == "hidden" else name).dtype, name
        assert torch.isfinite(g).all(), msg(f"grad {name} has NaN/inf")
        torch.testing.assert_close(
            g.double().cpu(), w.cpu(), rtol=rtol, atol=atol * (1 + w.abs().max().item()), msg=msg(f"grad {name}")
        )
