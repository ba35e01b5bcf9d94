"""``sparsepo-lite plan --model NAME``: the memory plan of one training step on a GPU, and the largest
sequence length that fits a budget (docs/memory.md)."""

from __future__ import annotations

import json
from typing import List

from ..losses import LOSS_TYPES
from ..refcache.format import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K

HELP = "memory estimate of a training step; the largest sequence length that fits"


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help=HELP, description=__doc__)
    p.add_argument(
        "--model",
        required=True,
        help="a shipped config (llama-3-8b, llama-3.1-8b, mistral-7b-v0.3, qwen2.5-7b; hub names "
        "like meta-llama/Meta-Llama-3-8B-Instruct map to them), a config.json or a model folder",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the largest that fits)")
    p.add_argument("--gpu-mem", default="24GB", help="memory budget of the card (default 24GB)")
    p.add_argument("--loss", default="sparsepo", choices=LOSS_TYPES, help="the loss (default sparsepo)")
    p.add_argument(
        "--reference",
        default="online",
        choices=["online", "topk", "hidden", "label"],
        help="online reference, or a precompute-ref cache (top-k, hidden states, labels only)",
    )
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="top-k of a --reference topk cache")
    p.add_argument(
        "--tail-samples",
        type=int,
        default=DEFAULT_TAIL_SAMPLES,
        help="tail samples per token of a --reference topk cache",
    )
    p.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch")
    p.add_argument(
        "--prompt-frac",
        type=float,
        default=0.0,
        help="share of each sequence that is prompt (default 0: all response, the worst case)",
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="compute dtype")
    p.add_argument("--independent-masks", action="store_true", help="SparsePO with two mask nets")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args, rest: List[str]) -> None:
    """Print the memory plan of one training step and the largest T that fits the budget."""
    from ..memory_plan import GiB, check_setting, load_shape, max_seq_len, parse_bytes, plan_memory

    try:
        for name in ("seq_len", "top_k", "tail_samples", "prompt_frac", "pairs", "lora_r"):
            value = getattr(args, name)
            if value is not None:  # --seq-len left out: the largest that fits
                check_setting(name, value, label="--" + name.replace("_", "-"))
        shape = load_shape(args.model)
        try:
            budget = parse_bytes(args.gpu_mem)
        except ValueError as exc:
            raise ValueError(f"--gpu-mem: {exc}") from None
        kw = dict(
            loss=args.loss,
            reference=args.reference,
            top_k=args.top_k,
            tail_samples=args.tail_samples,
            pairs=args.pairs,
            lora_r=args.lora_r,
            dtype=args.dtype,
            independent_masks=args.independent_masks,
        )
        best = max_seq_len(shape, budget, prompt_frac=args.prompt_frac, **kw)
        t = best if args.seq_len is None else args.seq_len
        result = plan_memory(shape, t, prompt_len=int(t * args.prompt_frac), **kw) if t else None
    except ValueError as exc:
        raise SystemExit(f"plan: {exc}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "plan": result.to_dict() if result else None,
                    "budget": budget,
                    "max_seq_len": best,
                    "fits": bool(result and result.fits(budget)),
                },
                indent=1,
            )
        )
        return
    if result is None:
        print(f"{shape.name}: nothing fits in {budget / GiB:.1f} GiB, not even T = 256")
        return
    print(result.table())
    verdict = "fits" if result.fits(budget) else "does NOT fit"
    print(
        f"\nbudget {budget / GiB:.1f} GiB (1.0 GiB kept for the CUDA context and allocator): T = {t} {verdict}; "
        f"largest T that fits: {best}; chunk_size: {result.chunk_size}"
    )
