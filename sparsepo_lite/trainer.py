"""``SparsePOConfig`` + ``SparsePOTrainer``: compute_loss inside a transformers Trainer.

One process, or several under ``accelerate launch`` / ``torchrun`` (data parallel). The mask
network is trained beside the LoRA adapter with its own learning rate and weight decay and saved
next to it as ``mask_net.safetensors`` (+ ``mask_net.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import transformers

from .data import PreferenceCollator, PreferenceExample, tokenize_dataset
from .losses import LOSS_TYPES
from .masks import SparsePOMasks
from .modeling import ModelConfig, load_policy
from .objective import LossConfig, compute_loss
from .ref_cache import CachedExample, CachedReferenceCollator, RefCache, run_fingerprint

logger = logging.getLogger(__name__)

MASK_WEIGHTS = "mask_net.safetensors"
MASK_CONFIG = "mask_net.json"


@dataclass
class SparsePOConfig(transformers.TrainingArguments):
    """TrainingArguments plus the loss, mask, data and model options (loss defaults: the official code).

    The model fields are what :class:`~sparsepo_lite.modeling.ModelConfig` takes; they are used
    when ``SparsePOTrainer`` gets ``model`` as a path or name (or None: ``model_name_or_path``).
    """

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
    ref_cache: Optional[str] = field(default=None, metadata={
        "help": "a `sparsepo-lite precompute-ref` directory: use it and run no reference forward"})
    remove_unused_columns: bool = False  # our examples are dataclasses, not column dicts
    # --- the policy (see modeling.ModelConfig) ---
    model_name_or_path: Optional[str] = None
    quantization: str = field(default="4bit", metadata={"help": "4bit (NF4 QLoRA) or none"})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    attn_implementation: Optional[str] = None
    use_liger: Optional[bool] = None

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        self.model_config(self.model_name_or_path or "")  # validates the model fields now, not at load time

    def model_config(self, model_name_or_path: Optional[str] = None) -> ModelConfig:
        """The :class:`ModelConfig` these fields describe (gradient checkpointing as configured here)."""
        targets = self.lora_target_modules
        targets = "all-linear" if list(targets) == ["all-linear"] else tuple(targets)
        return ModelConfig(model_name_or_path or self.model_name_or_path, quantization=self.quantization,
                           dtype=self.dtype, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                           lora_dropout=self.lora_dropout, lora_target_modules=targets,
                           gradient_checkpointing=self.gradient_checkpointing,
                           attn_implementation=self.attn_implementation, use_liger=self.use_liger)


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


class _MaskNetSync(transformers.TrainerCallback):
    """The mask nets live outside the model the Trainer (and DDP) manage, so two of its duties are
    done here: zeroing their gradients after each step (``model.zero_grad()`` cannot see them; they
    would pile up across steps) and broadcasting rank 0's weights at the start of a
    multi-process run."""

    def __init__(self, masks: SparsePOMasks):
        self.masks = masks

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        self.masks.zero_grad(set_to_none=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.masks.parameters():
                dist.broadcast(p.data, src=0)

    def on_step_end(self, args, state, control, **kwargs):  # after optimizer.step()
        self.masks.zero_grad(set_to_none=True)


def all_reduce_mean_(params: List[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` over all processes, in place, one collective per dtype.

    Every rank must take part with the same tensors in the same order, so a missing gradient
    (a parameter that got none on this rank, or a skipped non-finite micro-batch) counts as zeros.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype[p.grad.dtype].append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


class SparsePOTrainer(transformers.Trainer):
    """Trains a (peft) causal LM with a loss of the family; the reference is the adapter-off base.

    ``model``: a peft model (from :func:`load_policy`), or a path/name (None: the config's
    ``model_name_or_path``) loaded with the config's model fields; the tokenizer comes with it.
    ``train_dataset``/``eval_dataset``: rows (a file path, a ``datasets`` dataset or a list of
    dicts in TRL's preference formats) or already tokenised :class:`PreferenceExample` lists.
    Bad rows are skipped and reported (``self.data_reports``), or raise with ``strict_data``.
    """

    def __init__(self, model=None, args: SparsePOConfig = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, masks: Optional[SparsePOMasks] = None, ref_model=None, **kwargs):
        if args is None:
            raise ValueError("SparsePOTrainer needs args=SparsePOConfig(...)")
        if model is None or isinstance(model, str):
            if not (model or args.model_name_or_path):
                raise ValueError("no model: pass model= or set model_name_or_path in the config")
            transformers.set_seed(args.seed)  # the LoRA init draws from the global RNG
            model, tok = load_policy(args.model_config(model))
            processing_class = processing_class or tok
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
        self.ref_cache = None
        if args.ref_cache:
            if ref_model is not None:
                raise ValueError("pass either ref_model or args.ref_cache, not both")
            self.ref_cache = RefCache(args.ref_cache)
            splits = {name: data for name, data in (("train", train_dataset), ("eval", eval_dataset)) if data}
            self.ref_cache.check_run(run_fingerprint(model, processing_class, splits, model_name=args.model_name_or_path,
                                                     max_length=args.max_length,
                                                     max_prompt_length=args.max_prompt_length))
            train_dataset = [CachedExample(e, "train") for e in train_dataset] if train_dataset else train_dataset
            eval_dataset = [CachedExample(e, "eval") for e in eval_dataset] if eval_dataset else eval_dataset
            kwargs.setdefault("data_collator", CachedReferenceCollator(pad, self.ref_cache))
        kwargs.setdefault("data_collator", PreferenceCollator(pad))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if self.masks is not None:
            self.masks.to(self.args.device)
            self.add_callback(_MaskNetSync(self.masks))
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

    def _trained_parameters(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _sync_gradients(self) -> None:
        # compute_loss runs the unwrapped model (it needs the backbone and the head separately),
        # so DDP's forward, and with it the reducer's gradient hooks, never runs: the gradients
        # of everything the optimizer updates (LoRA and mask nets) are averaged here instead.
        if self.accelerator.num_processes > 1:
            all_reduce_mean_(self._trained_parameters())

    # The Trainer calls exactly one of these two per optimizer step, after the last micro-batch
    # and before optimizer.step(): the place to sync, and then to clip (or measure) the global
    # norm over all trained parameters, mask nets included.
    def _clip_grad_norm(self, model):
        self._sync_gradients()
        return self.accelerator.clip_grad_norm_(self._trained_parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            self._sync_gradients()
            grad_norm = self.accelerator.clip_grad_norm_(self._trained_parameters(), float("inf"))
        return grad_norm

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
        if not self.args.should_save:  # the Trainer may call _save on every rank; files come from one
            return
        os.makedirs(output_dir, exist_ok=True)
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
