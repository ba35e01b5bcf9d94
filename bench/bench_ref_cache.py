"""Offline reference cache on SmolLM2-135M-Instruct (4-bit, CPU) over real preference pairs.

    python bench/bench_ref_cache.py            # writes bench/results/ref_cache_smollm2.{json,md}

1. Storage: bytes per response token of the cache for each k (label log-prob + top-k), and with
   hidden states (exact mode).
2. Precompute throughput (tokens/s, top-k 32) next to a plain no-grad forward of the same model
   over the same batches, in the same run.
3. Accuracy of top-k: a policy trained for a few online TDPO2 steps (so it differs from the
   reference), then per pair the sequence KL and the TDPO2 and SparsePO losses from each top-k
   cache, against the exact values (hidden-state cache = online reference, tested equal).
   Relative error of the KL = sum |KL_k - KL| / sum KL over all sequences; of a loss = mean over
   pairs of |loss_k - loss| / |loss|.
4. Training step time (forward + backward, gradient checkpointing, batch of 4 pairs) with the
   k = 32 cache against the online reference, alternating the two, median of several steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "examples", "data", "sentiment_pairs.train.jsonl"))
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--error-pairs", type=int, default=96, help="pairs for the accuracy part")
    ap.add_argument("--train-steps", type=int, default=24)
    ap.add_argument("--timing-steps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ref_cache_smollm2"))
    a = ap.parse_args()

    import torch
    import transformers

    sys.path.insert(0, HERE)
    from bench_token_stats import machine_info
    from sparsepo_lite.data import PreferenceCollator, tokenize_dataset
    from sparsepo_lite.masks import SparsePOMasks
    from sparsepo_lite.modeling import SMOLLM2, ModelConfig, load_policy
    from sparsepo_lite.objective import LossConfig, compute_loss
    from sparsepo_lite.precompute import precompute_reference
    from sparsepo_lite.ref_cache import CachedExample, CachedReferenceCollator, RefCache, run_fingerprint

    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(SMOLLM2, lora_r=8, gradient_checkpointing=True))
    examples, report = tokenize_dataset(a.data, tok, max_length=128, max_prompt_length=64)
    n_tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    print(f"{len(examples)} pairs, {n_tokens} response tokens ({report.summary().splitlines()[0]})", flush=True)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name=SMOLLM2, max_length=128, max_prompt_length=64)
    pad = tok.pad_token_id
    collate = PreferenceCollator(pad)
    work = tempfile.mkdtemp(prefix="bench_ref_cache_")
    result = {"command": command, "machine": machine_info("cpu"), "pairs": len(examples), "response_tokens": n_tokens}

    # 1 + 2: storage per k, precompute throughput against a plain forward
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        for i in range(0, len(examples), 8):
            b = collate(examples[i:i + 8])
            model.base_model.model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    t_forward = time.perf_counter() - t0
    storage, caches = {}, {}
    for k in a.ks + ["hidden"]:
        out = os.path.join(work, f"k{k}")
        t0 = time.perf_counter()
        m = precompute_reference(model, tok, {"train": examples}, out, fingerprint=fp, batch_size=8, progress=False,
                                 **(dict(top_k=0, store_hidden=True) if k == "hidden" else dict(top_k=k)))
        seconds = time.perf_counter() - t0
        size = sum(s["bytes"] for s in m["splits"]["train"]["shards"])
        storage[str(k)] = {"bytes_per_token": size / n_tokens, "bound_8_plus_6k": None if k == "hidden" else 8 + 6 * k,
                           "precompute_s": seconds, "tokens_per_s": n_tokens / seconds}
        caches[k] = RefCache(out)
        print(f"k={k}: {size / n_tokens:.1f} bytes/token, precompute {n_tokens / seconds:.0f} tok/s", flush=True)
    result["storage"] = storage
    result["plain_forward"] = {"seconds": t_forward, "tokens_per_s": n_tokens / t_forward}
    pre32 = storage.get("32", next(iter(storage.values())))
    result["precompute_vs_forward"] = pre32["tokens_per_s"] / result["plain_forward"]["tokens_per_s"]

    # 3: a policy that has moved away from the reference
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    train_cfg = LossConfig(loss_type="tdpo2", beta=0.1)
    for step in range(a.train_steps):
        b = collate(examples[(4 * step) % len(examples):(4 * step) % len(examples) + 4])
        loss, metrics = compute_loss(model, b, train_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"trained {a.train_steps} TDPO2 steps: kl/chosen {metrics['kl/chosen']:.3f}", flush=True)
    model.eval()
    torch.manual_seed(0)
    masks = SparsePOMasks.for_model(model)
    configs = {"tdpo2": LossConfig(loss_type="tdpo2", beta=0.1),
               "sparsepo": LossConfig(loss_type="sparsepo", beta=0.1, masks=masks)}
    pairs = examples[: a.error_pairs]
    vals = {k: {"kl": [], "tdpo2": [], "sparsepo": []} for k in caches}
    with torch.no_grad():
        for e in pairs:
            for k, cache in caches.items():
                b = CachedReferenceCollator(pad, cache)([CachedExample(e, "train")])
                for name, cfg in configs.items():
                    loss, m = compute_loss(model, b, cfg)
                    vals[k][name].append(loss.item())
                    if name == "tdpo2":
                        vals[k]["kl"] += [m["kl/chosen"], m["kl/rejected"]]
    exact = vals["hidden"]
    accuracy = {}
    for k in a.ks:
        v = vals[k]
        accuracy[str(k)] = {
            "kl_rel_error": sum(abs(x - y) for x, y in zip(v["kl"], exact["kl"])) / sum(exact["kl"]),
            "kl_max_seq_rel_error": max(abs(x - y) / max(y, 1e-12) for x, y in zip(v["kl"], exact["kl"])),
            "tdpo2_loss_rel_error": statistics.mean(abs(x - y) / abs(y) for x, y in zip(v["tdpo2"], exact["tdpo2"])),
            "sparsepo_loss_rel_error": statistics.mean(abs(x - y) / abs(y)
                                                       for x, y in zip(v["sparsepo"], exact["sparsepo"])),
        }
        print(f"k={k}: KL rel error {accuracy[str(k)]['kl_rel_error']:.4%}", flush=True)
    result["accuracy"] = accuracy
    result["mean_sequence_kl"] = statistics.mean(exact["kl"])

    # 4: step time, cached (k = 32) against online, alternating
    model.train()
    cache32 = caches[32 if 32 in caches else a.ks[0]]
    batches = [examples[i:i + 4] for i in range(0, 4 * (a.timing_steps + 1), 4)]
    timing = {}
    for name, cfg in {"dpo": LossConfig(loss_type="dpo"), **configs}.items():
        times = {"online": [], "cached": []}
        for i, part in enumerate(batches):
            for mode in ("online", "cached"):
                b = collate(part) if mode == "online" else \
                    CachedReferenceCollator(pad, cache32)([CachedExample(e, "train") for e in part])
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

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = [f"# Reference cache on SmolLM2-135M-Instruct (4-bit NF4, CPU), {len(examples)} real pairs", "",
          f"Command: `{command}`", "", f"Machine: {result['machine'].get('cpu', '?')}, "
          f"{result['machine']['cpu_cores']} cores, torch {result['machine']['torch']}.", "",
          "## Storage and accuracy per k", "",
          f"Policy: {a.train_steps} online TDPO2 steps from the reference (mean sequence KL "
          f"{result['mean_sequence_kl']:.3f} nats over {len(pairs)} pairs). Errors against the exact reference.", "",
          "| k | bytes / response token | bound 8 + 6k | sequence KL rel. error | worst sequence | TDPO2 loss rel. error | SparsePO loss rel. error |",
          "|---|---|---|---|---|---|---|"]
    for k in a.ks:
        s, acc = storage[str(k)], accuracy[str(k)]
        md.append(f"| {k} | {s['bytes_per_token']:.1f} | {s['bound_8_plus_6k']} | {acc['kl_rel_error']:.3%} | "
                  f"{acc['kl_max_seq_rel_error']:.2%} | {acc['tdpo2_loss_rel_error']:.2e} | "
                  f"{acc['sparsepo_loss_rel_error']:.2e} |")
    md.append(f"| hidden (exact) | {storage['hidden']['bytes_per_token']:.1f} | - | 0 | 0 | 0 | 0 |")
    md += ["", "## Precompute throughput", "",
           "| pass | tokens/s |", "|---|---|",
           f"| plain no-grad forward | {result['plain_forward']['tokens_per_s']:.0f} |",
           f"| precompute, k = 32 (forward + top-k + write) | {pre32['tokens_per_s']:.0f} |",
           "", f"Precompute / forward throughput: {result['precompute_vs_forward']:.2f}x.", "",
           "## Training step time (batch 4 pairs, forward + backward)", "",
           "| loss | online s | cached (k = 32) s | cached / online |", "|---|---|---|---|"]
    for name, t in timing.items():
        md.append(f"| {name} | {t['online_s']:.3f} | {t['cached_s']:.3f} | {t['cached_over_online']:.2f} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {a.out}.json, {a.out}.md")


if __name__ == "__main__":
    main()
