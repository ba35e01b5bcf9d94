"""Loss-stage benchmark: chunked_token_stats vs eager full-logits TDPO vs Liger's fused DPO.

One preference pair with T response tokens per sequence (N = 2T tokens), hidden size H and
vocabulary V (default: Llama-3, H = 4096, V = 128,256). Each (impl, T) runs in its own
process; we report the peak memory above the inputs (RSS high-water mark on the CPU,
max_memory_allocated on CUDA) and the time of one forward plus backward, after a small
warm-up. Variants:

  op_tdpo     this op, exact reference (reference hidden states), TDPO1 weights
  op_dpo      this op, label-only reference (cached reference log-probs), DPO
  eager_tdpo  full [N, V] logits for policy and reference, TDPO1, autograd backward
  liger_dpo   liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (compiled=False), with its
              reference model pass (it computes no KL)

Usage:
  python bench/bench_token_stats.py                      # all impls, T = 512 1024 2048
  python bench/bench_token_stats.py --T 512 --impls op_tdpo eager_tdpo
Liger is optional: pip install --no-deps liger-kernel (its chunked losses need no triton).
Writes bench/results/token_stats.json (rows: impl, T, peak_mb, seconds) and token_stats.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import machine_info

IMPLS = ["op_tdpo", "op_dpo", "eager_tdpo", "liger_dpo"]
BETA = 0.1


def make_inputs(T, H, V, dtype, device, seed=0):
    """One pair: hidden/ref_hidden [2T, H], head [V, H] (logits ~ N(0, 1)), labels, seq_ids."""
    import math
    from types import SimpleNamespace

    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    n = 2 * T
    hidden = torch.randn(n, H, generator=g)
    x = SimpleNamespace(
        weight=(torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device),
        ref_hidden=(hidden + 0.1 * torch.randn(n, H, generator=g)).to(dtype).to(device),
        hidden=hidden.to(dtype).to(device).requires_grad_(True),
        labels=torch.randint(0, V, (n,), generator=g).to(device),
        seq_ids=torch.arange(2, device=device).repeat_interleave(T),
        # op_dpo reads cached reference label log-probs; their values do not affect cost.
        ref_label_logp=torch.full((n,), -math.log(V), device=device),
    )
    return x


def pair_margin(seq_sums_minus_ref):
    return seq_sums_minus_ref[0] - seq_sums_minus_ref[1]


def run_op(inputs, T, mode):
    import torch
    import torch.nn.functional as F

    from sparsepo_lite import ExactReference, LabelReference, chunked_token_stats

    x = inputs
    if mode == "tdpo":
        ref = ExactReference(x.ref_hidden, x.weight)
        kl_weight = torch.ones(x.hidden.shape[0], device=x.hidden.device)
    else:
        ref, kl_weight = LabelReference(x.ref_label_logp), None
    stats = chunked_token_stats(x.hidden, x.weight, x.labels, x.seq_ids, 2, ref=ref, kl_weight=kl_weight)
    ref_sums = torch.zeros(2, device=x.hidden.device).index_add(0, x.seq_ids, stats.ref_logp)
    loss = -F.logsigmoid(BETA * pair_margin(stats.seq_sums - ref_sums))
    loss.backward()
    return float(loss)


def run_eager_tdpo(inputs, T):
    import torch
    import torch.nn.functional as F

    x = inputs
    lp = torch.log_softmax((x.hidden @ x.weight.T).float(), dim=-1)
    with torch.no_grad():
        lq = torch.log_softmax((x.ref_hidden @ x.weight.T).float(), dim=-1)
    logp = lp.gather(1, x.labels[:, None]).squeeze(1)
    ref_logp = lq.gather(1, x.labels[:, None]).squeeze(1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    sums = torch.zeros(2, device=x.hidden.device).index_add(0, x.seq_ids, logp - ref_logp + kl)
    loss = -F.logsigmoid(BETA * pair_margin(sums))
    loss.backward()
    return float(loss)


def run_liger(inputs, T):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    x = inputs
    H = x.hidden.shape[1]
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=False, use_ref_model=True)
    out = loss_fn(
        x.weight, x.hidden.view(2, T, H), x.labels.view(2, T), ref_input=x.ref_hidden.view(2, T, H), ref_weight=x.weight
    )
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return float(loss)


def worker(args):
    import torch

    from sparsepo_lite.peak_memory import PeakMemory

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    fns = {
        "op_tdpo": lambda x, T: run_op(x, T, "tdpo"),
        "op_dpo": lambda x, T: run_op(x, T, "dpo"),
        "eager_tdpo": run_eager_tdpo,
        "liger_dpo": run_liger,
    }
    fn = fns[args.impl]
    T = args.T[0]

    fn(make_inputs(8, args.H, 1024, dtype, device), 8)  # warm-up: thread pools, BLAS, kernels
    x = make_inputs(T, args.H, args.V, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakMemory(device) as pm:
        t0 = time.perf_counter()
        loss = fn(x, T)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    print(json.dumps({"impl": args.impl, "T": T, "peak_mb": pm.peak_bytes / 2**20, "seconds": seconds, "loss": loss}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "token_stats"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    rows = []
    print(f"{'impl':<12}{'T':>6}{'peak MB':>12}{'seconds':>10}")
    for T in args.T:
        for impl in args.impls:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                "--impl",
                impl,
                "--T",
                str(T),
                "--H",
                str(args.H),
                "--V",
                str(args.V),
                "--dtype",
                args.dtype,
                "--device",
                args.device,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"impl": impl, "T": T, "peak_mb": None, "seconds": None, "error": err[:300]}
            rows.append(row)
            pk = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            sec = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
            print(
                f"{impl:<12}{T:>6}{pk:>12}{sec:>10}" + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True
            )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    info = machine_info(args.device)
    meta = {
        "command": command,
        "machine": info,
        "H": args.H,
        "V": args.V,
        "dtype": args.dtype,
        "device": args.device,
        "beta": BETA,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    by = {(r["impl"], r["T"]): r for r in rows}
    md = [
        f"# Loss stage: one pair, H = {args.H}, V = {args.V}, {args.dtype} on {args.device}",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "| impl | T | peak MB above inputs | seconds (fwd+bwd) | peak vs eager | time vs eager |",
        "|---|---|---|---|---|---|",
    ]

    def ratio(r, e, k):
        return f"{r[k] / e[k]:.3f}x" if r.get(k) and e.get(k) else "-"

    for r in rows:
        e = by.get(("eager_tdpo", r["T"]), {})
        md.append(
            f"| {r['impl']} | {r['T']} | {r['peak_mb'] if r['peak_mb'] is None else round(r['peak_mb'])} | "
            f"{r['seconds'] if r['seconds'] is None else round(r['seconds'], 2)} | {ratio(r, e, 'peak_mb')} | "
            f"{ratio(r, e, 'seconds')} |" + (f" error: {r['error']}" if "error" in r else "")
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
