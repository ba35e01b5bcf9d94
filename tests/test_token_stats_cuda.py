"""The CUDA row kernel (csrc/cuda/row_pass.cu) against the float64 oracle, on a GPU.

tests/test_token_stats.py already runs every case on "cuda" when a GPU is present; its vocabularies
are smaller than one thread block (512 threads), so each thread sees at most one logit per row.
These cases target what only the kernel has: block-strided loops over vocabularies of real
size, top-k lists longer than a block, the stacked shared-head GEMM on the GPU, and the CUDA
memory bound. Skipped without a GPU (the CPU suite cannot run them).
"""

from __future__ import annotations

import pytest
import torch

import sparsepo_lite as sp
from sparsepo_lite.ops import registration
from sparsepo_lite.peak_memory import PeakMemory

from conftest import Problem, compare_with_oracle, leaves, make_problem, upstream_loss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def no_fallback(monkeypatch):
    """Every case here must run the compiled kernel, never the pure-PyTorch fallback."""

    def refuse(*args):
        raise AssertionError("the pure-PyTorch fallback ran instead of the CUDA kernel")

    monkeypatch.setattr(registration, "token_stats_torch", refuse)


def test_extension_has_the_cuda_kernel():
    assert sp.HAVE_EXTENSION and sp.EXTENSION_HAS_CUDA, sp.EXTENSION_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ref_kind", ["exact", "topk", "sampled", "label", "none"])
@pytest.mark.parametrize("v", [1_000, 32_000, 128_256])
def test_large_vocabulary_matches_oracle(v, ref_kind, dtype, seed):
    # 37 tokens in chunks of 16: a ragged last chunk; labels at 0 and V-1.
    p = make_problem(37, 64, v, ref_kind, dtype=dtype, device="cuda", k=64, logit_scale=1.0)
    assert p.hidden.is_cuda
    compare_with_oracle(p, 16, dtype, seed)


@pytest.mark.parametrize("k", [513, 1500])
def test_topk_longer_than_a_thread_block(k, seed):
    p = make_problem(20, 32, 4_000, "topk", device="cuda", k=k, logit_scale=1.0)
    compare_with_oracle(p, 7, torch.float32, seed)


def test_topk_with_k_equal_v_is_exact_on_gpu(seed):
    p = make_problem(25, 16, 700, "exact", device="cuda", logit_scale=1.0)
    lq = torch.log_softmax(p.ref.hidden.double() @ p.weight.double().T, -1)
    vals, ids = lq.topk(700, dim=-1)
    label_logp = lq.gather(1, p.labels[:, None]).squeeze(1).float()
    exact = sp.chunked_token_stats(*p.args(), **p.kwargs(), chunk_size=9)
    topk = sp.chunked_token_stats(
        *p.args(),
        logp_weight=p.logp_weight,
        kl_weight=p.kl_weight,
        ref=sp.TopKReference(ids, vals.float(), label_logp),
        chunk_size=9,
    )
    torch.testing.assert_close(topk.kl, exact.kl, rtol=1e-4, atol=1e-5)


def test_gpu_agrees_with_the_cpu_kernel(seed):
    p = make_problem(80, 48, 5_000, "exact", logit_scale=1.0)
    cpu = sp.chunked_token_stats(*p.args(), **p.kwargs(), chunk_size=24)
    g_cpu = torch.autograd.grad(upstream_loss(cpu.seq_sums), leaves(p))
    leaf = lambda t: None if t is None else t.detach().cuda().requires_grad_(True)
    w = p.weight.cuda()
    q = Problem(
        leaf(p.hidden),
        w,
        p.labels.cuda(),
        p.seq_ids.cuda(),
        p.num_seqs,
        leaf(p.logp_weight),
        leaf(p.kl_weight),
        sp.ExactReference(p.ref.hidden.cuda(), w),
    )  # shared head: stacked GEMM
    gpu = sp.chunked_token_stats(*q.args(), **q.kwargs(), chunk_size=24)
    g_gpu = torch.autograd.grad(upstream_loss(gpu.seq_sums), leaves(q))
    torch.testing.assert_close(gpu.seq_sums.cpu(), cpu.seq_sums, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.kl.cpu(), cpu.kl, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4 * (1 + b.abs().max().item()))


def test_cuda_peak_does_not_grow_with_tokens_beyond_n_by_h():
    """Chunk buffers are fixed: going from N to 4N tokens adds only the [N, H]-sized tensors."""
    h, v, chunk = 256, 32_000, 128

    def peak(n):
        torch.manual_seed(0)
        p = make_problem(n, h, v, "exact", device="cuda", dtype=torch.bfloat16, logit_scale=1.0)
        with PeakMemory("cuda") as pm:
            out = sp.chunked_token_stats(*p.args(), **p.kwargs(), chunk_size=chunk)
            torch.autograd.grad(out.seq_sums.sum(), leaves(p))
        return pm.peak_bytes

    n1, n2 = 512, 2048
    growth = peak(n2) - peak(n1)
    per_token = h * 2 * 4 + 64  # grad factor and hidden grad (bf16) + per-token fp32 vectors, generously
    assert growth <= (n2 - n1) * per_token, f"peak grew {growth / 2**20:.1f} MiB from N={n1} to N={n2}"
    assert peak(n2) < (n2 * v * 4) / 4, "the op must never hold an [N, V] fp32 tensor"
