"""The op's registration: its reference kinds against the C++ enum, and torch.library.opcheck
(schema, fake tensors, autograd registration, AOT dispatch) for every reference kind."""

from __future__ import annotations

import os
import re

import pytest
import torch

from sparsepo_lite.ops import RefKind

from conftest import OP_KINDS, make_problem, raw_op_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ref_kinds_match_the_enum_in_row_pass_h():
    with open(os.path.join(ROOT, "csrc", "row_pass.h")) as f:
        body = re.search(r"enum RefKind : int \{(.*?)\};", f.read(), re.S).group(1)
    in_cpp = {name.upper(): int(value) for name, value in re.findall(r"kRef(\w+)\s*=\s*(\d+)", body)}
    assert in_cpp == {kind.name: kind.value for kind in RefKind}


def test_slack_constants_match_row_pass_h():
    from sparsepo_lite.ops.kinds import LOGP_SLACK, TOPK_LOG_MASS_SLACK

    with open(os.path.join(ROOT, "csrc", "row_pass.h")) as f:
        in_cpp = dict(re.findall(r"constexpr double (\w+) = ([\d.e+-]+);", f.read()))
    assert {name: float(value) for name, value in in_cpp.items()} == {
        "kLogProbSlack": LOGP_SLACK,
        "kTopKLogMassSlack": TOPK_LOG_MASS_SLACK,
    }


@pytest.mark.parametrize("kind", list(OP_KINDS))
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(kind, need_grad, seed):
    p = make_problem(11, 8, 37, kind, k=5)
    args = list(raw_op_args(p, kind, 4, need_grad))
    args[7] = int(args[7])  # the schema's int, as chunked_token_stats passes it
    if need_grad:  # hidden and the two per-token weights carry gradients
        for i in (0, 5, 6):
            args[i] = args[i].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.sparsepo_lite.token_stats.default, tuple(args))
