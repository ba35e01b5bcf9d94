"""``SparsePOConfig`` + ``SparsePOTrainer``: compute_loss inside a transformers Trainer.

Single-process training (one GPU or the CPU). The mask network is trained beside the LoRA
adapter with its own learning rate and weight decay and saved next to it as
``mask_net.safetensors`` (+ ``mask_net.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import transformers

from .data import PreferenceCollator, PreferenceExample, tokenize_dataset
from .losses import LOSS_TYPES
from .masks import SparsePOMasks
from .objective import LossConfig, compute_loss

logger = logging.getLogger(__name__)

MASK_WEIGHTS = "mask_net.safetensors"
MASK_CONFIG = "mask_net.json"


@dataclass
class SparsePOConfig(transformers.TrainingArguments):
    """TrainingArguments plus the loss, mask and data options (defaults: the official code)."""

    loss_type: str = field(default="sparsepo", metadata={"help": f"one of {LOSS_TYPES}"})
    beta: float = 0.1
    alpha: float = 0.5
    label_smoothing: float = 0.0
    independent_masks: bool = False
    mask_on_reward: bool = True
    mask_on_kl: bool = True
    l1_reward: float = 0.0
    l1_kl: float = 0.0
    mask_init_std: float = 0.02
    mask_learning_rate: Optional[float] = field(default=None, metadata={"help": "default: learning_rate"})
    mask_weight_decay: float = 0.01
    mapo_mapping: str = "zn_rescale"
    max_length: int = 512
    max_prompt_length: int = 256
    chunk_size: Optional[int] = None
    strict_data: bool = False
    remove_unused_columns: bool = False  # our examples are dataclasses, not column dicts

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")


def save_masks(masks: SparsePOMasks, out_dir: str) -> None:
    """Mask net weights (safetensors) and its shape/options (JSON), beside the adapter."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    net = masks.reward_net if masks.independent else masks.common_net
    meta = {"num_layers": net.layer_weight.shape[0], "hidden_size": net.layer_weight.shape[1],
            "independent": masks.independent, "eps": net.norm.eps}
    save_file({k: v.detach().cpu().contiguous() for k, v in masks.state_dict().items()},
              os.path.join(out_dir, MASK_WEIGHTS))
    with open(os.path.join(out_dir, MASK_CONFIG), "w") as f:
        json.dump(meta, f, indent=1)


def load_masks(path: str) -> SparsePOMasks:
    """Inverse of :func:`save_masks` (no pickle: safetensors + JSON)."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, MASK_CONFIG), os.path.join(path, MASK_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no saved mask network: {p} is missing")
    with open(cfg_path) as f:
        meta = json.load(f)
    masks = SparsePOMasks(meta["num_layers"], meta["hidden_size"], independent=meta["independent"], eps=meta["eps"])
    masks.load_state_dict(load_file(w_path))
    return masks


class _ZeroMaskGrads(transformers.TrainerCallback):
    """The Trainer zeroes gradients with ``model.zero_grad()``, which cannot see the mask nets
    (they live outside the peft model); without this their gradients would pile up across steps."""

    def __init__(self, masks: SparsePOMasks):
        self.masks = masks

    def on_train_begin(self, args, state, control, **kwargs):
        self.masks.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):  # after optimizer.step()
        self.masks.zero_grad(set_to_none=True)


class SparsePOTrainer(transformers.Trainer):
    """Trains a (peft) causal LM with a loss of the family; the reference is the adapter-off base.

    ``train_dataset``/``eval_dataset``: rows (a file path, a ``datasets`` dataset or a list of
    dicts in TRL's preference formats) or already tokenised :class:`PreferenceExample` lists.
    Bad rows are skipped and reported (``self.data_reports``), or raise with ``strict_data``.
    """

    def __init__(self, model, args: SparsePOConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 masks: Optional[SparsePOMasks] = None, ref_model=None, **kwargs):
        if processing_class is None:
            raise ValueError("SparsePOTrainer needs the tokenizer as processing_class")
        self.data_reports = {}
        train_dataset = self._tokenized(train_dataset, processing_class, args, "train")
        eval_dataset = self._tokenized(eval_dataset, processing_class, args, "eval")
        if args.loss_type == "sparsepo" and masks is None:
            transformers.set_seed(args.seed)  # the mask init is part of the run: same seed, same run
            masks = SparsePOMasks.for_model(model, independent=args.independent_masks, init_std=args.mask_init_std)
        self.masks = masks
        self.loss_config = LossConfig(
            loss_type=args.loss_type, beta=args.beta, alpha=args.alpha, label_smoothing=args.label_smoothing,
            masks=masks, mask_on_reward=args.mask_on_reward, mask_on_kl=args.mask_on_kl,
            l1_reward=args.l1_reward, l1_kl=args.l1_kl, mapo_mapping=args.mapo_mapping, ref_model=ref_model,
            chunk_size=args.chunk_size)
        pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else processing_class.eos_token_id
        kwargs.setdefault("data_collator", PreferenceCollator(pad))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if self.masks is not None:
            self.masks.to(self.args.device)
            self.add_callback(_ZeroMaskGrads(self.masks))
        self.model_accepts_loss_kwargs = False  # our loss is a mean over pairs: let GA divide it
        self._stored: Dict[str, Dict[str, List[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.skipped_steps = 0

    def _tokenized(self, data, tok, args, split):
        if data is None or (isinstance(data, list) and data and isinstance(data[0], PreferenceExample)):
            return data
        examples, report = tokenize_dataset(data, tok, max_length=args.max_length,
                                            max_prompt_length=args.max_prompt_length, strict=args.strict_data)
        self.data_reports[split] = report
        if report.dropped or report.truncated:
            logger.warning("%s data: %s", split, report.summary())
        return examples

    # --- optimisation ---------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
        ]
        if self.masks is not None:
            lr = self.args.mask_learning_rate or self.args.learning_rate
            mask_w = [p for n, p in self.masks.named_parameters() if n.endswith(("layer_weight", "mixer"))]
            mask_rest = [p for n, p in self.masks.named_parameters() if not n.endswith(("layer_weight", "mixer"))]
            groups += [{"params": mask_w, "weight_decay": self.args.mask_weight_decay, "lr": lr},
                       {"params": mask_rest, "weight_decay": 0.0, "lr": lr}]
        groups = [g for g in groups if g["params"]]
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # --- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = compute_loss(self.accelerator.unwrap_model(model), inputs, self.loss_config)
        split = "train" if model.training else "eval"
        for k, v in metrics.items():
            self._stored[split][k].append(v)
        return (loss, metrics) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if not torch.isfinite(loss):
            # Never backpropagate a NaN/inf: it would corrupt the adapter and the optimizer state.
            self.skipped_steps += 1
            self._stored["train"]["skipped_steps"].append(float(self.skipped_steps))
            logger.warning("step %d: non-finite loss %s, micro-batch skipped (%d so far)",
                           self.state.global_step, loss.item(), self.skipped_steps)
            return torch.zeros((), device=loss.device)
        loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            model.eval()
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for k, vals in self._stored[split].items():
            if vals and k != "loss":
                logs[prefix + k] = vals[-1] if k == "skipped_steps" else sum(vals) / len(vals)
        self._stored[split].clear()
        super().log(logs, start_time)

    # --- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.masks is not None:
            save_masks(self.masks, output_dir)
        for split, report in self.data_reports.items():
            with open(os.path.join(output_dir, f"data_report_{split}.json"), "w") as f:
                json.dump({"total": report.total, "kept": report.kept, "truncated": report.truncated,
                           "dropped": report.dropped}, f, indent=1)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.masks is not None:
            self.masks.load_state_dict(load_masks(resume_from_checkpoint).state_dict())
            self.masks.to(self.args.device)
