"""What the benchmarks share: the machine and package versions behind a result, the command line that
made it, and one sentiment-control experiment (train, paired evaluation, mask lift) as the frontier and
the mask study run it. Benchmarks are run as ``python bench/NAME.py``, which puts this folder on the
import path."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SENTIMENT_CONFIG = os.path.join(ROOT, "examples", "sentiment_smollm2.yaml")
SENTIMENT_EVAL = os.path.join(ROOT, "examples", "data", "sentiment_pairs.eval.jsonl")
_PACKAGES = ("transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel", "trl", "vadersentiment")


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """The machine, Python, torch and the packages a result depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: Dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import sparsepo_lite

        info["sparsepo_lite"] = sparsepo_lite.__version__
        info["extension"] = sparsepo_lite.HAVE_EXTENSION
    except ImportError:
        pass
    for name in _PACKAGES:
        try:
            info[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            info[name.replace("-", "_")] = None
    return info


def command_line() -> str:
    """How this benchmark was started, relative to the repository root."""
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def cli(*args: str, threads: Optional[int] = None) -> None:
    """Run ``sparsepo-lite ARGS`` in its own process from the repository root, with ``threads`` CPU
    threads (default: torch's); raise if it fails."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "sparsepo_lite.cli", *args], check=True, cwd=ROOT, env=env)


def _evaluated(path: str, prompts: int, samples: int) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        meta = json.load(f).get("meta", {})
    return meta.get("prompts") == prompts and meta.get("samples per prompt") == samples


def sentiment_run(
    run: str,
    overrides: Sequence[str],
    *,
    prompts: int = 58,
    samples: int = 2,
    lift_pairs: Optional[int] = 40,
    config: str = SENTIMENT_CONFIG,
    data_eval: str = SENTIMENT_EVAL,
    eval_loss: bool = False,
    threads: Optional[int] = None,
) -> Dict[str, object]:
    """Train the sentiment recipe with ``overrides`` into ``run`` (unless its adapter is there), then
    the paired evaluation on ``prompts`` held-out prompts x ``samples`` (unless done with the same
    numbers) and, for SparsePO runs with ``lift_pairs``, the mask lift on that many held-out pairs.

    Returns the evaluation summary, the training's final metrics (train loss; with ``eval_loss`` the
    held-out loss and reward accuracy) and the mask nets' last logged health (drift, dead share),
    and the lift. Everything already in ``run`` is reused, so an interrupted study resumes. Each step
    runs in its own process with ``threads`` CPU threads (default: torch's).
    """
    from sparsepo_lite.eval.sentiment import summarize

    if not os.path.isfile(os.path.join(run, "adapter_model.safetensors")):
        extra = [] if eval_loss else ["--eval_file", ""]
        cli(
            "train",
            config,
            *overrides,
            "--output_dir",
            run,
            "--overwrite_output_dir",
            "--eval_strategy",
            "no",
            *extra,
            threads=threads,
        )
    done = os.path.join(run, "sentiment_eval.json")
    if not _evaluated(done, prompts, samples):
        cli(
            "eval-sentiment",
            run,
            "--data",
            data_eval,
            "--prompts",
            str(prompts),
            "--samples",
            str(samples),
            threads=threads,
        )
    with open(done) as f:  # one summary formula for every run, however old its evaluation
        row: Dict[str, object] = dict(summarize(json.load(f)["samples"], samples).summary())
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    final, history = metrics["final"], metrics["log_history"]
    row["train_loss"] = final.get("train_loss")
    row["eval_loss"] = final.get("eval_loss")
    row["eval_reward_accuracy"] = final.get("eval_rewards/accuracies")
    row["skipped_steps"] = final.get("skipped_steps", 0)
    logged = [h for h in history if "mask/drift" in h and "loss" in h]
    if logged:
        row["mask"] = {
            "drift": logged[-1]["mask/drift"],
            "dead": logged[-1].get("mask/dead"),
            "dead_max": max(h.get("mask/dead", 0) for h in logged),
            "dead_pairs_max": max(h.get("mask/dead_pairs", 0) for h in logged),
            "mean": logged[-1].get("mask/mean"),
        }
    if lift_pairs and os.path.isfile(os.path.join(run, "mask_net.safetensors")):
        lift = os.path.join(run, "mask_lift.json")
        stale = not os.path.isfile(lift) or os.path.getmtime(lift) < os.path.getmtime(
            os.path.join(run, "adapter_model.safetensors")
        )
        if stale or json.load(open(lift)).get("pairs") != lift_pairs:
            cli("inspect-masks", run, "--data", data_eval, "--pairs", str(lift_pairs), threads=threads)
        with open(lift) as f:
            row["mask_lift"] = json.load(f)
    return row


def lift_cell(lift: Optional[dict]) -> str:
    """'1.25x [1.10, 1.41]' (95% bootstrap interval over pairs), or '-'."""
    if not lift:
        return "-"
    if lift["lift"] != lift["lift"]:  # NaN: no mask weight on other tokens (a collapsed, all-zero mask)
        return "n/a (mask 0)"
    return f"{lift['lift']:.2f}x [{lift['ci95'][0]:.2f}, {lift['ci95'][1]:.2f}]"


def markdown_header(title: str, commands: Sequence[str], machine: Dict[str, object]) -> List[str]:
    """The first lines of a result's Markdown: its title, the commands that made it and the machine."""
    return [
        f"# {title}",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in commands),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
    ]


def write_markdown(path: str, lines: List[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def eager_loss(model, batch, loss_type, masks, beta=0.1, alpha=0.5):
    """The loss of one pair the plain way, through [T, V] logits and log-softmax (the baseline the
    op's benchmarks compare with): DPO, TDPO1/2 or SparsePO; ``batch`` holds the chosen then the
    rejected row."""
    import torch
    import torch.nn.functional as F

    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=ids, attention_mask=att, output_hidden_states=loss_type == "sparsepo")
        lq = torch.log_softmax(ref.logits[:, :-1].float(), -1)
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    r = (tgt != -100).float()
    y = tgt.clamp_min(0)[..., None]
    delta = (lp.gather(-1, y) - lq.gather(-1, y)).squeeze(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    u = d = torch.ones_like(r)
    if loss_type == "sparsepo":
        resp = r.bool()
        m_u, m_d = masks([h[:, :-1][resp] for h in ref.hidden_states[1:]])
        u = torch.zeros_like(r).masked_scatter(resp, m_u)
        d = torch.zeros_like(r).masked_scatter(resp, m_d)
    s = (r * u * delta).sum(-1)
    k = (r * d * kl).sum(-1)
    if loss_type == "dpo":
        z = s[0] - s[1]
    elif loss_type == "tdpo2":
        z = s[0] - s[1] - alpha * (k[1] - k[0].detach())
    else:
        z = (s[0] + k[0]) - (s[1] + k[1])
    return -F.logsigmoid(beta * z)
