"""End to end: training steps of a 4-bit QLoRA model built from a config with random weights.

    python bench/bench_e2e.py                                  # CPU: small Llama, T = 256 512 1024
    python bench/bench_e2e.py --model llama-3-8b --seq-lens 1024 2048 4096 8192   # on a GPU

One pair per step (chosen T tokens, rejected T - 16, so the batch is padded as in training; a
prompt of T/4), LoRA r = 16 on every projection, gradient checkpointing, AdamW on LoRA (and the
SparsePO mask net). Each variant runs in its own process: tokens/s over ``--steps`` optimizer
steps after one warm-up step, and the peak memory of the step:
CUDA ``torch.cuda.max_memory_allocated`` (weights included); CPU the model's tensor bytes plus the
process's RSS high-water mark above the loaded model. Next to it, the planner's estimate
(``sparsepo-lite plan``) for the same settings.

  op_<loss>_online   sparsepo_lite.compute_loss, reference = the adapter-off base every step
  op_<loss>_cached   the same from a top-32 reference cache written by precompute_reference
  eager_<loss>       the same loss with full [T, V] logits of policy and reference (TDPO/SparsePO code)
  trl_dpo            sequence-level DPO on full logits, as TRL computes it

Writes bench/results/e2e_<model>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: The CPU model: Llama-3's layout (GQA 4:1, SwiGLU 3.5x) at 1/8 of its width, 4 layers.
SMALL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1792,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
             max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0)
VARIANTS = ["op_dpo_online", "op_dpo_cached", "op_tdpo2_online", "op_tdpo2_cached", "op_sparsepo_online",
            "op_sparsepo_cached", "eager_tdpo2", "eager_sparsepo", "trl_dpo"]


def model_config(name):
    from sparsepo_lite.memory_plan import config_path

    if name == "small":
        return dict(SMALL)
    with open(config_path(name)) as f:
        return json.load(f)


def prepare_model(name, dtype, folder):
    """Random weights from the config, saved once under ``folder`` (loaded in 4-bit by each worker)."""
    import torch
    import transformers

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    cfg = transformers.AutoConfig.for_model(**model_config(name))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def make_example(T, vocab, seed=0):
    import torch

    from sparsepo_lite.data import PreferenceExample

    g = torch.Generator().manual_seed(seed)
    prompt = T // 4
    ids = torch.randint(10, vocab, (3 * T,), generator=g).tolist()
    return PreferenceExample(0, ids[:prompt], ids[T:2 * T - prompt], ids[2 * T:3 * T - prompt - 16])


def trl_dpo_loss(model, batch, beta=0.1):
    """Sequence-level DPO on full logits (what TRL's DPOTrainer computes)."""
    import torch
    import torch.nn.functional as F

    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    tgt = labels[:, 1:]
    mask = tgt != -100

    def seq_logp(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp_min(0)[..., None]).squeeze(-1)
        return (lp * mask).sum(-1)

    with torch.no_grad(), model.disable_adapter():
        ref = seq_logp(model(input_ids=ids, attention_mask=att).logits)
    pol = seq_logp(model(input_ids=ids, attention_mask=att).logits)
    z = (pol[0] - ref[0]) - (pol[1] - ref[1])
    return -F.logsigmoid(beta * z)


def worker(spec):
    import contextlib

    import torch

    sys.path.insert(0, HERE)
    from bench_compute_loss import eager_loss
    from sparsepo_lite.data import PreferenceCollator
    from sparsepo_lite.masks import SparsePOMasks
    from sparsepo_lite.modeling import ModelConfig, load_policy
    from sparsepo_lite.objective import LossConfig, compute_loss
    from sparsepo_lite.peak_memory import PeakMemory

    variant, T, device = spec["variant"], spec["T"], spec["device"]
    impl, loss_type = variant.split("_")[:2]
    loss_type = "dpo" if impl == "trl" else loss_type
    torch.manual_seed(0)
    model, _ = load_policy(ModelConfig(spec["folder"], dtype=spec["dtype"], lora_r=16, device=device),
                           tokenizer=False)
    model.train()
    ex = make_example(T, model.config.vocab_size)
    collate = PreferenceCollator(0)
    masks = SparsePOMasks.for_model(model).to(device) if loss_type == "sparsepo" else None
    cfg = LossConfig(loss_type=loss_type, beta=0.1, masks=masks)
    if variant.endswith("cached"):
        from sparsepo_lite.precompute import precompute_reference
        from sparsepo_lite.ref_cache import CachedExample, CachedReferenceCollator, RefCache

        out = tempfile.mkdtemp(prefix="e2e_cache_")
        precompute_reference(model, type("Tok", (), {"pad_token_id": 0})(), {"train": [ex]}, out,
                             fingerprint={"bench": "e2e"}, config=cfg, top_k=0 if loss_type == "dpo" else 32,
                             batch_size=1, progress=False)
        batch = CachedReferenceCollator(0, RefCache(out))([CachedExample(ex, "train")])
    else:
        batch = collate([ex])
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad] + (list(masks.parameters()) if masks else [])
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and spec["dtype"] == "bfloat16" \
        else contextlib.nullcontext()

    def loss_on(b):
        with autocast:
            if impl == "op":
                return compute_loss(model, b, cfg)[0]
            if impl == "eager":
                return eager_loss(model, b, loss_type, masks)
            return trl_dpo_loss(model, b)

    def step():
        loss = loss_on(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    result = {"variant": variant, "T": T}
    # Load every kernel and library once on a short batch, outside the measurement (the CPU peak is
    # the RSS high-water mark, which counts code pages and allocator pools too).
    warm = {k: v.to(device) for k, v in collate([make_example(64, model.config.vocab_size)]).items()} \
        if not variant.endswith("cached") else batch
    loss_on(warm).backward()
    opt.zero_grad(set_to_none=True)
    del warm
    try:
        with PeakMemory(device) as pm:
            step()  # the first step allocates the optimizer states, which the later steps keep
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(spec["steps"]):
                loss = step()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        peak = pm.peak_bytes + (pm._start if device == "cuda" else model_bytes)
        result.update(seconds_per_step=seconds / spec["steps"], tokens_per_s=2 * T * spec["steps"] / seconds,
                      peak_bytes=peak, loss=loss)
    except torch.OutOfMemoryError:
        result.update(oom=True)
    print("RESULT " + json.dumps(result), flush=True)


def plan_for(name, variant, T, dtype):
    from sparsepo_lite.memory_plan import ModelShape, load_shape, plan_memory

    if not variant.startswith("op_"):
        return None
    _, loss, ref = variant.split("_")
    shape = ModelShape.from_config(SMALL, "small") if name == "small" else load_shape(name)
    reference = "online" if ref == "online" else ("label" if loss == "dpo" else "topk")
    return plan_memory(shape, T, loss=loss, reference=reference, prompt_len=T // 4, dtype=dtype, lora_r=16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'small' (CPU default) or a shipped name (GPU default llama-3-8b)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sparsepo_e2e"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))

    import torch

    sys.path.insert(0, HERE)
    from bench_token_stats import machine_info

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = a.model or ("llama-3-8b" if device == "cuda" else "small")
    dtype = "bfloat16" if device == "cuda" else "float32"
    seq_lens = a.seq_lens or ([1024, 2048, 4096, 8192] if device == "cuda" else [256, 512, 1024])
    steps = a.steps or (3 if device == "cuda" else 2)
    folder = prepare_model(name, dtype, os.path.join(a.work, f"{name}_{dtype}"))
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so the RSS would
    # count dead tensors: a fixed 64 KiB threshold returns every tensor's pages when it dies.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for T in seq_lens:
        for variant in a.variants:
            spec = dict(variant=variant, T=T, device=device, dtype=dtype, folder=folder, steps=steps)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                  cwd=ROOT, capture_output=True, text=True, env=env)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                row = {"variant": variant, "T": T, "error": " | ".join(tail)}
                if "out of memory" in (proc.stderr or "").lower() or proc.returncode == -9:
                    row["oom"] = True
            else:
                row = json.loads(lines[-1][len("RESULT "):])
            plan = plan_for(name, variant, T, dtype)
            if plan is not None:
                row["plan_bytes"] = plan.total
                row["plan_phase"] = plan.phase
                if row.get("peak_bytes"):
                    row["plan_over_measured"] = plan.total / row["peak_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = os.path.join(HERE, "results", f"e2e_{name}_{device}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    result = {"command": command, "machine": machine_info(device), "model": name, "dtype": dtype, "steps": steps,
              "rows": rows}
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    gib = 1 << 30
    md = [f"# End-to-end training step, {name} (random weights, 4-bit NF4 + LoRA r=16), {device}", "",
          f"Command: `{command}`", "",
          f"Machine: {result['machine'].get('gpu') or result['machine'].get('cpu', '?')}, torch "
          f"{result['machine']['torch']}. One pair per step, {steps} timed steps after a warm-up.", "",
          "| T | variant | tokens/s | peak GiB | planner GiB | planner / measured |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("peak_bytes"):
            meas = f"{r['tokens_per_s']:.0f} | {r['peak_bytes'] / gib:.2f}"
        else:
            meas = "OOM | -" if r.get("oom") else f"error: {r.get('error', '?')[:60]} | -"
        plan = f"{r['plan_bytes'] / gib:.2f} ({r['plan_phase']})" if r.get("plan_bytes") else "-"
        ratio = f"{r['plan_over_measured']:.2f}" if r.get("plan_over_measured") else "-"
        md.append(f"| {r['T']} | {r['variant']} | {meas} | {plan} | {ratio} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {out}.json, {out}.md")


if __name__ == "__main__":
    main()
