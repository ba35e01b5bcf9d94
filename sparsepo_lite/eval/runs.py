"""Reading back a training run directory (what ``sparsepo-lite train`` writes).

A run directory holds ``adapter_model.safetensors`` + ``adapter_config.json`` (peft),
``mask_net.safetensors`` + ``mask_net.json`` (SparsePO), ``sparsepo_config.yaml`` (the resolved
config), ``base_model.json`` (the checksums of the base it trained on) and ``metrics.json``.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Optional, Tuple

from ..masks import SparsePOMasks

logger = logging.getLogger(__name__)


def run_config(run_dir: str) -> dict:
    """The run's resolved config (``sparsepo_config.yaml``) as a dict."""
    from ..training.config import RUN_CONFIG, config_keys
    from ..validation import check_number, load_yaml

    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a sparsepo-lite run directory: {path} is missing")
    cfg = load_yaml(path) or {}
    if not isinstance(cfg, dict) or not cfg.get("model_name_or_path"):
        raise ValueError(f"{path}: no model_name_or_path")
    known = config_keys()
    for key in sorted(str(k) for k in set(cfg) - known):
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if near:  # a misspelt field: the run would be read with that field's default
            raise ValueError(f"{path}: unknown config key {key!r} (did you mean {near[0]!r}?)")
        # a field of another version (of this package or of transformers) that no reader uses
        logger.warning("%s: unknown config key %r ignored", path, key)
    # what the readers of a run use beyond the model fields (checked by ModelConfig when it loads)
    try:
        for name in ("max_length", "max_prompt_length"):
            check_number(name, cfg.get(name, 1), low=1, integer=True)
        check_number("beta", cfg.get("beta", 0.1), low=0, low_open=True)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return cfg


def load_run(run_dir: str) -> Tuple[object, object, Optional[SparsePOMasks], dict]:
    """(peft policy with the run's adapter, tokenizer, mask nets or None, config dict).

    The base is loaded as in training (4-bit unless the run said otherwise); the reference is
    the same model with the adapter disabled.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..masks import MASK_WEIGHTS, load_masks
    from ..models import ModelConfig, load_policy
    from ..refcache.fingerprint import BASE_MODEL_FILE, base_model_record, check_base_model
    from ..validation import check_finite_tensors, load_json

    cfg = run_config(run_dir)
    adapter = os.path.join(run_dir, "adapter_model.safetensors")
    if not os.path.isfile(adapter):
        raise FileNotFoundError(f"{adapter} is missing (did the run finish?)")
    model_cfg = ModelConfig.from_dict(cfg, gradient_checkpointing=False, device="cpu" if cfg.get("use_cpu") else None)
    _check_adapter_config(run_dir, model_cfg)
    model, tok = load_policy(model_cfg, cpu_load_guard=bool(cfg.get("cpu_load_guard", True)))
    base_file = os.path.join(run_dir, BASE_MODEL_FILE)
    if os.path.isfile(base_file):  # runs written before the record existed have none
        check_base_model(load_json(base_file), base_model_record(model, model_cfg.model_name_or_path), base_file)
    try:
        weights = load_file(adapter)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{adapter}: not a readable safetensors file ({exc})") from None
    check_finite_tensors(adapter, weights)
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # torch's report: a header, then one line per tensor, and no file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"{adapter}: weights that do not fit this model ({lines[-1] if lines else exc})") from None
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter}: weights that do not fit this model: {result.unexpected_keys[:5]}")
    # layers the run's configuration adapts but the file has nothing for would stay at their untrained start
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(
            f"{adapter}: no weights for {len(missing)} LoRA tensors of this run's layers (first {missing[0]}); "
            "the adapter is from a run with other lora_target_modules"
        )
    model.eval()
    masks = None
    if os.path.isfile(os.path.join(run_dir, MASK_WEIGHTS)):
        masks = load_masks(run_dir).to(model.device)
    return model, tok, masks, cfg


def _check_adapter_config(run_dir: str, model_cfg) -> None:
    """The run's configuration and the adapter peft saved beside it must agree on the LoRA shape
    (an edited configuration would load the adapter with another scale)."""
    from ..validation import load_json

    path = os.path.join(run_dir, "adapter_config.json")
    if not os.path.isfile(path):
        return
    saved = load_json(path)
    for key, field in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if key in saved and saved[key] != getattr(model_cfg, field):
            raise ValueError(
                f"{run_dir}: {field} is {getattr(model_cfg, field)!r} in its configuration but "
                f"{saved[key]!r} in adapter_config.json; restore the run's configuration"
            )
