"""End to end: training steps of a 4-bit QLoRA model, built from a config with random weights or a
real pretrained one (SmolLM2-135M-Instruct on the CPU).

    python bench/bench_e2e.py                                  # CPU: small Llama, T = 256 512 1024
    python bench/bench_e2e.py --model smollm2-135m-instruct    # CPU: the real SmolLM2, against TRL 1.16
    python bench/bench_e2e.py --gpu-mem 24GB --seq-lens 1024 2048        # GPU: Llama-3-8B shape
    python bench/bench_e2e.py --gpu-mem 24GB --seq-lens 4096 8192 --merge   # more rows, same table
    python bench/bench_e2e.py --gpu-mem 24GB --rows priority --deadline 240  # the GPU check's order

The model is built in memory from its config (random weights, seeded), directly on the device, and
its linear layers are quantised to NF4 there: no checkpoint is written or read (16 GB at 8B). Its
build time is reported.

One pair per step (chosen T tokens, rejected T - 16, so the batch is padded as in training; a
prompt of T/4), LoRA r = 16 on every projection, gradient checkpointing, AdamW on LoRA (and the
SparsePO mask net). For each variant: tokens/s over ``--steps`` optimizer
steps after one warm-up step, and the peak memory of the step:
CUDA ``torch.cuda.max_memory_allocated`` (weights included); CPU the model's tensor bytes plus the
process's RSS high-water mark above the loaded model. Next to it, the planner's estimate
(``sparsepo-lite plan``) for the same settings.

On a GPU the model is built once and the variants run in turn in this process (``--one-process``,
the GPU default): the CUDA peak resets exactly between them, and building an 8B model once instead
of once per row is what makes the table fit a short GPU lease. On the CPU the RSS peak cannot be
separated that cleanly, so each variant gets its own process there. ``--gpu-mem 24GB`` caps what
the process may allocate (``torch.cuda.set_per_process_memory_fraction``) so that a larger card
behaves like a 24 GB one: a step that needs more is an OOM row. A real card also holds the CUDA
context (about 0.5 GB) outside that cap.

  op_<loss>_online   sparsepo_lite.compute_loss, reference = the adapter-off base every step
  op_<loss>_cached   the same from a reference cache written by precompute_reference (DPO: label
                     log-probs; the others: the default top-64 + 16 tail samples)
  eager_<loss>       the same loss with full [T, V] logits of policy and reference (TDPO/SparsePO code)
  trl_dpo            sequence-level DPO on full [T, V] logits (TRL before its fused head)
  trl116_dpo         TRL 1.16's DPOTrainer step: its fused LM head (trl.trainer.utils.
                     add_fused_lm_head, with the outputs DPOTrainer asks for) for the policy and
                     the adapter-off reference, then the sigmoid DPO loss (needs trl installed)

Rows run in the order given (``--rows variant@T ...``, or ``--rows priority``: the GPU check's
order) or as the grid ``--seq-lens`` x ``--variants``. With ``--deadline SECONDS`` a row whose
predicted time (from the rows already measured) would end past the deadline is not started; it is
recorded as skipped, and later, cheaper rows still run.

Writes bench/results/e2e_<model>_<device>.{json,md} after every row (a run cut short keeps its rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import HERE, ROOT, eager_loss, machine_info

#: The CPU model: Llama-3's layout (GQA 4:1, SwiGLU 3.5x) at 1/8 of its width, 4 layers.
SMALL = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=512,
    intermediate_size=1792,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=16384,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_theta=500000.0,
)
VARIANTS = [
    "op_dpo_online",
    "op_dpo_cached",
    "op_tdpo2_online",
    "op_tdpo2_cached",
    "op_sparsepo_online",
    "op_sparsepo_cached",
    "eager_tdpo2",
    "eager_sparsepo",
    "trl_dpo",
    "trl116_dpo",
]
#: The per-token outputs TRL 1.16's DPOTrainer asks its fused head for (they feed its metrics).
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


#: The dry-run model of scripts/gpu_check.sh: the same layout, small enough for a CPU test.
TINY = dict(
    SMALL,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=1000,
)
#: The GPU check's order: what the acceptance needs first, then longer sequences, then the rest.
PRIORITY = (
    [f"{v}@2048" for v in ("op_tdpo2_online", "op_sparsepo_online", "op_dpo_cached", "eager_tdpo2")]
    + [f"{v}@{T}" for T in (4096, 8192) for v in ("op_tdpo2_online", "op_sparsepo_online", "op_dpo_cached")]
    + [f"{v}@2048" for v in ("op_dpo_online", "op_tdpo2_cached", "op_sparsepo_cached", "trl_dpo", "eager_sparsepo")]
    + [f"{v}@{T}" for T in (4096, 8192) for v in ("op_dpo_online", "op_tdpo2_cached", "op_sparsepo_cached")]
    + [f"{v}@1024" for v in VARIANTS]
    + ["eager_tdpo2@4096", "trl_dpo@4096"]
)


def model_config(name):
    from sparsepo_lite.memory_plan import config_path
    from sparsepo_lite.models import SMOLLM2, resolve_model_path

    if name in ("small", "tiny"):
        return dict(SMALL if name == "small" else TINY)
    if name == SMOLLM2:
        with open(os.path.join(resolve_model_path(name), "config.json")) as f:
            return json.load(f)
    with open(config_path(name)) as f:
        return json.load(f)


def make_example(T, vocab, seed=0):
    import torch

    from sparsepo_lite.data import PreferenceExample

    g = torch.Generator().manual_seed(seed)
    prompt = T // 4
    ids = torch.randint(10, vocab, (3 * T,), generator=g).tolist()
    return PreferenceExample(0, ids[:prompt], ids[T : 2 * T - prompt], ids[2 * T : 3 * T - prompt - 16])


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


def trl116_dpo_loss(model, batch, beta=0.1):
    """Sequence-level DPO as TRL 1.16's DPOTrainer computes it: per-token log-probs from its fused LM
    head (patched onto the base model once, as the trainer does), the reference being the model with
    its adapter disabled."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model()
    if not getattr(base, "_bench_trl_fused_head", False):
        add_fused_lm_head(base, outputs=TRL_DPO_OUTPUTS)
        base._bench_trl_fused_head = True
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad(), model.disable_adapter():
        ref = model(**kw, labels=batch["labels"], fused_lm_head=True).log_probs.sum(1)
    pol = model(**kw, labels=batch["labels"], fused_lm_head=True).log_probs.sum(1)
    z = (pol[0] - ref[0]) - (pol[1] - ref[1])
    return -F.logsigmoid(beta * z)


def load_model(spec):
    """The 4-bit policy of ``spec["model"]`` (a LoRA adapter on every projection, r = 16), in train
    mode: SmolLM2-135M-Instruct's real weights, or random weights (seed 0, built on the device) for
    the other names. Liger stays off: the planner models the Hugging Face layers."""
    from sparsepo_lite.models import SMOLLM2, ModelConfig, load_policy, random_policy

    cfg = ModelConfig(spec["model"], dtype=spec["dtype"], lora_r=16, device=spec["device"], use_liger=False)
    if spec["model"] == SMOLLM2:
        model = load_policy(cfg, tokenizer=False)[0]
    else:
        model = random_policy(model_config(spec["model"]), cfg, seed=0)
    model.train()
    return model


def measure(model, spec):
    """Time ``spec["steps"]`` training steps of one variant at one T and take their peak memory.

    Leaves nothing on the model (gradients, optimizer, mask net and batch are dropped on return), so
    one loaded model serves every variant in turn (``--one-process``).
    """
    import contextlib

    import torch

    from sparsepo_lite.data import PreferenceCollator
    from sparsepo_lite.masks import SparsePOMasks
    from sparsepo_lite.objective import LossConfig, compute_loss
    from sparsepo_lite.peak_memory import PeakMemory

    variant, T, device = spec["variant"], spec["T"], spec["device"]
    impl, loss_type = variant.split("_")[:2]
    loss_type = "dpo" if impl.startswith("trl") else loss_type
    torch.manual_seed(0)
    ex = make_example(T, model.config.vocab_size)
    collate = PreferenceCollator(0)
    masks = SparsePOMasks.for_model(model).to(device) if loss_type == "sparsepo" else None
    cfg = LossConfig(loss_type=loss_type, beta=0.1, masks=masks)
    if variant.endswith("cached"):
        from sparsepo_lite.refcache import DEFAULT_TOP_K, CachedExample, CachedReferenceCollator, RefCache
        from sparsepo_lite.refcache.writer import precompute_reference

        out = tempfile.mkdtemp(prefix="e2e_cache_")
        try:
            precompute_reference(
                model,
                type("Tok", (), {"pad_token_id": 0})(),
                {"train": [ex]},
                out,
                fingerprint={"bench": "e2e"},
                mapo_mapping=cfg.mapo_mapping if loss_type == "mapo" else None,
                top_k=0 if loss_type == "dpo" else DEFAULT_TOP_K,
                batch_size=1,
                progress=False,
            )
            batch = CachedReferenceCollator(0, RefCache(out))([CachedExample(ex, "train")])
        finally:
            shutil.rmtree(out, ignore_errors=True)  # the batch holds its own copy of what it read
    else:
        batch = collate([ex])
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad] + (list(masks.parameters()) if masks else [])
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda" and spec["dtype"] == "bfloat16"
        else contextlib.nullcontext()
    )

    def loss_on(b):
        with autocast:
            if impl == "op":
                return compute_loss(model, b, cfg)[0]
            if impl == "eager":
                return eager_loss(model, b, loss_type, masks)
            return trl_dpo_loss(model, b) if impl == "trl" else trl116_dpo_loss(model, b)

    def step():
        loss = loss_on(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    result = {"variant": variant, "T": T}
    try:
        # Load every kernel and library once on a short batch, outside the measurement (the CPU peak
        # is the RSS high-water mark, which counts code pages and allocator pools too).
        warm = (
            {k: v.to(device) for k, v in collate([make_example(64, model.config.vocab_size)]).items()}
            if not variant.endswith("cached")
            else batch
        )
        loss_on(warm).backward()
        opt.zero_grad(set_to_none=True)
        del warm
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
        result.update(
            seconds_per_step=seconds / spec["steps"],
            tokens_per_s=2 * T * spec["steps"] / seconds,
            peak_bytes=peak,
            loss=loss,
        )
    except torch.OutOfMemoryError:
        result.update(oom=True)
    except Exception as exc:  # one broken variant must not cost the rows after it (a GPU lease is short)
        import traceback

        traceback.print_exc()
        result.update(error=f"{type(exc).__name__}: {exc}")
    # After the except block, whose traceback held the failed step's tensors: free for the next variant.
    opt = params = masks = batch = None  # (not del: the closures above name them)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return result


def cap_gpu_memory(gpu_mem):
    """Let this process allocate at most ``gpu_mem`` (e.g. "24GB") of the GPU, like a smaller card."""
    import torch

    from sparsepo_lite.memory_plan import parse_bytes

    if gpu_mem and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(gpu_mem) / total))


def worker(spec):
    cap_gpu_memory(spec.get("gpu_mem"))
    print("RESULT " + json.dumps(measure(load_model(spec), spec)), flush=True)


def plan_for(name, variant, T, dtype):
    from sparsepo_lite.memory_plan import ModelShape, load_shape, plan_memory
    from sparsepo_lite.models import SMOLLM2

    if not variant.startswith("op_"):
        return None
    _, loss, ref = variant.split("_")
    local = name in ("small", "tiny", SMOLLM2)
    shape = ModelShape.from_config(model_config(name), name) if local else load_shape(name)
    reference = "online" if ref == "online" else ("label" if loss == "dpo" else "topk")
    return plan_memory(shape, T, loss=loss, reference=reference, prompt_len=T // 4, dtype=dtype, lora_r=16)


def write_results(out, result):
    """``out``.json and ``out``.md from ``result`` (rewritten after every row, so a run cut short keeps
    what it measured)."""
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    gib = 1 << 30
    weights = "pretrained weights" if result["model"] == "smollm2-135m-instruct" else "random weights"
    cap = f", GPU memory capped at {result['gpu_mem']}" if result.get("gpu_mem") else ""
    md = [
        f"# End-to-end training step, {result['model']} ({weights}, 4-bit NF4 + LoRA r=16), "
        f"{result['machine'].get('device', '?')}",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in result["commands"]),
        "",
        f"Machine: {result['machine'].get('gpu') or result['machine'].get('cpu', '?')}, torch "
        f"{result['machine']['torch']}{cap}. One pair per step, {result['steps']} timed steps after a warm-up."
        + (f" Model built in memory in {result['model_build_s']} s." if "model_build_s" in result else ""),
        "",
        "| T | variant | tokens/s | vs trl116_dpo | peak GiB | planner GiB | planner / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    trl116 = {r["T"]: r["tokens_per_s"] for r in result["rows"] if r["variant"] == "trl116_dpo" and r.get("peak_bytes")}
    for r in sorted(result["rows"], key=lambda r: (r["T"], VARIANTS.index(r["variant"]))):
        if r.get("peak_bytes"):
            vs = f"{r['tokens_per_s'] / trl116[r['T']]:.2f}x" if r["T"] in trl116 else "-"
            meas = f"{r['tokens_per_s']:.0f} | {vs} | {r['peak_bytes'] / gib:.2f}"
        else:
            meas = (
                "OOM | - | -"
                if r.get("oom")
                else f"not run ({r['skipped']}) | - | -"
                if r.get("skipped")
                else f"error: {r.get('error', '?')[:60]} | - | -"
            )
        plan = f"{r['plan_bytes'] / gib:.2f} ({r['plan_phase']})" if r.get("plan_bytes") else "-"
        ratio = f"{r['plan_over_measured']:.2f}" if r.get("plan_over_measured") else "-"
        md.append(f"| {r['T']} | {r['variant']} | {meas} | {plan} | {ratio} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


def run_in_subprocess(spec):
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so the RSS would
    # count dead tensors: a fixed 64 KiB threshold returns every tensor's pages when it dies.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    row = {"variant": spec["variant"], "T": spec["T"], "error": " | ".join(tail)}
    if "out of memory" in (proc.stderr or "").lower() or proc.returncode == -9:
        row["oom"] = True
    return row


def parse_rows(rows, seq_lens, variants):
    """[(variant, T)] in run order: ``rows`` ("priority" or "variant@T" items) or the grid."""
    if not rows:
        return [(v, T) for T in seq_lens for v in variants]
    out = []
    for item in PRIORITY if rows == ["priority"] else rows:
        variant, _, T = item.partition("@")
        if variant not in VARIANTS or not T.isdigit():
            raise SystemExit(f"--rows: {item!r} is not VARIANT@T with VARIANT one of {VARIANTS}")
        out.append((variant, int(T)))
    return out


def predicted_seconds(done, T):
    """Wall time of a row at ``T`` from the rows measured so far: the slowest at this T, or the slowest
    at the nearest shorter T scaled by T^1.3 (attention grows faster than linearly); 0 if none."""
    same = [r["wall_s"] for r in done if r["T"] == T and "wall_s" in r]
    if same:
        return max(same)
    shorter = [r for r in done if r["T"] < T and "wall_s" in r]
    if not shorter:
        return 0.0
    t0 = max(r["T"] for r in shorter)
    return max(r["wall_s"] for r in shorter if r["T"] == t0) * (T / t0) ** 1.3


def main():
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default=None,
        help="'small' (CPU default), 'tiny' (the dry run), smollm2-135m-instruct (real weights) or a shipped "
        "name (GPU default llama-3-8b)",
    )
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="rows in run order, as VARIANT@T, or 'priority' (the GPU check's order); "
        "replaces --seq-lens and --variants",
    )
    ap.add_argument(
        "--deadline", type=float, default=None, help="seconds from the start: start no row predicted to end later"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--gpu-mem", default=None, help="cap the GPU memory this run may allocate, e.g. 24GB")
    ap.add_argument(
        "--one-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the model once and measure every variant in this process (GPU default: the "
        "CUDA peak resets exactly; CPU default is a process per variant)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an earlier run on the same machine that this run does not redo",
    )
    ap.add_argument(
        "--out", default=None, help="results path without extension (default bench/results/e2e_<model>_<device>)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = a.model or ("llama-3-8b" if device == "cuda" else "small")
    dtype = "bfloat16" if device == "cuda" else "float32"
    seq_lens = a.seq_lens or ([1024, 2048, 4096, 8192] if device == "cuda" else [256, 512, 1024])
    rows = parse_rows(a.rows, seq_lens, a.variants)
    steps = a.steps or (3 if device == "cuda" else 2)
    one_process = device == "cuda" if a.one_process is None else a.one_process
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    out = a.out or os.path.join(HERE, "results", f"e2e_{name}_{device}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    machine = dict(machine_info(device), device=device)
    result = {
        "commands": [command],
        "machine": machine,
        "model": name,
        "dtype": dtype,
        "steps": steps,
        "gpu_mem": a.gpu_mem,
        "rows": [],
    }
    if a.merge and os.path.isfile(out + ".json"):
        with open(out + ".json") as f:
            old = json.load(f)
        same = (
            {k: old.get(k) for k in ("model", "dtype", "steps", "gpu_mem")}
            == {k: result[k] for k in ("model", "dtype", "steps", "gpu_mem")}
            and old["machine"].get("gpu") == machine.get("gpu")
            and old["machine"].get("cpu") == machine.get("cpu")
        )
        if not same:
            sys.exit(
                f"--merge: {out}.json was measured with other settings or on another machine; "
                "move it away or run without --merge"
            )
        redo = set(rows)
        result["rows"] = [r for r in old["rows"] if (r["variant"], r["T"]) not in redo]
        result["commands"] = [c for c in old.get("commands", [old.get("command")]) if c] + [command]
    if one_process:
        t0 = time.perf_counter()
        model = load_model(dict(device=device, dtype=dtype, model=name))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the full-precision weights, freed layer by layer while quantising
        result["model_build_s"] = round(time.perf_counter() - t0, 1)
        print(f"built {name} in memory ({dtype}, NF4) in {result['model_build_s']} s", flush=True)
        write_results(out, result)
        cap_gpu_memory(a.gpu_mem)
    done = []
    for variant, T in rows:
        left = a.deadline - (time.monotonic() - started) if a.deadline is not None else None
        need = predicted_seconds(done, T)
        if left is not None and need > left:
            row = {"variant": variant, "T": T, "skipped": f"time: needs ~{need:.0f} s, {max(left, 0):.0f} s left"}
        else:
            spec = dict(variant=variant, T=T, device=device, dtype=dtype, model=name, steps=steps, gpu_mem=a.gpu_mem)
            t0 = time.monotonic()
            row = measure(model, spec) if one_process else run_in_subprocess(spec)
            row["wall_s"] = round(time.monotonic() - t0, 1)
            done.append(row)
        plan = plan_for(name, variant, T, dtype)
        if plan is not None:
            row["plan_bytes"] = plan.total
            row["plan_phase"] = plan.phase
            if row.get("peak_bytes"):
                row["plan_over_measured"] = plan.total / row["peak_bytes"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_results(out, result)
    print(f"wrote {out}.json, {out}.md")


if __name__ == "__main__":
    main()
