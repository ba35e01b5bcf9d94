"""Reading back a training run directory (what ``sparsepo-lite train`` writes).

A run directory holds ``adapter_model.safetensors`` + ``adapter_config.json`` (peft),
``mask_net.safetensors`` + ``mask_net.json`` (SparsePO), ``sparsepo_config.yaml`` (the resolved
config) and ``metrics.json``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

from ..masks import SparsePOMasks


def run_config(run_dir: str) -> dict:
    """The run's resolved config (``sparsepo_config.yaml``) as a dict."""
    import yaml

    from ..training.config import RUN_CONFIG

    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a sparsepo-lite run directory: {path} is missing")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or not cfg.get("model_name_or_path"):
        raise ValueError(f"{path}: no model_name_or_path")
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

    cfg = run_config(run_dir)
    adapter = os.path.join(run_dir, "adapter_model.safetensors")
    if not os.path.isfile(adapter):
        raise FileNotFoundError(f"{adapter} is missing (did the run finish?)")
    model_cfg = ModelConfig.from_dict(cfg, gradient_checkpointing=False, device="cpu" if cfg.get("use_cpu") else None)
    model, tok = load_policy(model_cfg)
    result = set_peft_model_state_dict(model, load_file(adapter))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter}: weights that do not fit this model: {result.unexpected_keys[:5]}")
    model.eval()
    masks = None
    if os.path.isfile(os.path.join(run_dir, MASK_WEIGHTS)):
        masks = load_masks(run_dir).to(model.device)
    return model, tok, masks, cfg
