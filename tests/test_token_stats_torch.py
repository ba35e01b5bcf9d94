"""The pure-PyTorch fallback kernel against the float64 oracle, and the fallback op path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsepo_lite as sp
from sparsepo_lite.ops.fallback import token_stats_torch
from sparsepo_lite.testing import token_stats_reference

from conftest import OP_KINDS, as_float64, make_problem, raw_op_args


@pytest.mark.parametrize("kind", list(OP_KINDS))
@pytest.mark.parametrize("n, chunk", [(29, 6), (7, 1), (3, 50)])
def test_fallback_values_and_gradient_factor_match_oracle(kind, n, chunk, seed):
    p = make_problem(n, 12, 73, kind, k=9)
    seq_sums, logp, ref_logp, kl, G = token_stats_torch(*raw_op_args(p, kind, chunk, True))
    p64 = as_float64(p)
    ora = token_stats_reference(*p64.args(), **p64.kwargs())
    torch.testing.assert_close(logp.double(), ora.logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq_sums.double(), ora.seq_sums.detach(), rtol=1e-5, atol=1e-4)
    if ora.kl is not None:
        torch.testing.assert_close(kl.double(), ora.kl.detach(), rtol=1e-5, atol=1e-5)
    if ora.ref_logp is not None:
        torch.testing.assert_close(ref_logp.double(), ora.ref_logp.detach(), rtol=1e-5, atol=1e-5)
    # G_t = d(a_t logp_t + b_t kl_t)/dh_t: tokens are independent, so the gradient of the sum
    # of all sequence sums gives every row at once.
    (want,) = torch.autograd.grad(ora.seq_sums.sum(), [p64.hidden])
    torch.testing.assert_close(G.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["exact", "topk", "sampled"])
def test_fallback_and_compiled_kernel_agree(kind, seed):
    if not sp.HAVE_EXTENSION:
        pytest.skip("compiled extension not built")
    p = make_problem(40, 16, 90, kind, k=12)
    args = raw_op_args(p, kind, 9, True)
    for a, b in zip(token_stats_torch(*args), torch.ops.sparsepo_lite.token_stats(*args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


_FALLBACK_PROBE = textwrap.dedent("""
    import json, warnings, torch
    warnings.simplefilter("always")
    import sparsepo_lite as sp
    torch.manual_seed(0)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True); W = torch.randn(30, 8, dtype=torch.float64)
    y = torch.randint(0, 30, (11,)); sid = (torch.arange(11) > 4).long()
    ref = sp.ExactReference(h.detach() + 0.2, W)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [sp.chunked_token_stats(h, W, y, sid, 2, ref=ref, kl_weight=torch.ones(11, dtype=torch.float64),
                                       chunk_size=3) for _ in range(3)]
    outs[0].seq_sums.sum().backward()
    print(json.dumps({"have_ext": sp.HAVE_EXTENSION, "warnings": [str(w.message) for w in caught],
                      "sums": outs[0].seq_sums.tolist(), "grad": h.grad.sum().item()}))
""")


def _probe(disable):
    env = dict(os.environ, SPARSEPO_LITE_DISABLE_EXTENSION="1" if disable else "0")
    res = subprocess.run([sys.executable, "-c", _FALLBACK_PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_op_falls_back_to_pytorch_with_one_warning():
    fb = _probe(disable=True)
    assert fb["have_ext"] is False
    assert len(fb["warnings"]) == 1 and "pure-PyTorch kernel" in fb["warnings"][0]
    if sp.HAVE_EXTENSION:
        ext = _probe(disable=False)
        assert ext["warnings"] == []
        assert fb["sums"] == pytest.approx(ext["sums"], rel=1e-10, abs=1e-10)
        assert fb["grad"] == pytest.approx(ext["grad"], rel=1e-10, abs=1e-10)
