"""Memory planner: the peak memory of one training step, broken down, before loading anything.

``plan_memory`` models a step of this package's trainer (4-bit NF4 base + LoRA, gradient
checkpointing, SDPA attention on a padded batch, the chunked op for the loss) as three phases and
returns the largest:

- reference: the online reference forward (no grad; with SparsePO it keeps every layer's states);
- forward: layer checkpoints, the reference tensors the loss keeps, the op's chunk buffers;
- backward: the checkpoints plus one recomputed layer's saved activations and its gradients,
  the moment the backward pass recomputes the last layer.

Sizes are what ``torch.cuda.max_memory_allocated`` counts (tensors), not the CUDA context or the
allocator's cached blocks: ``fits`` keeps a reserve for those. Activations follow the Hugging Face
Llama/Mistral/Qwen2 code: RMSNorm saves an fp32 copy of its input, k and v are expanded to all
heads when a padding mask is present, the SwiGLU MLP saves four [tokens, intermediate] tensors.
With bf16 the trainer runs under autocast (``bf16: true``), so peft's fp32 LoRA weights add no
fp32 copies of their inputs. Shapes come from a Hugging Face config; the configs of common 7-8B
models ship in ``sparsepo_lite/model_configs`` (no weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

from .losses import LOSS_TYPES
from .refcache.format import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K
from .validation import check_number

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
GiB = 1 << 30
#: NF4 with double quantisation: 4 bits + an 8-bit absmax per 64 values + an fp32 absmax per 256 of those.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: LoRA and mask parameters: fp32 value, fp32 gradient, two fp32 AdamW moments.
TRAINED_BYTES_PER_PARAM = 16
#: Not in max_memory_allocated but on the card: CUDA context, cuBLAS workspace, allocator slack.
CUDA_RESERVE_BYTES = int(1.0 * GiB)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REFERENCES = ("online", "topk", "hidden", "label")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
#: The range of each numeric setting of a plan, for ``check_number``: one rule for the Python API
#: and the plan command's flags.
SETTING_RANGES = {
    "seq_len": dict(low=1, integer=True),
    "top_k": dict(low=0, integer=True),
    "tail_samples": dict(low=0, integer=True),
    "prompt_frac": dict(low=0, high=1, high_open=True),
    "pairs": dict(low=1, integer=True),
    "lora_r": dict(low=1, integer=True),
}


def check_setting(name: str, value, label: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming ``label`` (default ``name``) unless ``value`` is in the range
    ``SETTING_RANGES[name]``."""
    check_number(label or name, value, **SETTING_RANGES[name])


#: Config fields that give the experts per layer of a mixture-of-experts model (Mixtral, Qwen-MoE,
#: DeepSeek, DBRX).
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that set its training memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: Union[dict, "object"], name: str = "") -> "ModelShape":
        """From a Hugging Face config (a dict or a ``PretrainedConfig``) of a Llama-like model."""
        d = config if isinstance(config, dict) else config.to_dict()
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in d
        ]
        if missing:
            raise ValueError(f"{name or 'model config'}: not a Llama-like decoder config, missing {missing}")
        for key in MOE_FIELDS:  # a dense plan of its shared shapes would leave out nearly all its weights
            if isinstance(d.get(key), int) and not isinstance(d[key], bool) and d[key] > 1:
                raise ValueError(
                    f"{name or 'model config'}: a mixture-of-experts model ({key} = {d[key]}); the plan models "
                    "dense decoders only"
                )
        heads = d["num_attention_heads"]
        return cls(
            name=name or d.get("_name_or_path") or d.get("model_type", "model"),
            hidden=d["hidden_size"],
            intermediate=d["intermediate_size"],
            layers=d["num_hidden_layers"],
            heads=heads,
            kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            vocab=d["vocab_size"],
            tied=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("attention_bias", False)) or d.get("model_type") == "qwen2",
        )

    def linear_shapes(self) -> Dict[str, tuple]:
        """(in, out) of each projection of one layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, head, norms and biases: kept in the compute dtype."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return emb + self.layers * (2 * self.hidden + bias) + self.hidden

    def num_params(self) -> int:
        return self.linear_params() + self.other_params()


def shipped_models() -> Dict[str, str]:
    """Names of the configs shipped with the package -> their paths."""
    return {f[:-5]: os.path.join(CONFIG_DIR, f) for f in sorted(os.listdir(CONFIG_DIR)) if f.endswith(".json")}


def _alias(name: str) -> str:
    s = name.lower().split("/")[-1]
    s = re.sub(r"-(instruct|chat|hf|base)$", "", s)
    return s.replace("meta-llama-", "llama-").replace("meta-", "")


def config_path(model: str) -> str:
    """The config.json behind a shipped name (``llama-3-8b``, ``meta-llama/Meta-Llama-3-8B-Instruct``...),
    a config.json file, or a model folder holding one. Never downloads anything."""
    shipped = shipped_models()
    path = None
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
    elif os.path.isfile(model):
        path = model
    elif _alias(model) in shipped:
        path = shipped[_alias(model)]
    if path is None or not os.path.isfile(path):
        raise ValueError(f"unknown model {model!r}: give a config.json, a model folder, or one of {sorted(shipped)}")
    return path


def load_shape(model: str) -> ModelShape:
    """The shape of ``model`` (anything ``config_path`` takes)."""
    path = config_path(model)
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    return ModelShape.from_config(d, name=_alias(model) if _alias(model) in shipped_models() else model)


@dataclass
class MemoryPlan:
    """Bytes per part at the peak phase; ``total`` is their sum."""

    shape: ModelShape
    seq_len: int
    settings: dict
    chunk_size: int
    phase: str
    parts: Dict[str, int]
    phase_totals: Dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, budget_bytes: int, device: str = "cuda") -> bool:
        return self.total + (CUDA_RESERVE_BYTES if device == "cuda" else 0) <= budget_bytes

    def table(self) -> str:
        rows = [
            f"{self.shape.name}: T = {self.seq_len} per sequence, {self.settings['pairs']} pair(s), "
            f"loss {self.settings['loss']}, reference {self.settings['reference']}, {self.settings['dtype']}, "
            f"LoRA r = {self.settings['lora_r']}, chunk {self.chunk_size} tokens",
            "",
            f"peak in the {self.phase} phase:",
        ]
        width = max(len(k) for k in self.parts)
        for k, v in self.parts.items():
            rows.append(f"  {k:<{width}}  {v / GiB:7.2f} GiB")
        rows.append(f"  {'total':<{width}}  {self.total / GiB:7.2f} GiB")
        rows.append("phases: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in self.phase_totals.items()))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.shape),
            "seq_len": self.seq_len,
            "settings": self.settings,
            "chunk_size": self.chunk_size,
            "phase": self.phase,
            "parts": self.parts,
            "total": self.total,
            "phase_totals": self.phase_totals,
        }


def _lora_params(shape: ModelShape, r: int, targets: Union[str, Sequence[str]]) -> int:
    names = LINEARS if targets == "all-linear" or "all-linear" in targets else [t for t in targets if t in LINEARS]
    shapes = shape.linear_shapes()
    return shape.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def plan_memory(
    shape: ModelShape,
    seq_len: int,
    *,
    loss: str = "sparsepo",
    reference: str = "online",
    top_k: int = DEFAULT_TOP_K,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    pairs: int = 1,
    prompt_len: int = 0,
    lora_r: int = 16,
    lora_targets: Union[str, Sequence[str]] = "all-linear",
    dtype: str = "bfloat16",
    quantization: str = "4bit",
    independent_masks: bool = False,
    chunk_bytes: Optional[int] = None,
) -> MemoryPlan:
    """Peak memory of one training step at ``seq_len`` tokens per sequence (prompt + response).

    reference: "online" (the adapter-off base, run every step), or a cache from
    ``precompute-ref``: "topk" (k ids + log-probs and ``tail_samples`` tail draws), "hidden" (exact)
    or "label" (DPO only).
    prompt_len: prompt tokens per sequence; the rest are response tokens (the op's rows).
    """
    import torch

    from .ops import DEFAULT_CHUNK_BYTES, chunk_row_bytes, default_chunk_size

    if loss not in LOSS_TYPES:
        raise ValueError(f"loss must be one of {LOSS_TYPES}, got {loss!r}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if (reference == "label" or (reference == "topk" and top_k == 0)) and loss != "dpo":
        # a top-0 cache is a label-only one (precompute-ref writes it so, and training refuses it)
        raise ValueError(f"loss {loss!r} needs the reference distribution; a label-only cache serves DPO only")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if quantization not in ("4bit", "none"):
        raise ValueError(f"quantization must be '4bit' or 'none', got {quantization!r}")
    for name, value in (
        ("seq_len", seq_len),
        ("top_k", top_k),
        ("tail_samples", tail_samples),
        ("pairs", pairs),
        ("lora_r", lora_r),
    ):
        check_setting(name, value)
    if not 0 <= prompt_len < seq_len:
        raise ValueError(f"prompt_len must be in [0, seq_len), got {prompt_len} with seq_len {seq_len}")
    b = DTYPE_BYTES[dtype]
    s = 2 * pairs * seq_len  # token positions in the batch (chosen + rejected rows)
    n = 2 * pairs * (seq_len - prompt_len)  # response tokens: the op's rows
    h, i, L, q = shape.hidden, shape.intermediate, shape.layers, shape.heads * shape.head_dim
    sparsepo = loss == "sparsepo"
    # The online reference always goes through the op as hidden states (DPO too, for its label
    # log-probs); a hidden-state cache serves DPO its label log-probs only.
    exact = reference == "online" or (reference == "hidden" and loss != "dpo")

    # Persistent state.
    base = shape.linear_params() * (NF4_BYTES_PER_PARAM if quantization == "4bit" else b)
    parts = {
        "4-bit linear weights" if quantization == "4bit" else "linear weights": int(base),
        "embeddings, head, norms": shape.other_params() * b,
        "LoRA + AdamW states": _lora_params(shape, lora_r, lora_targets) * TRAINED_BYTES_PER_PARAM,
    }
    if sparsepo:
        mask_params = (2 if independent_masks else 1) * (L * h + L + L + 2 * h)
        parts["mask net + AdamW states"] = mask_params * TRAINED_BYTES_PER_PARAM
    persistent = sum(parts.values())
    dequant = i * h * b  # the largest 4-bit weight, dequantised for one matmul

    # The mask net's inputs: every layer's hidden states at the response tokens (the reference's
    # online, the policy's detached with a cache). Its LayerNorms are recomputed in backward.
    mask_inputs = L * n * h * b if sparsepo else 0

    # Reference forward, no grad: residual stream in and out, one MLP's three [s, I] temporaries.
    ref_phase = 0
    if reference == "online":
        kept = (L + 1) * s * h * b if sparsepo else s * h * b
        ref_phase = persistent + kept + (L * n * h * b if sparsepo else 0) + 2 * s * h * b + 3 * s * i * b + dequant

    # Policy forward (checkpointed) and the loss op.
    tdtype = getattr(torch, dtype)
    chunk_rows = default_chunk_size(n, shape.vocab, tdtype, exact, chunk_bytes or DEFAULT_CHUNK_BYTES)
    chunk_buf = chunk_rows * chunk_row_bytes(shape.vocab, tdtype, exact)
    checkpoints = L * s * h * b + s * h * (4 + b)  # layer inputs; final norm input (fp32) and output
    ref_tensors = {
        "online": n * h * b,
        "hidden": n * h * b,
        "topk": n * (4 + 6 * (top_k + tail_samples)),
        "label": n * 4,
    }[reference]
    op_saved = n * h * b + n * 16  # the gradient factor G [N, H] and per-token fp32 outputs
    forward_phase = persistent + checkpoints + mask_inputs + ref_tensors + n * h * b + chunk_buf + op_saved

    # Backward at the last layer: one layer recomputed with grad (its saved activations, per token),
    # then its gradients (three [s, I] and two [s, H] at once) and a dequantised weight.
    per_token = (h * 4 if b < 4 else 0) + h * b  # input RMSNorm: fp32 input copy, output
    per_token += 3 * q * b + q * b + q * b + 4 * shape.heads  # q, k, v (expanded), SDPA output, o_proj input, lse
    per_token += h * 4 + h * b  # residual sum (fp32 for the norm), norm output
    per_token += 4 * i * b  # gate, SiLU(gate), up, product
    per_token += 2 * lora_r * 4 * len(LINEARS)  # LoRA A outputs / B inputs
    layer = s * per_token
    grads = s * (3 * i + 2 * h) * b + dequant
    backward_phase = persistent + checkpoints + mask_inputs + op_saved + s * h * b + layer + grads

    phases = {"reference": ref_phase, "forward": forward_phase, "backward": backward_phase}
    peak = max(phases, key=phases.get)
    if peak == "reference":
        parts["reference forward (kept states + one layer)"] = ref_phase - persistent
    else:
        parts["checkpointed activations"] = checkpoints
        if mask_inputs:
            parts["mask-net inputs (all layers)"] = mask_inputs
        if peak == "forward":
            parts["reference tensors" + (" (cache batch)" if reference != "online" else "")] = ref_tensors
            parts["loss chunk buffers"] = chunk_buf
            parts["loss per-token tensors"] = n * h * b + op_saved
        else:
            parts["recomputed layer"] = layer
            parts["layer gradients + dequantised weight"] = grads
            parts["loss per-token tensors"] = op_saved + s * h * b
    settings = dict(
        loss=loss,
        reference=reference,
        top_k=top_k,
        tail_samples=tail_samples,
        pairs=pairs,
        prompt_len=prompt_len,
        lora_r=lora_r,
        dtype=dtype,
        quantization=quantization,
        independent_masks=independent_masks,
    )
    return MemoryPlan(
        shape,
        seq_len,
        settings,
        chunk_rows,
        peak,
        {k: int(v) for k, v in parts.items()},
        {k: int(v) for k, v in phases.items()},
    )


def max_seq_len(
    shape: ModelShape, budget_bytes: int, *, device: str = "cuda", step: int = 256, limit: int = 1 << 17, **kwargs
) -> int:
    """The largest T (a multiple of ``step``) whose plan fits ``budget_bytes``; 0 if none does.

    ``prompt_frac`` (default 0) sets each candidate's prompt length to that fraction of T; the
    other keyword arguments go to ``plan_memory``."""
    frac = kwargs.pop("prompt_frac", 0.0)
    check_setting("prompt_frac", frac)

    def fits(t: int) -> bool:
        return plan_memory(shape, t, prompt_len=int(t * frac), **kwargs).fits(budget_bytes, device)

    if not fits(step):
        return 0
    lo, hi = step, step
    while hi < limit and fits(hi * 2):
        hi *= 2
    lo, hi = hi, min(hi * 2, limit)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo if not fits(hi) else hi


def parse_bytes(text: str) -> int:
    """'24GB', '24GiB', '24 G', '16000MB' -> bytes (GB = GiB: cards are sold in GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (try 24GB)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)
