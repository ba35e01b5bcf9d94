"""The memory planner: shipped configs, exact parameter/state sizes, fit search, measured peaks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
import transformers

from sparsepo_lite.cli import main as cli_main
from sparsepo_lite.masks import SparsePOMasks
from sparsepo_lite.memory_plan import (
    TRAINED_BYTES_PER_PARAM,
    GiB,
    ModelShape,
    load_shape,
    max_seq_len,
    parse_bytes,
    plan_memory,
    shipped_models,
)
from sparsepo_lite.models import ModelConfig, load_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = {
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_build_the_published_models(name):
    from accelerate import init_empty_weights

    with open(shipped_models()[name]) as f:
        cfg = transformers.AutoConfig.for_model(**json.load(f))
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == PUBLISHED[name]
    assert load_shape(name).num_params() == n


def test_hub_names_and_files_resolve(tmp_path):
    assert load_shape("meta-llama/Meta-Llama-3-8B-Instruct").name == "llama-3-8b"
    assert load_shape("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 1000,
            }
        )
    )
    assert load_shape(str(tmp_path)).kv_heads == 4
    with pytest.raises(ValueError, match="llama-3-8b"):  # the error lists what is shipped
        load_shape("gpt-5")
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="missing"):
        load_shape(str(tmp_path / "bad.json"))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A Llama whose projections are 4-bit quantizable in whole blocks, random weights."""
    cfg = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    d = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d), ModelShape.from_config(cfg.to_dict(), "small")


def test_persistent_parts_equal_the_loaded_model(small_dir):
    folder, shape = small_dir
    model, _ = load_policy(ModelConfig(folder, lora_r=8, dtype="float32"), tokenizer=False)
    plan = plan_memory(shape, 256, loss="sparsepo", lora_r=8, dtype="float32")
    qbytes = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            qbytes += m.weight.numel() + qs.absmax.numel() * qs.absmax.element_size()
            qbytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    assert plan.parts["4-bit linear weights"] == pytest.approx(qbytes, rel=0.01)
    other = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if p.dtype != torch.uint8 and "lora_" not in n
    )
    assert plan.parts["embeddings, head, norms"] == other
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.parts["LoRA + AdamW states"] == lora * TRAINED_BYTES_PER_PARAM
    masks = SparsePOMasks.for_model(model)
    assert plan.parts["mask net + AdamW states"] == sum(p.numel() for p in masks.parameters()) * TRAINED_BYTES_PER_PARAM
    indp = plan_memory(shape, 256, loss="sparsepo", lora_r=8, dtype="float32", independent_masks=True)
    assert indp.parts["mask net + AdamW states"] == 2 * plan.parts["mask net + AdamW states"]


@pytest.mark.slow
@pytest.mark.parametrize("variant,T", [("op_tdpo2_online", 768), ("op_sparsepo_cached", 640)])
def test_plan_within_10_percent_of_a_measured_cpu_peak(variant, T, tmp_path):
    """One real training step (4-bit small Llama, fp32 on the CPU) measured in its own process."""
    spec = dict(variant=variant, T=T, device="cpu", dtype="float32", steps=1, model="small")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_e2e
    finally:
        sys.path.pop(0)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_e2e.py"), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    plan = bench_e2e.plan_for("small", variant, T, "float32")
    assert plan.total == pytest.approx(row["peak_bytes"], rel=0.10), (plan.table(), row)


def test_budget_search_and_phases():
    shape = load_shape("llama-3-8b")
    t = max_seq_len(shape, parse_bytes("24GB"), loss="tdpo2", prompt_frac=0.25)
    assert t % 256 == 0 and t > 0
    assert plan_memory(shape, t, loss="tdpo2", prompt_len=t // 4).fits(24 * GiB)
    assert not plan_memory(shape, t + 256, loss="tdpo2", prompt_len=(t + 256) // 4).fits(24 * GiB)
    assert max_seq_len(shape, parse_bytes("16GB"), loss="tdpo2", prompt_frac=0.25) < t
    assert max_seq_len(shape, parse_bytes("4GB")) == 0  # the weights alone do not fit
    # a cache removes the reference forward; the plan grows with T and never shrinks
    online = plan_memory(shape, 4096, loss="tdpo2")
    cached = plan_memory(shape, 4096, loss="tdpo2", reference="topk")
    assert cached.phase_totals["reference"] == 0 < online.phase_totals["reference"]
    assert plan_memory(shape, 8192, loss="tdpo2").total > online.total


def test_bad_settings_are_refused():
    shape = load_shape("mistral-7b-v0.3")
    with pytest.raises(ValueError, match="label-only cache serves DPO only"):
        plan_memory(shape, 1024, loss="sparsepo", reference="label")
    with pytest.raises(ValueError, match="label-only cache serves DPO only"):  # top-0 is label-only
        plan_memory(shape, 1024, loss="sparsepo", reference="topk", top_k=0)
    with pytest.raises(ValueError, match="loss must be"):
        plan_memory(shape, 1024, loss="orpo")
    with pytest.raises(ValueError, match="prompt_len"):
        plan_memory(shape, 1024, prompt_len=1024)
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")
    assert parse_bytes("24GB") == parse_bytes("24 GiB") == 24 * GiB
    for kw, message in (
        (dict(seq_len=0), "seq_len must be >= 1, got 0"),
        (dict(top_k=-1), "top_k must be >= 0, got -1"),
        (dict(tail_samples=-4), "tail_samples must be >= 0, got -4"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            plan_memory(shape, **{"seq_len": 1024, "reference": "topk", **kw})
    with pytest.raises(ValueError, match="prompt_frac must be finite, got nan"):
        max_seq_len(shape, 24 * GiB, prompt_frac=float("nan"))


def test_a_mixture_of_experts_config_is_refused_not_planned_as_a_dense_model(tmp_path):
    """Mixtral-8x7B (46.7B parameters) shares Mistral-7B's dense shapes: planned as one, its 4-bit
    weights came to 3.35 GiB where its experts alone need about 21."""
    for config, field in (
        (transformers.MixtralConfig(), "num_local_experts = 8"),
        (transformers.Qwen2MoeConfig(), "num_experts = 60"),
    ):
        with pytest.raises(ValueError, match=f"moe: a mixture-of-experts model \\({field}\\)"):
            ModelShape.from_config(config, name="moe")
    transformers.MixtralConfig().save_pretrained(tmp_path / "mixtral")
    with pytest.raises(SystemExit, match="mixtral: a mixture-of-experts model"):
        cli_main(["plan", "--model", str(tmp_path / "mixtral")])
    dense = transformers.Qwen2Config().to_dict()
    assert ModelShape.from_config({**dense, "num_experts": 1}).layers == dense["num_hidden_layers"]  # one is dense


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),  # not "the largest that fits": that is no flag
        (["--seq-len", "-100"], "--seq-len must be >= 1, got -100"),
        (["--reference", "topk", "--top-k", "-1"], "--top-k must be >= 0, got -1"),
        (["--reference", "topk", "--tail-samples", "-4"], "--tail-samples must be >= 0, got -4"),
        (["--prompt-frac", "nan"], "--prompt-frac must be finite, got nan"),
        (["--prompt-frac", "1.5"], "--prompt-frac must be < 1, got 1.5"),
        (["--prompt-frac", "-1"], "--prompt-frac must be >= 0, got -1.0"),
        (["--pairs", "0"], "--pairs must be >= 1, got 0"),
        (["--lora-r", "0"], "--lora-r must be >= 1, got 0"),
        (["--gpu-mem", "abc"], "--gpu-mem: not a memory size: 'abc'"),
    ],
)
def test_cli_plan_names_the_bad_flag_in_one_line(flags, message):
    with pytest.raises(SystemExit) as info:
        cli_main(["plan", "--model", "llama-3-8b", *flags])
    assert str(info.value.code).startswith(f"plan: {message}") and "\n" not in str(info.value.code)


def test_cli_plan(capsys):
    cli_main(["plan", "--model", "llama-3-8b", "--seq-len", "2048", "--loss", "tdpo2"])
    out = capsys.readouterr().out
    for part in (
        "4-bit linear weights",
        "embeddings, head, norms",
        "LoRA + AdamW states",
        "checkpointed activations",
        "largest T that fits",
        "chunk_size",
    ):
        assert part in out
    cli_main(["plan", "--model", "qwen2.5-7b", "--gpu-mem", "24GB", "--reference", "topk", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["max_seq_len"] == d["plan"]["seq_len"] > 0
    with pytest.raises(SystemExit, match="unknown model"):
        cli_main(["plan", "--model", "nope"])
