"""``sparsepo-lite precompute-ref CONFIG.yaml --out DIR``: run the reference of a training config once
over its train (and eval) data into a cache that training reads with ``ref_cache: DIR``."""

from __future__ import annotations

from typing import List, Optional

from ..refcache.format import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K

HELP = "run the reference once over the config's data into a cache"


def precompute_ref(
    config_path: str,
    out: str,
    top_k: int,
    store: Optional[str],
    topk_dtype: str,
    batch_size: int,
    shard_size: int,
    overrides: List[str],
    tail_samples: Optional[int] = None,
    tail_seed: int = 0,
) -> dict:
    """Read and check the config's data, load its model as training does, and write the cache."""
    import torch

    from ..models import check_tokenizer, load_tokenizer
    from ..refcache import run_fingerprint
    from ..refcache.writer import check_out_dir, check_settings, precompute_reference
    from ..training.trainer import check_lengths, load_model, read_splits
    from .train import parse_train_config

    # the flags first: seconds, not after the data and the model load
    check_settings(
        dict(top_k=top_k, tail_samples=tail_samples, tail_seed=tail_seed, batch_size=batch_size, shard_size=shard_size),
        label=lambda name: "--" + name.replace("_", "-"),
    )
    data_args, model_args, args, _ = parse_train_config(config_path, overrides)
    check_out_dir(out)  # a folder that is not ours fails now, not after the data and the model load
    tok = load_tokenizer(model_args.model_name_or_path)
    files = {split: path for split, path in (("train", data_args.train_file), ("eval", data_args.eval_file)) if path}
    splits, reports = read_splits(tok, args, files)  # before the model loads
    for split, report in reports.items():
        print(f"{split} data: {report.summary()}", flush=True)
    model = load_model(model_args, args)
    check_tokenizer(model, tok, model_args.model_name_or_path)
    check_lengths(model.config, splits, model_args.model_name_or_path)
    fp = run_fingerprint(
        model,
        tok,
        splits,
        model_name=model_args.model_name_or_path,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    # Only MaPO needs more than the reference's distribution: its activation masks.
    manifest = precompute_reference(
        model,
        tok,
        splits,
        out,
        fingerprint=fp,
        mapo_mapping=args.mapo_mapping if args.loss_type == "mapo" else None,
        top_k=top_k,
        tail_samples=tail_samples,
        tail_seed=tail_seed,
        topk_dtype=getattr(torch, topk_dtype),
        store_hidden=store == "hidden",
        batch_size=batch_size,
        shard_size=shard_size,
        cpu_load_guard=args.cpu_load_guard,
    )
    tokens = sum(s["tokens"] for info in manifest["splits"].values() for s in info["shards"])
    size = sum(s["bytes"] for info in manifest["splits"].values() for s in info["shards"])
    print(
        f"reference cache in {out}: {tokens} response tokens, {size / 2**20:.1f} MiB "
        f"({size / max(tokens, 1):.1f} bytes/token); train with ref_cache: {out}",
        flush=True,
    )
    return manifest


def add_parser(sub) -> None:
    p = sub.add_parser("precompute-ref", help=HELP, description=__doc__)
    p.add_argument("config", help="the training YAML (model, data, max lengths); --field value overrides a key")
    p.add_argument(
        "--out",
        required=True,
        help="cache directory: new, empty, or an existing cache of this package (resumed)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"reference top-k per token for the KL (0: labels only; default {DEFAULT_TOP_K})",
    )
    p.add_argument(
        "--tail-samples",
        type=int,
        default=None,
        help=f"tokens drawn per response token from the reference outside its top-k: they make the "
        f"cached KL unbiased (default {DEFAULT_TAIL_SAMPLES} with a top-k; 0: the top-k bucket only)",
    )
    p.add_argument("--tail-seed", type=int, default=0, help="seed of the tail draws (joins the fingerprint)")
    p.add_argument("--store", choices=["hidden"], default=None, help="also store final hidden states (exact KL)")
    p.add_argument(
        "--topk-dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="dtype of the stored log-probs (default float16)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="pairs per reference forward")
    p.add_argument("--shard-size", type=int, default=256, help="pairs per shard file")


def run(args, rest: List[str]) -> None:
    precompute_ref(
        args.config,
        args.out,
        args.top_k,
        args.store,
        args.topk_dtype,
        args.batch_size,
        args.shard_size,
        rest,
        tail_samples=args.tail_samples,
        tail_seed=args.tail_seed,
    )
