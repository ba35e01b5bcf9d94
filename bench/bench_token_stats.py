"""Loss-stage benchmark: chunked_token_stats against eager full logits, TRL's fused kernels and Liger.

One preference pair with T response tokens per sequence (N = 2T tokens), hidden size H and
vocabulary V (default: Llama-3, H = 4096, V = 128,256). Each (impl, T) runs in its own
process; we report the peak memory above the inputs (RSS high-water mark on the CPU,
max_memory_allocated on CUDA) and the time of one forward plus backward, after a small
warm-up. Variants (the TDPO ones share per-token KL weights, the DPO ones a cached reference):

  op_tdpo              this op, exact reference (reference hidden states), TDPO1 weights
  op_dpo               this op, label-only reference (cached reference log-probs), DPO
  eager_tdpo           full [N, V] logits for policy and reference, TDPO1, autograd backward
  trl_fused_dpo        TRL's fused LM head (trl.kernels.ChunkedLogProbFunction, log-probs only,
                       TRL's DPO vocabulary tile), label-only reference, DPO
  trl_divergence_tdpo  TDPO1 from TRL's kernels: the per-token KL(reference || policy) from
                       trl.kernels.chunked_divergence.ChunkedDivergenceFunction, the policy's and
                       the reference's label log-probs from ChunkedLogProbFunction
  trl_divergence_kl    the KL term alone from ChunkedDivergenceFunction (less than TDPO needs)
  liger_dpo            liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (compiled=False): DPO with
                       its own reference pass over the reference hidden states (it takes no cached
                       reference log-probs, and computes no KL)

For the op the worker also measures the GEMM ceiling: the op's own GEMMs ([chunk, H] x [H, V] for
the logits, [chunk, V] x [V, H] for the gradient factor), run bare with torch.mm on one chunk
before and after the op, give the machine's rate on those shapes; the op's achieved rate is its
GEMM FLOPs over its whole time. A torch.profiler breakdown of the timed call splits that time
into the GEMMs (aten::mm), the row pass (the op's own time outside them) and the rest.

Usage:
  python bench/bench_token_stats.py                      # all impls, T = 512 1024 2048
  python bench/bench_token_stats.py --T 512 --impls op_tdpo eager_tdpo
TRL and Liger are optional; install them without letting pip touch torch:
  pip install --no-deps trl==1.16.0 liger-kernel==0.8.5   (TRL also imports pandas and datasets)
Writes bench/results/token_stats.json (rows: impl, T, peak_mb, seconds, loss, gemm) and
token_stats.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import command_line, machine_info

IMPLS = [
    "op_tdpo",
    "op_dpo",
    "eager_tdpo",
    "trl_fused_dpo",
    "trl_divergence_tdpo",
    "trl_divergence_kl",
    "liger_dpo",
]
BETA = 0.1
#: The vocabulary tile TRL's DPOTrainer gives its fused head (trl/trainer/utils.py, 1.16).
TRL_VOCAB_TILE = 32768
#: Which rows compute the same loss (their loss values must agree) and what each is compared with.
SAME_LOSS = {
    "op_tdpo": "tdpo",
    "eager_tdpo": "tdpo",
    "trl_divergence_tdpo": "tdpo",
    "op_dpo": "dpo",
    "trl_fused_dpo": "dpo",
}
ANCHOR = {"op_tdpo": "trl_divergence_kl", "op_dpo": "trl_fused_dpo"}


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


def kl_weights(n, device):
    """The TDPO rows' per-token KL weights: TDPO1 weighs each token's KL by 1."""
    import torch

    return torch.ones(n, device=device)


def run_op(inputs, T, mode):
    """The loss as the package forms it (sparsepo_lite.losses): the op's per-token results summed per
    sequence, then the pair loss; TDPO1 with an exact reference, DPO with cached label log-probs."""
    import torch

    from sparsepo_lite import ExactReference, LabelReference
    from sparsepo_lite.losses import pair_stats, preference_loss, token_weights_for

    x = inputs
    n = x.hidden.shape[0]
    if mode == "tdpo":
        ref, u, d = ExactReference(x.ref_hidden, x.weight), torch.ones(n), kl_weights(n, x.hidden.device)
    else:
        ref, (u, d) = LabelReference(x.ref_label_logp), token_weights_for("dpo", 1, x.seq_ids)
    ps = pair_stats(x.hidden, x.weight, x.labels, x.seq_ids, 1, ref, u.to(x.hidden.device), d)
    loss = preference_loss(ps, "tdpo1" if mode == "tdpo" else "dpo", BETA).sum()
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
    kl = (lq.exp() * (lq - lp)).sum(-1) * kl_weights(x.hidden.shape[0], x.hidden.device)
    sums = torch.zeros(2, device=x.hidden.device).index_add(0, x.seq_ids, logp - ref_logp + kl)
    loss = -F.logsigmoid(BETA * pair_margin(sums))
    loss.backward()
    return float(loss)


def trl_logp(hidden, weight, labels):
    """Per-token label log-probs from TRL's fused head ([N] fp32), log-probs only."""
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, TRL_VOCAB_TILE, None, 1.0, ("log_probs",))[0]


def run_trl_fused_dpo(inputs, T):
    import torch
    import torch.nn.functional as F

    x = inputs
    logp = trl_logp(x.hidden, x.weight, x.labels)
    sums = torch.zeros(2, device=x.hidden.device).index_add(0, x.seq_ids, logp - x.ref_label_logp)
    loss = -F.logsigmoid(BETA * pair_margin(sums))
    loss.backward()
    return float(loss)


def run_trl_divergence(inputs, T, with_logp):
    import torch
    import torch.nn.functional as F
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    x = inputs
    # beta = 0: the forward KL(teacher || student), i.e. KL(reference || policy) as in TDPO.
    kl, _ = ChunkedDivergenceFunction.apply(x.hidden, x.weight, None, x.ref_hidden, x.weight, None, 0.0)
    per_token = kl * kl_weights(x.hidden.shape[0], x.hidden.device)
    if with_logp:
        with torch.no_grad():
            ref_logp = trl_logp(x.ref_hidden, x.weight, x.labels)
        per_token = per_token + trl_logp(x.hidden, x.weight, x.labels) - ref_logp
    sums = torch.zeros(2, device=x.hidden.device).index_add(0, x.seq_ids, per_token)
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


def op_gemm_chunks(x, mode):
    """The op's GEMMs on these inputs, as (logit rows, gradient rows) per chunk: an exact reference
    stacks the policy's and the reference's hidden states into one [2n, H] x [H, V] GEMM (shared
    head); the gradient factor is one [n, V] x [V, H] GEMM."""
    from sparsepo_lite import default_chunk_size

    n_tok, V = x.hidden.shape[0], x.weight.shape[0]
    exact = mode == "tdpo"
    chunk = default_chunk_size(n_tok, V, x.hidden.dtype, exact)
    return [((2 if exact else 1) * min(chunk, n_tok - s), min(chunk, n_tok - s)) for s in range(0, n_tok, chunk)]


def gemm_flops(chunks, H, V):
    return sum(2.0 * (a + b) * H * V for a, b in chunks)


def bare_gemm_rate(chunks, weight, reps=2):
    """FLOP/s of torch.mm on the op's first (largest) chunk shapes, best of ``reps``: the ceiling."""
    import torch

    a_rows, g_rows = chunks[0]
    V, H = weight.shape
    a, z = torch.randn(a_rows, H, dtype=weight.dtype), torch.empty(a_rows, V, dtype=weight.dtype)
    g, out = torch.randn(g_rows, V, dtype=weight.dtype), torch.empty(g_rows, H, dtype=weight.dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, weight.t(), out=z)
        torch.mm(g, weight, out=out)
        best = min(best, time.perf_counter() - t0)
    return gemm_flops(chunks[:1], H, V) / best


def breakdown(prof, seconds):
    """Seconds in the GEMMs (aten::mm), in the op's own code outside them (the row pass) and the rest."""
    events = prof.key_averages()
    mm = sum(e.cpu_time_total for e in events if e.key == "aten::mm") / 1e6
    own = sum(e.self_cpu_time_total for e in events if "token_stats" in e.key) / 1e6
    return {"gemm_s": mm, "row_pass_s": own, "rest_s": max(seconds - mm - own, 0.0)}


def worker(args):
    import contextlib

    import torch

    from sparsepo_lite.peak_memory import PeakMemory

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    fns = {
        "op_tdpo": lambda x, T: run_op(x, T, "tdpo"),
        "op_dpo": lambda x, T: run_op(x, T, "dpo"),
        "eager_tdpo": run_eager_tdpo,
        "trl_fused_dpo": run_trl_fused_dpo,
        "trl_divergence_tdpo": lambda x, T: run_trl_divergence(x, T, with_logp=True),
        "trl_divergence_kl": lambda x, T: run_trl_divergence(x, T, with_logp=False),
        "liger_dpo": run_liger,
    }
    fn = fns[args.impl]
    T = args.T[0]
    is_op = args.impl.startswith("op_") and device.type == "cpu"

    fn(make_inputs(8, args.H, 1024, dtype, device), 8)  # warm-up: thread pools, BLAS, kernels
    x = make_inputs(T, args.H, args.V, dtype, device)
    row = {"impl": args.impl, "T": T}
    if is_op:
        chunks = op_gemm_chunks(x, args.impl.split("_")[1])
        rate_before = bare_gemm_rate(chunks, x.weight)
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if is_op else None
    # The profiler starts (and allocates its buffers) before the peak is measured: only its few
    # event records fall inside.
    with profiler or contextlib.nullcontext(), PeakMemory(device) as pm:
        t0 = time.perf_counter()
        loss = fn(x, T)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    row.update(peak_mb=pm.peak_bytes / 2**20, seconds=seconds, loss=loss)
    if is_op:
        # The ceiling is the better of two bare measurements around the op, so that a quiet spell
        # during the op cannot flatter it.
        ceiling = max(rate_before, bare_gemm_rate(chunks, x.weight))
        achieved = gemm_flops(chunks, args.H, args.V) / seconds
        row["gemm"] = {
            "chunks": len(chunks),
            "chunk_rows": chunks[0],
            "flops": gemm_flops(chunks, args.H, args.V),
            "ceiling_gflops": ceiling / 1e9,
            "achieved_gflops": achieved / 1e9,
            "fraction": achieved / ceiling,
            **breakdown(profiler, seconds),
        }
        if dtype == torch.float32 and bf16_gemm_hardware():
            # What the same GEMMs reach in bf16 where the CPU has instructions for it (the op's own
            # bf16 path is another run, with --dtype bfloat16).
            row["gemm"]["bf16_ceiling_gflops"] = bare_gemm_rate(chunks, x.weight.to(torch.bfloat16)) / 1e9
    print(json.dumps(row))


def bf16_gemm_hardware():
    """The CPU flags that give bf16 GEMMs their own instructions (AMX, AVX512-BF16), if any."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in flags if f in ("amx_bf16", "avx512_bf16")]


def ratio(r, other, key):
    return f"{r[key] / other[key]:.2f}x" if r.get(key) and other and other.get(key) else "-"


def write(out, meta, rows):
    """The JSON and the Markdown of the rows so far (after every row: a run cut short keeps them)."""
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(out + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    by = {(r["impl"], r["T"]): r for r in rows}
    md = [
        f"# Loss stage: one pair, H = {meta['H']}, V = {meta['V']}, {meta['dtype']} on {meta['device']}",
        "",
        "Commands: " + ", ".join(f"{i}. `{c}`" for i, c in enumerate(meta["commands"], 1)),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()),
        "",
        "One forward plus backward of the pair's loss; peak memory above the inputs. `vs anchor`: op_tdpo "
        "against TRL's divergence kernel computing the KL term alone (trl_divergence_kl), op_dpo against "
        "TRL's fused head (trl_fused_dpo); below 1 the op is faster or smaller. Rows of one loss "
        "(TDPO1: op_tdpo, eager_tdpo, trl_divergence_tdpo; DPO with a cached reference: op_dpo, trl_fused_dpo) must "
        "give the same loss value; liger_dpo's reference is the exact one, so its DPO loss differs from the cached rows'.",
        "",
        *(
            [
                "`run`: the command that measured the row; ratios between rows of different runs compare "
                "across runs, which this shared machine makes noisier than within one.",
                "",
            ]
            if len(meta["commands"]) > 1
            else []
        ),
        "| impl | T | peak MB | seconds | loss | time vs eager | time vs anchor | peak vs anchor | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = by.get(("eager_tdpo", r["T"]))
        a = by.get((ANCHOR.get(r["impl"]), r["T"]))
        if r.get("seconds") is None:
            md.append(
                f"| {r['impl']} | {r['T']} | - | - | - | - | - | - | {r.get('run', 1)} | error: {r.get('error', '?')}"
            )
            continue
        md.append(
            f"| {r['impl']} | {r['T']} | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} | "
            f"{ratio(r, e, 'seconds')} | {ratio(r, a, 'seconds')} | {ratio(r, a, 'peak_mb')} | {r.get('run', 1)} |"
        )
    gemm = [r for r in rows if r.get("gemm")]
    if gemm:
        bf16 = bf16_gemm_hardware()
        md += [
            "",
            "## The op against the machine's GEMM rate",
            "",
            "Ceiling: torch.mm on the op's own chunk shapes ([rows, H] x [H, V] for the logits, [chunk, V] x "
            "[V, H] for the gradient factor), run bare, the better of two measurements around the op. "
            "Achieved: the op's GEMM FLOPs over its whole time. Breakdown from torch.profiler over the timed "
            "call: GEMMs (aten::mm), the row pass (the op's own time outside the GEMMs: log-softmax, label "
            "gather, KL, gradient factor) and the rest (autograd, the loss, index_add).",
            "",
            "| impl | T | chunks x rows (logits, grad) | ceiling GFLOP/s | achieved GFLOP/s | fraction | "
            "GEMMs s | row pass s | rest s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in gemm:
            g = r["gemm"]
            md.append(
                f"| {r['impl']} | {r['T']} | {g['chunks']} x {tuple(g['chunk_rows'])} | {g['ceiling_gflops']:.1f} | "
                f"{g['achieved_gflops']:.1f} | {g['fraction']:.0%} | {g['gemm_s']:.2f} | {g['row_pass_s']:.2f} | "
                f"{g['rest_s']:.2f} |"
            )
        bf16_rates = [
            f"{r['impl']} at T = {r['T']}: {r['gemm']['bf16_ceiling_gflops']:.1f} GFLOP/s "
            f"({r['gemm']['bf16_ceiling_gflops'] / r['gemm']['ceiling_gflops']:.2f}x the fp32 ceiling)"
            for r in gemm
            if r["gemm"].get("bf16_ceiling_gflops")
        ]
        if bf16_rates:
            bf16_line = (
                f"this CPU has {', '.join(bf16)}; torch.mm in bf16 on the same shapes: " + "; ".join(bf16_rates) + "."
            )
        elif bf16:
            bf16_line = f"this CPU has {', '.join(bf16)}; this run is in {meta['dtype']}, the ceiling above too."
        else:
            bf16_line = "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated), so only fp32 is measured."
        md += ["", "bf16 GEMMs: " + bf16_line]
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "token_stats"))
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an earlier run (same machine, H, V, dtype) that this run does not redo",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    meta = {
        "commands": [command_line()],
        "machine": machine_info(args.device),
        "H": args.H,
        "V": args.V,
        "dtype": args.dtype,
        "device": args.device,
        "beta": BETA,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = []
    if args.merge and os.path.isfile(args.out + ".meta.json"):
        with open(args.out + ".meta.json") as f:
            old = json.load(f)
        keys = ("H", "V", "dtype", "device")
        if [old.get(k) for k in keys] != [meta[k] for k in keys] or old["machine"].get("cpu") != meta["machine"].get(
            "cpu"
        ):
            sys.exit(f"--merge: {args.out}.json was measured with other settings or on another machine")
        meta["commands"] = old.get("commands", [old.get("command")]) + meta["commands"]
        redo = {(i, T) for T in args.T for i in args.impls}
        with open(args.out + ".json") as f:
            rows = [r for r in json.load(f) if (r["impl"], r["T"]) not in redo]
    print(f"{'impl':<21}{'T':>6}{'peak MB':>10}{'seconds':>10}")
    for T in args.T:
        for impl in args.impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--T", str(T)]
            cmd += ["--H", str(args.H), "--V", str(args.V), "--dtype", args.dtype, "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"impl": impl, "T": T, "peak_mb": None, "seconds": None, "error": err[:300]}
            row["run"] = len(meta["commands"])
            rows.append(row)
            rows.sort(key=lambda r: (r["T"], IMPLS.index(r["impl"])))
            write(args.out, meta, rows)
            if row["seconds"] is None:
                print(f"{impl:<21}{T:>6}  ERROR {row['error']}", flush=True)
            else:
                print(f"{impl:<21}{T:>6}{row['peak_mb']:>10.0f}{row['seconds']:>10.2f}", flush=True)
    print(f"wrote {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
