"""The CUDA row kernel (csrc/cuda/row_pass.cu) run on the CPU, against the float64 oracle.

No GPU is needed: the kernel source is compiled with g++ against tests/cuda_emu/cuda_runtime.h,
which runs each thread block as 512 std::threads with real barriers and warp shuffles. This checks
the kernel's own logic (block-strided loops, the warp and block reductions, the barriers around the
in-place writes, top-k scatter, the label fix-up) on every CI run; tests/test_token_stats_cuda.py
checks the real thing on a GPU.

The oracle sees the logits as hidden states with an identity head (W = I), so its autograd
gradient with respect to the hidden states is the gradient factor g the kernel writes in place.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import sparsepo_lite as sp
from sparsepo_lite.testing import token_stats_reference

from conftest import OP_KINDS

pytestmark = pytest.mark.slow  # trains or runs real models, compiles, or starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("a C++20 compiler (g++) is needed to build the emulated CUDA kernel")
    lib = tmp_path_factory.mktemp("cuda_emu") / "row_pass_emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-fPIC",
        "-shared",
        "-pthread",
        "-Wall",
        "-Werror",
        "-I",
        os.path.join(ROOT, "tests", "cuda_emu"),
        "-x",
        "c++",
        os.path.join(ROOT, "csrc", "cuda", "row_pass.cu"),
        "-x",
        "none",
        os.path.join(ROOT, "tests", "cuda_emu", "row_pass_emu.cpp"),
        "-o",
        str(lib),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def run_kernel(kernel, dtype, z, zr, labels, a, b, kind, ids=None, lq=None, write_grad=True, tail=None):
    """Call the emulated kernel on copies; returns (logp, ref_logp, kl, g or the untouched logits).
    ``tail``: (tail ids [rows, m], their reference log-probs) for the sampled-tail top-k."""
    rows, vocab = z.shape
    z = z.to(dtype).clone().contiguous()
    zr = None if zr is None else zr.to(dtype).clone().contiguous()
    k = 0 if ids is None else ids.shape[1]
    ids = None if ids is None else ids.long().contiguous()
    lq = None if lq is None else lq.to(dtype).contiguous()
    tids, tlq = (None, None) if tail is None else (tail[0].long().contiguous(), tail[1].to(dtype).contiguous())
    m = 0 if tids is None else tids.shape[1]
    # Every tensor whose pointer is passed stays referenced here until the call returns.
    labels, a, b = labels.long().contiguous(), a.to(dtype).contiguous(), b.to(dtype).contiguous()
    scratch = torch.empty(rows, max(k + m, 1), dtype=dtype)
    out = [torch.full((rows,), float("nan"), dtype=dtype) for _ in range(3)]
    ptr = lambda t: ctypes.c_void_p(None if t is None else t.data_ptr())
    fn = kernel.row_pass_emu_f64 if dtype == torch.float64 else kernel.row_pass_emu_f32
    fn(
        ptr(z),
        ptr(zr),
        ctypes.c_int64(rows),
        ctypes.c_int64(vocab),
        ptr(labels),
        ptr(a),
        ptr(b),
        ctypes.c_int(OP_KINDS[kind]),
        ptr(ids),
        ptr(lq),
        ctypes.c_int64(k),
        ptr(tids),
        ptr(tlq),
        ctypes.c_int64(m),
        ptr(scratch),
        ptr(out[0]),
        ptr(out[1]),
        ptr(out[2]),
        ctypes.c_int(int(write_grad)),
    )
    return out[0], out[1], out[2], z


def problem(rows, vocab, kind, k, scale=3.0):
    z = torch.randn(rows, vocab, dtype=torch.float64) * scale
    zr = z + torch.randn(rows, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,))
    labels[0], labels[-1] = 0, vocab - 1
    a, b = torch.randn(rows, dtype=torch.float64), torch.rand(rows, dtype=torch.float64)
    a[1] = 0.0  # a masked token
    lq_full = torch.log_softmax(zr, -1)
    label_logp = lq_full.gather(1, labels[:, None]).squeeze(1)
    eye = torch.eye(vocab, dtype=torch.float64)
    ids = lq = tail = None
    if kind == "exact":
        ref = sp.ExactReference(zr, eye)
    elif kind in ("topk", "sampled"):
        lq, ids = lq_full.topk(k, dim=-1)
        ref = sp.TopKReference(ids, lq, label_logp)
        if kind == "sampled" and k < vocab:  # 20 draws from the reference's tail, repeats included
            tail_ids = torch.multinomial(lq_full.exp().scatter(1, ids, 0.0), 20, replacement=True)
            tail = (tail_ids, lq_full.gather(1, tail_ids))
            ref = sp.TopKReference(ids, lq, label_logp, tail_ids, tail[1])
    elif kind == "label":
        ref = sp.LabelReference(label_logp)
    else:
        ref = None
    return z, zr, labels, a, b, ids, lq, ref, eye, tail


def oracle(z, labels, a, b, ref, eye, kind):
    h = z.clone().requires_grad_(True)
    rows = z.shape[0]
    out = token_stats_reference(
        h,
        eye,
        labels,
        torch.arange(rows),
        rows,
        logp_weight=a,
        kl_weight=b if kind in ("exact", "topk", "sampled") else None,
        ref=ref,
    )
    (g,) = torch.autograd.grad(out.seq_sums.sum(), h)  # W = I: d(a logp + b KL)/dz per row
    return out, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["exact", "topk", "sampled", "label", "none"])
@pytest.mark.parametrize("vocab,k", [(10, 4), (700, 32), (1500, 600)], ids=lambda x: str(x))
def test_emulated_cuda_kernel_matches_oracle(kernel, vocab, k, kind, dtype, seed):
    # V = 10: most of the 512 threads idle; V = 1500: several logits per thread; k = 600: the
    # top-k loops stride past one block.
    rows = 5
    z, zr, labels, a, b, ids, lq, ref, eye, tail = problem(rows, vocab, kind, k)
    logp, ref_logp, kl, g = run_kernel(
        kernel, dtype, z, zr if kind == "exact" else None, labels, a, b, kind, ids, lq, tail=tail
    )
    want, want_g = oracle(z, labels, a, b, ref, eye, kind)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(logp.double(), want.logp.detach(), rtol=rtol, atol=atol)
    if kind == "exact":
        torch.testing.assert_close(ref_logp.double(), want.ref_logp.detach(), rtol=rtol, atol=atol)
    if kind in ("exact", "topk", "sampled"):
        torch.testing.assert_close(kl.double(), want.kl.detach(), rtol=rtol, atol=atol)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), want_g, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["exact", "topk", "sampled", "label"])
def test_emulated_kernel_without_gradient_leaves_logits_alone(kernel, kind, seed):
    z, zr, labels, a, b, ids, lq, ref, eye, tail = problem(3, 900, kind, 40)
    logp, _, kl, untouched = run_kernel(
        kernel,
        torch.float64,
        z,
        zr if kind == "exact" else None,
        labels,
        a,
        b,
        kind,
        ids,
        lq,
        write_grad=False,
        tail=tail,
    )
    want, _ = oracle(z, labels, a, b, ref, eye, kind)
    assert torch.equal(untouched, z)
    torch.testing.assert_close(logp, want.logp.detach(), rtol=1e-10, atol=1e-12)
    if kind != "label":
        torch.testing.assert_close(kl, want.kl.detach(), rtol=1e-10, atol=1e-12)


def test_emulated_topk_with_k_equal_v_is_exact(kernel, seed):
    z, zr, labels, a, b, _, _, _, eye, _ = problem(4, 600, "exact", 0)
    lq, ids = torch.log_softmax(zr, -1).topk(600, dim=-1)
    _, _, kl_top, g_top = run_kernel(kernel, torch.float64, z, None, labels, a, b, "topk", ids, lq)
    _, _, kl_exact, g_exact = run_kernel(kernel, torch.float64, z, zr, labels, a, b, "exact")
    torch.testing.assert_close(kl_top, kl_exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_top, g_exact, rtol=1e-9, atol=1e-12)


def test_emulated_extreme_logits_stay_finite(kernel):
    # A peaked row (one logit 80 above the rest) and a flat one: the max shift must hold.
    z = torch.zeros(2, 1000, dtype=torch.float64)
    z[0, 7] = 80.0
    zr = z.flip(1).clone()
    labels = torch.tensor([7, 3])
    a, b = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    logp, ref_logp, kl, g = run_kernel(kernel, torch.float32, z, zr, labels, a, b, "exact")
    want, want_g = oracle(
        z,
        labels,
        a,
        b,
        sp.ExactReference(zr, torch.eye(1000, dtype=torch.float64)),
        torch.eye(1000, dtype=torch.float64),
        "exact",
    )
    for t in (logp, ref_logp, kl, g):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(kl.double(), want.kl.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-6)
