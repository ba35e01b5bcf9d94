"""Offline reference cache on SmolLM2-135M-Instruct (4-bit, CPU) over real preference pairs.

    python bench/bench_ref_cache.py            # writes bench/results/ref_cache_smollm2.{json,md}

1. Accuracy and storage per (k, m): k reference top-k ids and m tail samples per token, for
   k in {16, 32, 64, 128, 256} and m in {0, 4, 16}, precomputed over the first ``--error-pairs``
   pairs. The policy is trained by online TDPO2 until it is a few nats of sequence KL away from the
   reference. Then every cache goes through ``refcache.accuracy.caches_accuracy`` against the live
   reference (the loss errors for the default cache only): per-token KL error, per-sequence relative KL error, chosen-minus-rejected KL error,
   TDPO2 and SparsePO loss errors.
2. Precompute throughput at the default (k = 16, m = 64) against a plain no-grad forward of the
   same model over the same batches, in the same run.
3. Training step time (forward + backward, gradient checkpointing, batch of 4 pairs) with the
   default cache against the online reference, alternating the two, median of several steps.
4. Training outcome: TDPO2 on the sentiment recipe (``--outcome-steps`` steps, beta 0.8, seed 0)
   with the default cache (``sparsepo-lite precompute-ref``) and with the live reference, each then
   evaluated on the 58 held-out prompts x 2 paired samples (reward gain and KL).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time

from _common import HERE, ROOT, SENTIMENT_CONFIG, cli, command_line, machine_info, sentiment_run, write_markdown


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "examples", "data", "sentiment_pairs.train.jsonl"))
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--ms", type=int, nargs="+", default=[0, 4, 16])
    ap.add_argument(
        "--extra",
        nargs="*",
        default=["16:64", "32:48"],
        help="more (k, m) cells as K:M, beside the grid (equal-storage alternatives to the default)",
    )
    ap.add_argument("--error-pairs", type=int, default=48, help="pairs for the accuracy part")
    ap.add_argument("--train-steps", type=int, default=24, help="online TDPO2 steps that move the policy")
    ap.add_argument("--timing-steps", type=int, default=6)
    ap.add_argument("--outcome-steps", type=int, default=32)
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "ref_cache"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ref_cache_smollm2"))
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["measure", "outcome"],
        choices=["measure", "outcome"],
        help="measure: parts 1-3 in this process; outcome: part 4 (its own processes). Each part "
        "updates --out.json, so two invocations can share the cores",
    )
    ap.add_argument("--work", default=None, help="folder for the caches of parts 1-3; ones already there are reused")
    a = ap.parse_args()
    result = {}
    if os.path.isfile(a.out + ".json"):  # the other part's numbers, from an earlier or concurrent invocation
        with open(a.out + ".json") as f:
            result = json.load(f)
    if "outcome" in a.parts and "measure" not in a.parts:
        result["outcome"] = outcome(a)
        result["outcome_command"] = command_line()
        return finish(a, result)

    import torch
    import transformers

    from sparsepo_lite.data import PreferenceCollator, tokenize_dataset
    from sparsepo_lite.masks import SparsePOMasks
    from sparsepo_lite.models import SMOLLM2, ModelConfig, load_policy
    from sparsepo_lite.objective import LossConfig, compute_loss
    from sparsepo_lite.refcache import (
        DEFAULT_TAIL_SAMPLES,
        DEFAULT_TOP_K,
        CachedExample,
        CachedReferenceCollator,
        CacheError,
        RefCache,
        read_manifest,
        run_fingerprint,
        verify_cache,
    )
    from sparsepo_lite.refcache.accuracy import caches_accuracy
    from sparsepo_lite.refcache.format import token_bytes
    from sparsepo_lite.refcache.writer import precompute_reference

    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(SMOLLM2, lora_r=8, gradient_checkpointing=True))
    examples, report = tokenize_dataset(a.data, tok, max_length=128, max_prompt_length=64)
    pairs = examples[: a.error_pairs]
    n_all = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    n_err = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in pairs)
    print(
        f"{len(examples)} pairs, {n_all} response tokens; accuracy on {len(pairs)} pairs ({n_err} tokens)", flush=True
    )
    fp = run_fingerprint(model, tok, {"train": pairs}, model_name=SMOLLM2, max_length=128, max_prompt_length=64)
    pad = tok.pad_token_id
    collate = PreferenceCollator(pad)
    work = a.work or tempfile.mkdtemp(prefix="bench_ref_cache_")
    if not a.work:  # a folder of our own making: nobody can reuse it, whatever way the run ends
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    result.update(
        {
            "command": command_line(),
            "machine": machine_info("cpu"),
            "pairs": len(examples),
            "response_tokens": n_all,
            "error_pairs": len(pairs),
            "default": {"top_k": DEFAULT_TOP_K, "tail_samples": DEFAULT_TAIL_SAMPLES},
        }
    )

    def cache(out, split_examples, fingerprint, **kw):
        if os.path.isfile(os.path.join(out, "manifest.json")):
            try:
                verify_cache(out)
                return read_manifest(out)
            except CacheError:
                pass
        return precompute_reference(
            model, tok, {"train": split_examples}, out, fingerprint=fingerprint, batch_size=8, progress=False, **kw
        )

    # 2: precompute throughput at the default against a plain forward, over all pairs
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        for i in range(0, len(examples), 8):
            b = collate(examples[i : i + 8])
            model.base_model.model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    t_forward = time.perf_counter() - t0
    full_fp = run_fingerprint(model, tok, {"train": examples}, model_name=SMOLLM2, max_length=128, max_prompt_length=64)
    t0 = time.perf_counter()
    if os.path.isdir(os.path.join(work, "default_all")):  # timed: never reused
        shutil.rmtree(os.path.join(work, "default_all"))
    precompute_reference(
        model,
        tok,
        {"train": examples},
        os.path.join(work, "default_all"),
        fingerprint=full_fp,
        batch_size=8,
        progress=False,
    )
    t_pre = time.perf_counter() - t0
    default_cache = RefCache(os.path.join(work, "default_all"))
    result["throughput"] = {
        "plain_forward_tokens_per_s": n_all / t_forward,
        "precompute_tokens_per_s": n_all / t_pre,
        "precompute_over_forward": t_forward / t_pre,
    }
    print(f"precompute {n_all / t_pre:.0f} tok/s, plain forward {n_all / t_forward:.0f} tok/s", flush=True)

    # 1: caches per (k, m) over the accuracy pairs
    caches, storage = {}, {}
    cells = [(k, m) for k in a.ks for m in a.ms]
    cells += [tuple(int(x) for x in e.split(":")) for e in a.extra if tuple(int(x) for x in e.split(":")) not in cells]
    for k, m in cells:
        out = os.path.join(work, f"k{k}_m{m}")
        man = cache(out, pairs, fp, top_k=k, tail_samples=m)
        size = sum(s["bytes"] for s in man["splits"]["train"]["shards"])
        caches[(k, m)] = RefCache(out)
        storage[(k, m)] = {
            "bytes_per_token": size / verify_cache(out)["tokens"],  # a reused cache may hold more pairs
            "payload_bytes_per_token": token_bytes(man["contents"]),
        }
    man = cache(os.path.join(work, "hidden"), pairs, fp, top_k=0, store_hidden=True)
    hidden_bytes = (
        sum(s["bytes"] for s in man["splits"]["train"]["shards"]) / verify_cache(os.path.join(work, "hidden"))["tokens"]
    )

    # a policy that has moved away from the reference
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    train_cfg = LossConfig(loss_type="tdpo2", beta=0.1)
    for step in range(a.train_steps):
        i = (4 * step) % len(examples)
        loss, metrics = compute_loss(model, collate(examples[i : i + 4]), train_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    masks = SparsePOMasks.for_model(model)
    losses = {
        "tdpo2": LossConfig(loss_type="tdpo2", beta=0.1),
        "sparsepo": LossConfig(loss_type="sparsepo", beta=0.1, masks=masks),
    }
    # the live reference once per batch for every cache; loss errors for the default cache
    default = (DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES)
    named = caches_accuracy(
        model,
        tok,
        {f"{k}/{m}": c for (k, m), c in caches.items()},
        pairs,
        batches=(len(pairs) + 3) // 4,
        batch_size=4,
        losses={f"{k}/{m}": losses for (k, m) in caches if (k, m) == default},
    )
    accuracy = {}
    for k, m in caches:
        acc = accuracy[(k, m)] = named[f"{k}/{m}"]
        print(
            f"k={k} m={m}: {storage[(k, m)]['bytes_per_token']:.0f} B/token, sequence KL error "
            f"{acc['sequence_kl']['mean_rel_error']:.2%} (bias {acc['sequence_kl']['mean_signed_rel_error']:+.2%}), "
            f"margin error {acc['margin']['rel_error']:.2%}",
            flush=True,
        )
    result["mean_sequence_kl"] = next(iter(accuracy.values()))["sequence_kl"]["mean_kl"]
    result["grid"] = [{"top_k": k, "tail_samples": m, **storage[(k, m)], **accuracy[(k, m)]} for (k, m) in caches]
    result["hidden_bytes_per_token"] = hidden_bytes

    # 3: step time with the default cache against online, alternating
    model.train()
    batches = [examples[i : i + 4] for i in range(0, 4 * (a.timing_steps + 1), 4)]
    timing = {}
    for name, cfg in {"dpo": LossConfig(loss_type="dpo"), **losses}.items():
        times = {"online": [], "cached": []}
        for i, part in enumerate(batches):
            for mode in ("online", "cached"):
                b = (
                    collate(part)
                    if mode == "online"
                    else CachedReferenceCollator(pad, default_cache)([CachedExample(e, "train") for e in part])
                )
                t0 = time.perf_counter()
                loss, _ = compute_loss(model, b, cfg)
                loss.backward()
                dt = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                masks.zero_grad(set_to_none=True)
                if i:  # the first batch warms up
                    times[mode].append(dt)
        on, ca = statistics.median(times["online"]), statistics.median(times["cached"])
        timing[name] = {"online_s": on, "cached_s": ca, "cached_over_online": ca / on}
        print(f"{name}: step online {on:.3f} s, cached {ca:.3f} s, ratio {ca / on:.2f}", flush=True)
    result["step_time"] = timing
    if not a.work:  # free the disk before the outcome part
        shutil.rmtree(work, ignore_errors=True)
    model = opt = None  # free them before the outcome runs (not del: the closure above names model)
    if "outcome" in a.parts:
        result["outcome"] = outcome(a)
    finish(a, result)


def outcome(a):
    """Part 4: the training outcome, cached against online (each run its own process, through the CLI)."""
    from sparsepo_lite.refcache import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K

    cache_dir = os.path.join(a.runs, f"cache_k{DEFAULT_TOP_K}_m{DEFAULT_TAIL_SAMPLES}")
    if (
        not os.path.isfile(os.path.join(cache_dir, "manifest.json"))
        or sum(1 for f in os.listdir(cache_dir) if f.endswith(".safetensors")) == 0
    ):
        cli("precompute-ref", SENTIMENT_CONFIG, "--out", cache_dir)
    outcome = {}
    for mode, extra in (("online", []), ("cached", ["--ref_cache", cache_dir])):
        run = os.path.join(a.runs, f"tdpo2_{mode}" + (f"_k{DEFAULT_TOP_K}_m{DEFAULT_TAIL_SAMPLES}" if extra else ""))
        outcome[mode] = sentiment_run(
            run, ["--loss_type", "tdpo2", "--max_steps", str(a.outcome_steps), "--seed", "0", *extra], lift_pairs=None
        )
        o = outcome[mode]
        print(f"{mode}: gain {o['reward_gain']:+.3f} +- {o['reward_gain_se']:.3f}, KL {o['kl']:.3f}", flush=True)
    return outcome


def finish(a, result):
    """Write --out.json with every part measured so far; the Markdown once all parts are in."""
    if os.path.isfile(a.out + ".json"):  # a part that finished meanwhile in another invocation
        with open(a.out + ".json") as f:
            result = {**json.load(f), **result}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if all(k in result for k in ("grid", "throughput", "step_time", "outcome")):
        write_markdown(a.out + ".md", markdown(a, result, result["hidden_bytes_per_token"]))
        print(f"wrote {a.out}.json, {a.out}.md")
    else:
        print(f"wrote {a.out}.json (the Markdown follows once every part is in)")


def _loss_cell(g, name):
    return f"{g['losses'][name]:.2e}" if name in g["losses"] else "-"


def markdown(a, result, hidden_bytes):
    m = result["machine"]
    md = [
        f"# Reference cache on SmolLM2-135M-Instruct (4-bit NF4, CPU), {result['pairs']} real pairs",
        "",
        f"Command: `{result['command']}`"
        + (f"; the training outcome: `{result['outcome_command']}`" if result.get("outcome_command") else ""),
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cpu_cores']} cores, torch {m['torch']}, transformers "
        f"{m.get('transformers')}, peft {m.get('peft')}, bitsandbytes {m.get('bitsandbytes')}.",
        "",
        "## KL accuracy and storage per (k, m)",
        "",
        f"Policy: {a.train_steps} online TDPO2 steps from the reference (mean sequence KL "
        f"{result['mean_sequence_kl']:.2f} nats over {result['error_pairs']} pairs). Errors against the live "
        "reference (docs/reference-cache.md): sequence KL = mean over responses of |error| / KL (bias: sum of "
        "signed errors / sum of KL); chosen - rejected = mean |error| of the pair's KL difference / mean |difference|; "
        "losses: mean |error| / |loss|.",
        "",
        "| k | m | bytes / token (payload) | sequence KL error | bias | worst sequence | chosen - rejected error | "
        "token KL mean abs error | TDPO2 loss error | SparsePO loss error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result["grid"]:
        s = g["sequence_kl"]
        md.append(
            f"| {g['top_k']} | {g['tail_samples']} | {g['bytes_per_token']:.1f} ({g['payload_bytes_per_token']}) | "
            f"{s['mean_rel_error']:.2%} | {s['mean_signed_rel_error']:+.2%} | {s['worst_rel_error']:.1%} | "
            f"{g['margin']['rel_error']:.2%} | {g['token_kl']['mean_abs_error']:.4f} | "
            f"{_loss_cell(g, 'tdpo2')} | {_loss_cell(g, 'sparsepo')} |"
        )
    md.append(f"| hidden (exact) | - | {hidden_bytes:.1f} | 0 | 0 | 0 | 0 | 0 | 0 | 0 |")
    t = result["throughput"]
    md += [
        "",
        f"## Precompute throughput (default k = {result['default']['top_k']}, m = "
        f"{result['default']['tail_samples']}, all {result['response_tokens']} tokens)",
        "",
        "| pass | tokens/s |",
        "|---|---|",
        f"| plain no-grad forward | {t['plain_forward_tokens_per_s']:.0f} |",
        f"| precompute (forward + top-k + tail draws + write) | {t['precompute_tokens_per_s']:.0f} |",
        "",
        f"Precompute / forward throughput: {t['precompute_over_forward']:.2f}x.",
        "",
        "## Training step time (batch 4 pairs, forward + backward, default cache)",
        "",
        "| loss | online s | cached s | cached / online |",
        "|---|---|---|---|",
    ]
    for name, tm in result["step_time"].items():
        md.append(f"| {name} | {tm['online_s']:.3f} | {tm['cached_s']:.3f} | {tm['cached_over_online']:.2f} |")
    o = result["outcome"]
    md += [
        "",
        f"## Training outcome: TDPO2, {a.outcome_steps} steps, seed 0, sentiment recipe",
        "",
        "| reference | train loss | reward gain (+- SE) | KL, nats (+- SE) | win rate |",
        "|---|---|---|---|---|",
    ]
    for mode in ("online", "cached"):
        r = o[mode]
        md.append(
            f"| {mode} | {r['train_loss']:.4f} | {r['reward_gain']:+.3f} +- {r['reward_gain_se']:.3f} | "
            f"{r['kl']:.3f} +- {r.get('kl_se', float('nan')):.3f} | {r['win_rate']:.3f} |"
        )
    return md


if __name__ == "__main__":
    main()
