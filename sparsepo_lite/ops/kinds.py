"""Reference kinds of the ``sparsepo_lite::token_stats`` op (its ``ref_kind`` int argument).

The values are part of the op's schema: they mirror ``enum RefKind`` in ``csrc/row_pass.h``, and a
test reads that header to keep the two equal; so do the slack constants below.
"""

import enum


class RefKind(enum.IntEnum):
    """Where the op gets the reference distribution of each response token."""

    NONE = 0  # no reference: label log-probs only
    LABEL = 1  # reference label log-probs passed through: no KL
    TOPK = 2  # cached top-k reference log-probs + one tail bucket (+ optional tail draws)
    EXACT = 3  # reference logits from reference hidden states and head


#: How far a stored reference log-prob may sit above 0 (16-bit rounding of log-probs near 0).
LOGP_SLACK = 1e-2
#: How far the log of a token's top-k probability mass may sit above log 1: bfloat16 rounds a flat
#: top-k's equal log-probs all one way, up to 4% more mass.
TOPK_LOG_MASS_SLACK = 5e-2
