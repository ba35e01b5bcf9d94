"""``sparsepo-lite verify-ref DIR``: check every shard of a reference cache; with ``--against-live N
--policy RUN``, also measure the cache's KL against the live reference (and, with ``--max-kl-error``,
fail when it is further off than that)."""

from __future__ import annotations

from typing import List, Optional

HELP = "check every shard of a reference cache (and its KL against the live reference)"


def verify_ref(
    cache_dir: str,
    against_live: int = 0,
    policy: Optional[str] = None,
    batch_size: int = 4,
    max_kl_error: Optional[float] = None,
) -> dict:
    """Check every shard of a cache; with ``against_live`` batches and a trained ``policy`` run, also
    measure the cache's KL against the live reference on the cache's train split. ``max_kl_error``: the
    largest mean relative error of the per-sequence KL accepted; above it a ``CacheError`` is raised
    after the report is printed."""
    from ..refcache import RefCache, verify_cache
    from ..refcache.format import CacheError
    from ..refcache.reader import storage_per_token
    from ..validation import check_number

    check_number("--against-live", against_live, low=0, integer=True)
    check_number("--batch-size", batch_size, low=1, integer=True)
    if max_kl_error is not None:
        if not against_live:
            raise ValueError("--max-kl-error needs --against-live N: the error is measured on N batches")
        if not max_kl_error >= 0:  # also refuses NaN
            raise ValueError(f"--max-kl-error must be a fraction >= 0, got {max_kl_error}")
    totals = verify_cache(cache_dir)
    cache = RefCache(cache_dir)
    per_token, formula = storage_per_token(cache, totals)
    print(
        f"{cache_dir}: OK ({totals['shards']} shards, {totals['examples']} pairs, {totals['tokens']} tokens, "
        f"{totals['bytes']} bytes: {per_token:.1f} bytes per response token, {formula})"
    )
    if not against_live:
        return {"totals": totals}
    if policy is None:
        raise ValueError(
            "--against-live needs --policy RUN: a trained run whose adapter is the policy (against the "
            "reference itself every KL is 0)"
        )
    from ..data import tokenize_dataset
    from ..eval.runs import load_run, run_config
    from ..refcache import run_fingerprint
    from ..refcache.accuracy import cache_accuracy, format_accuracy

    if not run_config(policy).get("train_file"):  # before the model loads
        raise ValueError(
            f"--policy {policy}: its configuration names no train_file (a run trained from the Python API with "
            "rows in memory), so the examples the cache was made from cannot be read back"
        )
    model, tok, _, cfg = load_run(policy)
    examples, _ = tokenize_dataset(
        cfg["train_file"],
        tok,
        max_length=int(cfg["max_length"]),
        max_prompt_length=int(cfg["max_prompt_length"]),
        strict=bool(cfg.get("strict_data", False)),
    )
    cache.check_run(
        run_fingerprint(
            model,
            tok,
            {"train": examples},
            model_name=cfg["model_name_or_path"],
            max_length=int(cfg["max_length"]),
            max_prompt_length=int(cfg["max_prompt_length"]),
        )
    )
    acc = cache_accuracy(model, tok, cache, examples, batches=against_live, batch_size=batch_size)
    print(format_accuracy(acc), flush=True)
    error = acc["sequence_kl"]["mean_rel_error"]
    if max_kl_error is not None and not error <= max_kl_error:  # a NaN error fails too
        raise CacheError(
            f"{cache_dir}: the per-sequence KL is off by {error:.2%} on average against the live reference "
            f"(--max-kl-error {max_kl_error:.2%}); precompute with more --top-k / --tail-samples, or "
            "--store hidden for the exact KL"
        )
    return {"totals": totals, "accuracy": acc}


def add_parser(sub) -> None:
    p = sub.add_parser("verify-ref", help=HELP, description=__doc__)
    p.add_argument("dir", help="the cache directory")
    p.add_argument(
        "--against-live",
        type=int,
        default=0,
        metavar="N",
        help="also run N batches of the cache's train split through a trained policy (--policy) with "
        "the cache and with the live reference, and report the cache's KL errors",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="a training run folder (its adapter is the policy, its config "
        "names the model and data the cache was made for)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="pairs per batch for --against-live")
    p.add_argument(
        "--max-kl-error",
        type=float,
        default=None,
        metavar="FRACTION",
        help="with --against-live: exit with an error when the per-sequence KL's mean relative error "
        "exceeds FRACTION (0.1 = 10%%), for scripts that gate training on the cache",
    )


def run(args, rest: List[str]) -> None:
    verify_ref(args.dir, args.against_live, args.policy, args.batch_size, args.max_kl_error)
