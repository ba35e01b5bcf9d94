"""Reference kinds of the ``sparsepo_lite::token_stats`` op (its ``ref_kind`` argument).

Must match ``enum RefKind`` in ``csrc/row_pass.h``.
"""

REF_NONE = 0  # no reference: label log-probs only
REF_LABEL = 1  # reference label log-probs passed through: no KL
REF_TOPK = 2  # cached top-k reference log-probs + one tail bucket
REF_EXACT = 3  # reference logits from reference hidden states and head
