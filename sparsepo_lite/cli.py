"""``sparsepo-lite``: the command line.

    sparsepo-lite train CONFIG.yaml [--field value ...]
    sparsepo-lite precompute-ref CONFIG.yaml --out DIR [--top-k K] [--store hidden] [--field value ...]
    sparsepo-lite verify-ref DIR
    sparsepo-lite eval-sentiment RUN_DIR --data EVAL.jsonl       (sentiment quickstart report)
    sparsepo-lite inspect-masks RUN_DIR --data FILE [--out masks.html]
    sparsepo-lite plan --model NAME_OR_CONFIG [--seq-len T] [--gpu-mem 24GB] [--loss sparsepo] [--reference online]

The YAML keys are the fields of DataConfig (train_file, eval_file) and SparsePOConfig (the model:
model_name_or_path, quantization, dtype, lora_*; the loss: loss_type, beta, ...; and every
transformers.TrainingArguments field: learning_rate, output_dir, ...). ``--field value`` overrides
a key. Several processes: ``accelerate launch --multi_gpu --num_processes N -m sparsepo_lite.cli train ...``
(on the CPU with ``use_cpu: true``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

from .errors import TrainingError
from .ref_cache import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K


@dataclass
class DataConfig:
    """Where the preference pairs are (.jsonl / .json / .parquet, TRL formats)."""

    train_file: str = ""
    eval_file: Optional[str] = None


def _to_argv(values: dict) -> List[str]:
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and not value:
            if key != "report_to":  # argparse cannot take an empty list; report_to has a word for it
                raise SystemExit(f"config key {key!r}: an empty list is not a valid value")
            value = "none"
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def parse_train_config(config_path: str, overrides: List[str]):
    """(DataConfig, SparsePOConfig, resolved dict) from a YAML file plus ``--field value`` overrides.

    The resolved dict is what the run folder records (``sparsepo_config.yaml``): the data fields,
    every field of SparsePOConfig's own and the TrainingArguments fields the YAML or the command line
    set, all with their final values. Reading it back as a config gives the same run.
    """
    import yaml
    from transformers import HfArgumentParser

    from .trainer import SparsePOConfig

    if not os.path.isfile(config_path):
        raise SystemExit(f"config file not found: {config_path}")
    try:
        with open(config_path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{config_path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"{config_path}: expected a mapping of config keys, got {type(values).__name__}")
    parser = HfArgumentParser((DataConfig, SparsePOConfig))
    known = {f.name for dc in (DataConfig, SparsePOConfig) for f in dataclasses.fields(dc)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise SystemExit(f"{config_path}: unknown config key(s) {unknown}; see `sparsepo-lite train --help`")
    try:
        data_args, train_args = parser.parse_args_into_dataclasses(args=_to_argv(values) + overrides)
    except ValueError as exc:
        raise SystemExit(f"{config_path}: {exc}") from None
    if not train_args.model_name_or_path:
        raise SystemExit(f"{config_path}: model_name_or_path is required")
    if not data_args.train_file:
        raise SystemExit(f"{config_path}: train_file is required")
    given = set(values) | {_field_of(arg, known) for arg in overrides if arg.startswith("--")}
    resolved = {**dataclasses.asdict(data_args), **train_args.run_config(given & known)}
    return data_args, train_args, resolved


def _field_of(arg: str, known) -> str:
    """The config field a command-line flag sets: ``--lora_r``, ``--lora_r=8``, ``--no_verify_ref_cache``."""
    name = arg[2:].split("=", 1)[0]
    return name[3:] if name.startswith("no_") and name not in known and name[3:] in known else name


def train(config_path: str, overrides: List[str]) -> str:
    """Run training from a YAML config; returns the output directory.

    The run folder gets its resolved configuration before step 0, and the adapter (and mask net)
    before the final evaluation, so a failing evaluation loses no training.
    """
    from .trainer import SparsePOTrainer

    data_args, args, resolved = parse_train_config(config_path, overrides)
    # `--eval_file ""` turns off the config's evaluation split
    trainer = SparsePOTrainer(args=args, train_dataset=data_args.train_file, eval_dataset=data_args.eval_file or None,
                              run_config=resolved)
    tok = trainer.processing_class
    main_process = trainer.is_world_process_zero()
    for split, report in trainer.data_reports.items():
        if main_process:
            print(f"{split} data: {report.summary()}", flush=True)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # writes on the main process only
    if main_process:
        tok.save_pretrained(args.output_dir)
    metrics = dict(result.metrics)
    if data_args.eval_file:
        metrics.update(trainer.evaluate())
    if not main_process:
        return args.output_dir
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump({"final": metrics, "log_history": trainer.state.log_history}, f, indent=1)
    print(f"saved adapter, mask network, config and metrics to {args.output_dir}", flush=True)
    return args.output_dir


def precompute_ref(config_path: str, out: str, top_k: int, store: Optional[str], topk_dtype: str, batch_size: int,
                   shard_size: int, overrides: List[str], tail_samples: Optional[int] = None, tail_seed: int = 0) -> dict:
    """Run the reference of a training config over its train (and eval) data into a cache at ``out``."""
    import torch
    from transformers import set_seed

    from .data import tokenize_dataset
    from .modeling import load_policy, load_tokenizer
    from .objective import LossConfig
    from .precompute import precompute_reference
    from .ref_cache import run_fingerprint

    data_args, args, _ = parse_train_config(config_path, overrides)
    tok = load_tokenizer(args.model_name_or_path)
    splits = {}
    for split, path in (("train", data_args.train_file), ("eval", data_args.eval_file)):
        if path:  # read and checked before the model loads
            examples, report = tokenize_dataset(path, tok, max_length=args.max_length,
                                                max_prompt_length=args.max_prompt_length, strict=args.strict_data)
            print(f"{split} data: {report.summary()}", flush=True)
            splits[split] = examples
    set_seed(args.seed)
    model, _ = load_policy(args.model_config(), tokenizer=False)
    fp = run_fingerprint(model, tok, splits, model_name=args.model_name_or_path, max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length)
    # Only MaPO needs more than the reference's distribution: its activation masks.
    config = LossConfig(loss_type="mapo" if args.loss_type == "mapo" else "dpo", mapo_mapping=args.mapo_mapping)
    manifest = precompute_reference(model, tok, splits, out, fingerprint=fp, config=config, top_k=top_k,
                                    tail_samples=tail_samples, tail_seed=tail_seed,
                                    topk_dtype=getattr(torch, topk_dtype), store_hidden=store == "hidden",
                                    batch_size=batch_size, shard_size=shard_size)
    tokens = sum(s["tokens"] for info in manifest["splits"].values() for s in info["shards"])
    size = sum(s["bytes"] for info in manifest["splits"].values() for s in info["shards"])
    print(f"reference cache in {out}: {tokens} response tokens, {size / 2**20:.1f} MiB "
          f"({size / max(tokens, 1):.1f} bytes/token); train with ref_cache: {out}", flush=True)
    return manifest


def verify_ref(cache_dir: str, against_live: int = 0, policy: Optional[str] = None, batch_size: int = 4) -> dict:
    """Check every shard of a cache; with ``against_live`` batches and a trained ``policy`` run, also
    measure the cache's KL against the live reference on the cache's train split."""
    from .ref_cache import RefCache, storage_per_token, verify_cache

    totals = verify_cache(cache_dir)
    cache = RefCache(cache_dir)
    per_token, formula = storage_per_token(cache, totals)
    print(f"{cache_dir}: OK ({totals['shards']} shards, {totals['examples']} pairs, {totals['tokens']} tokens, "
          f"{totals['bytes']} bytes: {per_token:.1f} bytes per response token, {formula})")
    if not against_live:
        return {"totals": totals}
    if policy is None:
        raise ValueError("--against-live needs --policy RUN: a trained run whose adapter is the policy (against the "
                         "reference itself every KL is 0)")
    from .data import tokenize_dataset
    from .ref_accuracy import cache_accuracy, format_accuracy
    from .ref_cache import run_fingerprint
    from .runs import load_run

    model, tok, _, cfg = load_run(policy)
    examples, _ = tokenize_dataset(cfg["train_file"], tok, max_length=int(cfg["max_length"]),
                                   max_prompt_length=int(cfg["max_prompt_length"]),
                                   strict=bool(cfg.get("strict_data", False)))
    cache.check_run(run_fingerprint(model, tok, {"train": examples}, model_name=cfg["model_name_or_path"],
                                    max_length=int(cfg["max_length"]), max_prompt_length=int(cfg["max_prompt_length"])))
    acc = cache_accuracy(model, tok, cache, examples, batches=against_live, batch_size=batch_size)
    print(format_accuracy(acc), flush=True)
    return {"totals": totals, "accuracy": acc}


def eval_sentiment(run_dir: str, data: str, prompts: int, samples: int, max_new_tokens: int, seed: int) -> dict:
    """Sample held-out prompts from the run's policy and its reference; VADER reward, win rate, KL."""
    from .data import read_rows
    from .report import sentiment_report_html
    from .runs import load_run
    from .sentiment import evaluate_sentiment

    model, tok, _, cfg = load_run(run_dir)
    rows = read_rows(data)
    texts = [r["prompt"] for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str)][:prompts]
    if not texts:
        raise SystemExit(f"{data}: no rows with a string 'prompt'")
    print(f"evaluating {len(texts)} held-out prompts x {samples} samples (policy and reference)", flush=True)
    ev = evaluate_sentiment(model, tok, texts, samples_per_prompt=samples, max_new_tokens=max_new_tokens, seed=seed,
                            progress=lambda done, total: print(f"  sampled {done}/{total} prompts", flush=True))
    summary = ev.summary()
    meta = {"run": run_dir, "data": data, "prompts": len(texts), "samples per prompt": samples,
            "max new tokens": max_new_tokens, "loss_type": cfg.get("loss_type"), "beta": cfg.get("beta")}
    with open(os.path.join(run_dir, "sentiment_eval.json"), "w") as f:
        json.dump({"summary": summary, "meta": meta, "samples": ev.samples}, f, indent=1)
    page = os.path.join(run_dir, "sentiment_report.html")
    with open(page, "w") as f:
        f.write(sentiment_report_html(summary, ev.samples, meta))
    print(f"{'':<12}{'reference':>12}{'policy':>12}")
    print(f"{'VADER':<12}{summary['reward_reference']:>12.3f}{summary['reward_policy']:>12.3f}")
    print(f"{'(SE)':<12}{summary['reward_reference_se']:>12.3f}{summary['reward_policy_se']:>12.3f}")
    print(f"reward gain {summary['reward_gain']:+.3f} +- {summary['reward_gain_se']:.3f} (paired SE)")
    print(f"win rate {summary['win_rate']:.3f}, KL(policy || reference) {summary['kl']:.3f} nats per continuation")
    print(f"report: {page}", flush=True)
    return summary


def inspect_masks(run_dir: str, data: str, pairs: int, out: Optional[str]) -> str:
    """Write the HTML mask viewer of a SparsePO run over the first ``pairs`` rows of ``data``."""
    from .data import tokenize_dataset
    from .report import mask_lift, mask_pairs, mask_viewer_html
    from .runs import load_run
    from .sentiment import Sentiment

    model, tok, masks, cfg = load_run(run_dir)
    if masks is None:
        raise SystemExit(f"{run_dir}: no mask network (mask_net.safetensors); inspect-masks needs a SparsePO run")
    examples, report = tokenize_dataset(data, tok, max_length=int(cfg.get("max_length", 512)),
                                        max_prompt_length=int(cfg.get("max_prompt_length", 256)))
    try:
        sentiment = Sentiment()
    except ImportError:
        sentiment = None
    items = mask_pairs(model, tok, masks, examples[:pairs], beta=float(cfg.get("beta", 0.1)),
                       mask_normalize=bool(cfg.get("mask_normalize", False)), sentiment=sentiment)
    lift = mask_lift(items) if sentiment else {}
    meta = {"run": run_dir, "data": data, "pairs": len(items)}
    if lift:
        meta.update({f"lift ({side})": f"{v['lift']:.3f}x, 95% CI [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                     for side, v in (("all", lift), ("chosen", lift["chosen"]), ("rejected", lift["rejected"]))})
        meta["sentiment words"] = Sentiment.LEXICON_RULE
    out = out or os.path.join(run_dir, "masks.html")
    with open(out, "w") as f:
        f.write(mask_viewer_html(items, meta))
    if lift:
        with open(os.path.join(os.path.dirname(os.path.abspath(out)), "mask_lift.json"), "w") as f:
            json.dump(lift, f, indent=1)
        print(f"reward mask on VADER words {lift['mask_mean_sentiment']:.4f} vs other tokens "
              f"{lift['mask_mean_other']:.4f}: lift {lift['lift']:.2f}x (95% CI {lift['ci95'][0]:.2f}-"
              f"{lift['ci95'][1]:.2f}; chosen {lift['chosen']['lift']:.2f}x, rejected {lift['rejected']['lift']:.2f}x)",
              flush=True)
    print(f"mask viewer: {out} ({len(items)} pairs)", flush=True)
    return out


def plan(args) -> None:
    """Print the memory plan of one training step and the largest T that fits the budget."""
    from .memory_plan import GiB, load_shape, max_seq_len, parse_bytes, plan_memory

    try:
        shape = load_shape(args.model)
        budget = parse_bytes(args.gpu_mem)
        kw = dict(loss=args.loss, reference=args.reference, top_k=args.top_k, tail_samples=args.tail_samples,
                  pairs=args.pairs, lora_r=args.lora_r, dtype=args.dtype, independent_masks=args.independent_masks)
        best = max_seq_len(shape, budget, prompt_frac=args.prompt_frac, **kw)
        t = args.seq_len or best
        result = plan_memory(shape, t, prompt_len=int(t * args.prompt_frac), **kw) if t else None
    except ValueError as exc:
        raise SystemExit(f"plan: {exc}") from None
    if args.json:
        print(json.dumps({"plan": result.to_dict() if result else None, "budget": budget, "max_seq_len": best,
                          "fits": bool(result and result.fits(budget))}, indent=1))
        return
    if result is None:
        print(f"{shape.name}: nothing fits in {budget / GiB:.1f} GiB, not even T = 256")
        return
    print(result.table())
    verdict = "fits" if result.fits(budget) else "does NOT fit"
    print(f"\nbudget {budget / GiB:.1f} GiB (1.0 GiB kept for the CUDA context and allocator): T = {t} {verdict}; "
          f"largest T that fits: {best}; chunk_size: {result.chunk_size}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsepo-lite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune with a YAML config")
    p_train.add_argument("config", help="YAML file whose keys are the config fields")
    p_pre = sub.add_parser("precompute-ref", help="run the reference once over the config's data into a cache")
    p_pre.add_argument("config", help="the training YAML (model, data, max lengths)")
    p_pre.add_argument("--out", required=True, help="cache directory (an existing one is resumed)")
    p_pre.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                       help=f"reference top-k per token for the KL (0: labels only; default {DEFAULT_TOP_K})")
    p_pre.add_argument("--tail-samples", type=int, default=None,
                       help=f"tokens drawn per response token from the reference outside its top-k: they make the "
                            f"cached KL unbiased (default {DEFAULT_TAIL_SAMPLES} with a top-k; 0: the top-k bucket only)")
    p_pre.add_argument("--tail-seed", type=int, default=0, help="seed of the tail draws (joins the fingerprint)")
    p_pre.add_argument("--store", choices=["hidden"], default=None, help="also store final hidden states (exact KL)")
    p_pre.add_argument("--topk-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p_pre.add_argument("--batch-size", type=int, default=8, help="pairs per reference forward")
    p_pre.add_argument("--shard-size", type=int, default=256, help="pairs per shard file")
    p_ver = sub.add_parser("verify-ref", help="check every shard of a reference cache (and its KL against the live "
                                               "reference)")
    p_ver.add_argument("dir")
    p_ver.add_argument("--against-live", type=int, default=0, metavar="N",
                       help="also run N batches of the cache's train split through a trained policy (--policy) with "
                            "the cache and with the live reference, and report the cache's KL errors")
    p_ver.add_argument("--policy", default=None, help="a training run folder (its adapter is the policy, its config "
                                                       "names the model and data the cache was made for)")
    p_ver.add_argument("--batch-size", type=int, default=4, help="pairs per batch for --against-live")
    p_ev = sub.add_parser("eval-sentiment", help="VADER reward, win rate and KL of a run on held-out prompts")
    p_ev.add_argument("run_dir")
    p_ev.add_argument("--data", required=True, help="rows with a 'prompt' field (e.g. the eval split)")
    p_ev.add_argument("--prompts", type=int, default=64)
    p_ev.add_argument("--samples", type=int, default=2, help="continuations per prompt and model")
    p_ev.add_argument("--max-new-tokens", type=int, default=24)
    p_ev.add_argument("--seed", type=int, default=0)
    p_in = sub.add_parser("inspect-masks", help="HTML page of a SparsePO run's token masks")
    p_in.add_argument("run_dir")
    p_in.add_argument("--data", required=True, help="preference rows (TRL format)")
    p_in.add_argument("--pairs", type=int, default=20)
    p_in.add_argument("--out", default=None, help="default: RUN_DIR/masks.html")
    p_plan = sub.add_parser("plan", help="memory estimate of a training step; the largest sequence length that fits")
    p_plan.add_argument("--model", required=True,
                        help="a shipped config (llama-3-8b, llama-3.1-8b, mistral-7b-v0.3, qwen2.5-7b; hub names "
                             "like meta-llama/Meta-Llama-3-8B-Instruct map to them), a config.json or a model folder")
    p_plan.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the largest that fits)")
    p_plan.add_argument("--gpu-mem", default="24GB", help="memory budget of the card (default 24GB)")
    p_plan.add_argument("--loss", default="sparsepo", choices=["dpo", "tdpo1", "tdpo2", "sparsepo", "mapo"])
    p_plan.add_argument("--reference", default="online", choices=["online", "topk", "hidden", "label"],
                        help="online reference, or a precompute-ref cache (top-k, hidden states, labels only)")
    p_plan.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="top-k of a --reference topk cache")
    p_plan.add_argument("--tail-samples", type=int, default=DEFAULT_TAIL_SAMPLES,
                        help="tail samples per token of a --reference topk cache")
    p_plan.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch")
    p_plan.add_argument("--prompt-frac", type=float, default=0.0,
                        help="share of each sequence that is prompt (default 0: all response, the worst case)")
    p_plan.add_argument("--lora-r", type=int, default=16)
    p_plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p_plan.add_argument("--independent-masks", action="store_true", help="SparsePO with two mask nets")
    p_plan.add_argument("--json", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("train", "precompute-ref") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        _run(args, rest)
    except USER_ERRORS as exc:
        # A one-line message naming the row, field or file; SPARSEPO_LITE_DEBUG=1 keeps the traceback.
        if os.environ.get("SPARSEPO_LITE_DEBUG"):
            raise
        raise SystemExit(f"sparsepo-lite {args.command}: {exc}") from None


def _run(args, rest: List[str]) -> None:
    if args.command == "eval-sentiment":
        eval_sentiment(args.run_dir, args.data, args.prompts, args.samples, args.max_new_tokens, args.seed)
    elif args.command == "inspect-masks":
        inspect_masks(args.run_dir, args.data, args.pairs, args.out)
    elif args.command == "plan":
        plan(args)
    elif args.command == "train":
        train(args.config, rest)
    elif args.command == "precompute-ref":
        precompute_ref(args.config, args.out, args.top_k, args.store, args.topk_dtype, args.batch_size,
                       args.shard_size, rest, tail_samples=args.tail_samples, tail_seed=args.tail_seed)
    elif args.command == "verify-ref":
        verify_ref(args.dir, args.against_live, args.policy, args.batch_size)


#: Errors that describe bad input or a failed run (data rows, configs, caches, files, the run's
#: outcome): reported in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, TrainingError)


if __name__ == "__main__":
    main(sys.argv[1:])
