"""``SparsePOTrainer``: compute_loss inside a transformers Trainer.

One process, or several under ``accelerate launch`` / ``torchrun`` (data parallel). The mask
network is trained beside the LoRA adapter with its own learning rate and weight decay and saved
next to it as ``mask_net.safetensors`` (+ ``mask_net.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import transformers

from ..data import BadRow, PreferenceCollator, PreferenceExample, pad_id, tokenize_dataset
from ..errors import TrainingError
from ..masks import MASK_CONFIG, MASK_WEIGHTS, SparsePOMasks, load_masks, mapo_hook_points, save_masks
from ..models import (
    ModelConfig,
    any_dropout,
    check_logits_are_the_head,
    check_tokenizer,
    context_length,
    disable_avx512_bf16_repacking,
    dropout_sites,
    load_policy,
    load_tokenizer,
    rotary_positions,
    unwrap,
)
from ..objective import compute_loss, runs_in_shards
from ..refcache import CachedExample, CachedReferenceCollator, CacheError, RefCache, keys, run_fingerprint
from ..refcache.fingerprint import BASE_MODEL_FILE, base_model_record, check_base_model, examples_sha256
from ..validation import load_json
from ..waits import LoadGuard, cpu_load_guard
from .config import RUN_CONFIG, SparsePOConfig
from .distributed import all_reduce_mean_, gather_metric_totals
from .pair_threads import PairThreads, add_gradients, sharded_loss

logger = logging.getLogger(__name__)

#: The run's resolved TrainingArguments, as JSON: the Trainer's own copy (training_args.bin) is a
#: pickle, which a run folder must not hold (one shared or downloaded would ask to be unpickled).
TRAINING_ARGS_FILE = "training_args.json"
#: Files a run writes into its output_dir (replaced together by overwrite_output_dir).
RUN_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    MASK_WEIGHTS,
    MASK_CONFIG,
    RUN_CONFIG,
    "metrics.json",
    TRAINING_ARGS_FILE,
    BASE_MODEL_FILE,
    transformers.trainer.TRAINING_ARGS_NAME,  # written by earlier versions of the package
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "sentiment_eval.json",
    "sentiment_report.html",
    "masks.html",
    "mask_lift.json",
)
#: The start of the name of the hidden folder of output_dir that holds the run ``overwrite_output_dir``
#: replaces during the new run's first step. One left behind (the process was killed in that step)
#: holds the only copy of that run: training into the folder is then refused, naming it.
OLD_RUN_ASIDE = ".replaced-run"
#: A run ends with an error when more than this share of its optimizer steps was skipped.
MAX_SKIPPED_FRACTION = 0.5


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


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and write a probe file in it; raise :class:`TrainingError` if not
    possible (so a run finds out before its first step, not at its final save)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise TrainingError(f"output_dir {folder} is not writable ({exc.strerror or exc})") from None


def mask_drift(masks: SparsePOMasks, init: List[torch.Tensor]) -> float:
    """Relative distance of the mask nets' parameters from ``init``: ||theta - theta_0|| / ||theta_0||."""
    now = torch.cat([p.detach().float().flatten().cpu() for p in masks.parameters()])
    start = torch.cat([p.float().flatten().cpu() for p in init])
    return float((now - start).norm() / start.norm().clamp_min(1e-12))


def check_token_weights(loss_type: str, splits: Dict[str, Optional[List[PreferenceExample]]]) -> None:
    """Raise ``ValueError`` naming the first rows of ``splits`` (split name: examples) that carry
    token weights when ``loss_type`` cannot use them (tdpo2): found before the model loads, not at the
    first step."""
    if loss_type != "tdpo2":
        return
    for split, examples in splits.items():
        weighted = [e.index for e in examples or () if e.chosen_weights or e.rejected_weights]
        if weighted:
            raise ValueError(
                f"{split} rows {weighted[:5]} have token weights, which loss_type tdpo2 does not support "
                "(use tdpo1, dpo, sparsepo or mapo)"
            )


def check_lengths(config, splits: Dict[str, Optional[List[PreferenceExample]]], name: str) -> None:
    """Find the first row of ``splits`` (split name: examples) whose longer sequence (prompt and
    response) exceeds the model's context. With a learned position table, which fails mid-step with an
    index error, raise ``ValueError`` naming the split and row; with rotary positions, which run on
    (and rope scaling may stretch), log a warning."""
    limit = context_length(config)
    if limit is None:
        return
    rotary = rotary_positions(config)
    for split, examples in splits.items():
        for e in examples or ():
            n = len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))
            if n <= limit:
                continue
            where = f"{name}: {split} row {e.index} has {n} tokens but the model's context is {limit} (max_position_embeddings)"
            if not rotary:
                raise ValueError(f"{where}; lower max_length to {limit} or less")
            logger.warning(
                "%s: its rotary positions run past what it was trained on unless its rope scaling covers them", where
            )
            return


def _checkpoint_json(path: str):
    """A JSON file of a checkpoint to resume from, or :class:`TrainingError` naming it."""
    try:
        return load_json(path)
    except ValueError as exc:
        raise TrainingError(f"resume_from_checkpoint: {exc}") from None


class _RunConfigWriter(transformers.TrainerCallback):
    """At the first step (the optimizer made and everything of a checkpoint loaded, its random
    generators last): sets aside the run that ``overwrite_output_dir`` replaces and writes this run's
    configuration; once that step has ended, deletes the old run. A run that fails before (to
    start, or in its first step) gets the old run back from ``train``: its folder is as it was."""

    def __init__(self, trainer: "SparsePOTrainer"):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if args.should_save and not self.trainer._run_config_written:
            self.trainer.set_old_run_aside()
            self.trainer.write_run_config()
        self.trainer._run_config_written = True

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.drop_old_run()


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every element of every tensor (any shapes, floating dtypes, devices) is finite."""
    # One sum per tensor and one host sync (checking each of SmolLM2's 420 LoRA tensors took 14 ms a
    # step on the CPU, and a sync each on a GPU): a finite sum means every element is finite, since
    # an inf or NaN makes it inf or NaN. Only a sum that is not, which huge finite values can also
    # give by overflowing, is looked at element by element. The sums meet on the first tensor's
    # device, for a model split over several.
    if not tensors:
        return True
    with torch.no_grad():
        sums = [t.sum(dtype=torch.float32).to(tensors[0].device) for t in tensors]
        if bool(torch.stack(sums).isfinite().all()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)


#: Optimizer state entries that hold one value per parameter element (torch's and bitsandbytes'
#: optimizers), so they must end in the parameter's shape (AdEMAMix stacks two, as [2, *shape]);
#: the rest (steps, quantisation maps) need not.
PER_ELEMENT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "state1", "state2")


@contextlib.contextmanager
def checkpoint_errors(checkpoint: str, what: str, failure: str):
    """Raise what transformers' loading of part of a checkpoint raises (torch's or numpy's own
    errors: a KeyError for a scheduler state that is not one, an unpickling error that suggests
    turning safe loading off for a file holding code) as one :class:`TrainingError` naming the
    checkpoint and ``what`` it was loading; ``failure`` says how it failed."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise TrainingError(
            f"resume_from_checkpoint: {checkpoint}: its {what} holds objects other than tensors and plain "
            "values (refused without running them)"
        ) from exc
    except Exception as exc:
        raise TrainingError(
            f"resume_from_checkpoint: {checkpoint}: its {what} {failure} ({type(exc).__name__}: {exc})"
        ) from exc


def moment_fits(value: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether a per-element optimizer state (:data:`PER_ELEMENT_STATE`) is shaped for ``param``:
    its shape, or one leading dimension before it."""
    return value.dim() - param.dim() in (0, 1) and value.shape[value.dim() - param.dim() :] == param.shape


class _FiniteWeights(transformers.TrainerCallback):
    """After every optimizer step: stop the run if a trained weight (LoRA or mask net) is no longer
    finite, before a checkpoint or the final adapter could save it."""

    def __init__(self, trainer: "SparsePOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if not all_finite(self.trainer._trained_parameters()):
            raise TrainingError(
                f"step {state.global_step}: trained weights are no longer finite; lower the "
                "learning rate (the adapter was not saved)"
            )


class _CPULoadGuard(transformers.TrainerCallback):
    """Before every step on the CPU: one torch thread while other processes oversubscribe the cores,
    the usual count again once they have gone (:class:`~sparsepo_lite.waits.LoadGuard`); ``train``
    restores the count when training ends, however it ends."""

    def __init__(self, guard: LoadGuard):
        self.guard = guard

    def on_step_begin(self, args, state, control, **kwargs):
        self.guard.apply(f"step {state.global_step}")


def read_splits(tokenizer, args: SparsePOConfig, splits: Dict[str, object]):
    """Tokenise and check the rows of each split (a file path, a ``datasets`` dataset or a list of dicts)
    as training does; already tokenised :class:`PreferenceExample` lists and None pass through.

    Returns ``({split: examples}, {split: DataReport})``; bad rows are skipped and reported, or raise
    with ``args.strict_data``.
    """
    data, reports = {}, {}
    for split, rows in splits.items():
        if rows is None or (isinstance(rows, list) and rows and isinstance(rows[0], PreferenceExample)):
            data[split] = rows
            continue
        try:
            data[split], reports[split] = tokenize_dataset(
                rows,
                tokenizer,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                strict=args.strict_data,
            )
        except BadRow as exc:  # strict_data: the row number alone does not say which split's file
            where = f" ({os.fspath(rows)})" if isinstance(rows, (str, os.PathLike)) else ""
            raise BadRow(f"{split} data{where}: {exc}") from None
        if reports[split].dropped or reports[split].truncated:
            logger.warning("%s data: %s", split, reports[split].summary())
    return data, reports


def load_model(model_config: ModelConfig, args: SparsePOConfig):
    """The policy as training loads it: the training config owns gradient checkpointing and the
    device (as for any Trainer), and its seed draws the LoRA init."""
    model_config = dataclasses.replace(
        model_config,
        gradient_checkpointing=args.gradient_checkpointing,
        device="cpu" if args.use_cpu else model_config.device,
    )
    transformers.set_seed(args.seed)  # the LoRA init draws from the global RNG
    model, _ = load_policy(model_config, tokenizer=False, cpu_load_guard=args.cpu_load_guard)
    return model


class SparsePOTrainer(transformers.Trainer):
    """Trains a (peft) causal LM with a loss of the family; the reference is the adapter-off base.

    ``model``: a peft model (from :func:`load_policy`), or a path/name (None:
    ``model_config.model_name_or_path``) loaded with ``model_config`` (a
    :class:`~sparsepo_lite.models.ModelConfig`; default: its defaults); gradient checkpointing and
    the CPU follow ``args``. The tokenizer comes with a loaded model.
    ``train_dataset``/``eval_dataset``: rows (a file path, a ``datasets`` dataset or a list of
    dicts in TRL's preference formats) or already tokenised :class:`PreferenceExample` lists.
    Bad rows are skipped and reported (``self.data_reports``), or raise with ``strict_data``; the
    data is read and checked before the model loads. ``run_config``: what the run folder records as
    its configuration (default: the model config's and ``args.run_config()``).

    Each optimizer step whose gradient norm is not finite (or whose every micro-batch had a
    non-finite loss) is skipped and counted; logged and final losses average the steps that trained.
    ``train`` raises :class:`TrainingError` when more than half the steps were skipped or the trained
    weights stop being finite.
    """

    def __init__(
        self,
        model=None,
        args: SparsePOConfig = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        masks: Optional[SparsePOMasks] = None,
        ref_model=None,
        model_config: Optional[ModelConfig] = None,
        run_config: Optional[dict] = None,
        **kwargs,
    ):
        if args is None:
            raise ValueError("SparsePOTrainer needs args=SparsePOConfig(...)")
        load = model is None or isinstance(model, str)
        if load:
            model_config = model_config or ModelConfig()
            if model is not None:
                model_config = dataclasses.replace(model_config, model_name_or_path=model)
            if not model_config.model_name_or_path:
                raise ValueError("no model: pass model= or model_config=ModelConfig(model_name_or_path)")
            processing_class = processing_class or load_tokenizer(model_config.model_name_or_path)
        if processing_class is None:
            raise ValueError("SparsePOTrainer needs the tokenizer as processing_class")
        # what the run reads from disk: overwrite_output_dir may not delete any of it
        self._inputs = {
            f"{split} data": os.fspath(rows)
            for split, rows in (("train", train_dataset), ("eval", eval_dataset))
            if isinstance(rows, (str, os.PathLike))
        }
        data, self.data_reports = read_splits(processing_class, args, {"train": train_dataset, "eval": eval_dataset})
        train_dataset, eval_dataset = data["train"], data["eval"]
        check_token_weights(args.loss_type, {"train": train_dataset, "eval": eval_dataset})  # before the model loads
        if load:  # after the data: a bad file is found in seconds, not after loading a 16 GB model
            model = load_model(model_config, args)
        name = model_config.model_name_or_path if load else type(unwrap(model)).__name__
        if not load:  # load_policy did this to its own
            for lm in (model, ref_model):  # the reference pass would repack 4-bit CPU weights (no LoRA gradient)
                if lm is not None:
                    disable_avx512_bf16_repacking(lm)
            check_logits_are_the_head(model, name)
        check_tokenizer(model, processing_class, name)
        check_lengths(unwrap(model).config, {"train": train_dataset, "eval": eval_dataset}, name)
        if args.loss_type == "sparsepo" and masks is None:
            transformers.set_seed(args.seed)  # the mask init is part of the run: same seed, same run
            masks = SparsePOMasks.for_model(
                model, independent=args.independent_masks, init_std=args.mask_init_std, init=args.mask_init
            )
        if masks is not None and args.mask_learning_rate == 0:
            masks.requires_grad_(False)  # frozen at their init: the control that shows what training adds
        self.masks = masks
        self.loss_config = args.loss_config(masks=masks, ref_model=ref_model)
        if args.loss_type == "mapo" and args.mapo_mapping != "uniform" and not args.ref_cache:
            mapo_hook_points(ref_model if ref_model is not None else model, self.loss_config.mapo_hooks)
        pad = pad_id(processing_class)
        model_name = model_config.model_name_or_path if model_config is not None else None
        # the base the adapter trains on, recorded in the run and its checkpoints (one pass over the
        # weights); a model without an adapter trains its base, which then identifies nothing
        self.base_model = (
            base_model_record(model, model_name or unwrap(model).config.name_or_path)
            if hasattr(model, "peft_config")
            else None
        )
        self.ref_cache = None
        if args.ref_cache:
            if ref_model is not None:
                raise ValueError("pass either ref_model or args.ref_cache, not both")
            self.ref_cache = RefCache(args.ref_cache)
            splits = {name: data for name, data in (("train", train_dataset), ("eval", eval_dataset)) if data}
            self.ref_cache.check_run(
                run_fingerprint(
                    model,
                    processing_class,
                    splits,
                    model_name=model_name,
                    max_length=args.max_length,
                    max_prompt_length=args.max_prompt_length,
                    identity=self.base_model,
                )
            )
            missing = keys.shortfall(args.loss_type, args.mapo_mapping, keys.token_tensors(self.ref_cache.contents))
            if missing:  # now, not at the first batch (after an overwritten run is gone)
                raise CacheError(f"{args.ref_cache}: {missing}")
            if args.verify_ref_cache:  # a corrupt shard stops the run now, not at some later step
                self.ref_cache.verify(list(splits))
            train_dataset = [CachedExample(e, "train") for e in train_dataset] if train_dataset else train_dataset
            eval_dataset = [CachedExample(e, "eval") for e in eval_dataset] if eval_dataset else eval_dataset
            kwargs.setdefault("data_collator", CachedReferenceCollator(pad, self.ref_cache))
        kwargs.setdefault("data_collator", PreferenceCollator(pad))
        if args.should_save:
            check_writable(args.output_dir)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.masks is not None:
            self.masks.to(self.args.device)
            self.add_callback(_MaskNetSync(self.masks))
        self.add_callback(_FiniteWeights(self))
        self.add_callback(_RunConfigWriter(self))
        self.model_accepts_loss_kwargs = False  # our loss is a mean over pairs: let GA divide it
        self._stored: Dict[str, Dict[str, List[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if run_config is None:
            run_config = {**(model_config.to_dict() if model_config is not None else {}), **args.run_config()}
        self.run_config = run_config
        # the masks as they start (the drift is measured from here; a resumed run keeps its init)
        self._mask_init = None if masks is None else [p.detach().clone() for p in masks.parameters()]
        self._mask_warned = set()
        self._diverged = False  # the last optimizer step was skipped
        self.skipped_steps = 0
        self._micro_losses: List[float] = []  # finite micro-batch losses of the step in progress
        self._step_losses: List[float] = []  # mean loss of every step that trained, this train() call
        self._window: List[float] = []  # the same since the last log
        self._threads: Optional[PairThreads] = None  # made at the first batch that runs in shards
        self._load_guard: Optional[LoadGuard] = None  # set when training adds the CPU load guard

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
        if self._masks_train():
            lr = self.args.learning_rate if self.args.mask_learning_rate is None else self.args.mask_learning_rate
            mask_w = [p for n, p in self.masks.named_parameters() if n.endswith(("layer_weight", "mixer"))]
            mask_rest = [p for n, p in self.masks.named_parameters() if not n.endswith(("layer_weight", "mixer"))]
            groups += [
                {"params": mask_w, "weight_decay": self.args.mask_weight_decay, "lr": lr},
                {"params": mask_rest, "weight_decay": 0.0, "lr": lr},
            ]
        groups = [g for g in groups if g["params"]]
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _masks_train(self) -> bool:
        return self.masks is not None and self.args.mask_learning_rate != 0

    def _trained_parameters(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _sync_gradients(self) -> None:
        # compute_loss runs the unwrapped model (it needs the backbone and the head separately),
        # so DDP's forward, and with it the reducer's gradient hooks, never runs: the gradients
        # of everything the optimizer updates (LoRA and mask nets) are averaged here instead.
        if self.accelerator.num_processes > 1:
            all_reduce_mean_(self._trained_parameters())
        if self._masks_train():  # before clipping: how hard the loss pulls on the masks
            grads = [p.grad.detach().float().norm() for p in self.masks.parameters() if p.grad is not None]
            if grads:
                self._stored["train"]["mask/grad_norm"].append(float(torch.stack(grads).norm()))

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
        self._settle_step(grad_norm)
        return grad_norm

    def _settle_step(self, grad_norm) -> None:
        """Called once per optimizer step, just before ``optimizer.step()``: keep the step, or skip it
        by dropping every gradient (AdamW leaves a parameter without a gradient untouched)."""
        total, count = sum(self._micro_losses), len(self._micro_losses)
        self._micro_losses = []
        if self.accelerator.num_processes > 1:  # one decision on every rank
            t = torch.tensor([total, count], dtype=torch.float64, device=self.args.device)
            t = self.accelerator.reduce(t, reduction="sum")
            total, count = float(t[0]), int(t[1])
        if count and math.isfinite(float(grad_norm)):
            self._step_losses.append(total / count)
            self._window.append(total / count)
            self._diverged = False
            return
        self._diverged = True
        for p in self._trained_parameters():
            p.grad = None
        self.skipped_steps += 1
        logger.warning(
            "step %d skipped: %s (%d skipped so far)",
            self.state.global_step + 1,
            "gradient norm %s" % float(grad_norm) if count else "every micro-batch had a non-finite loss",
            self.skipped_steps,
        )

    # --- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = compute_loss(self.accelerator.unwrap_model(model), inputs, self.loss_config)
        self._store_metrics("train" if model.training else "eval", metrics)
        return (loss, metrics) if return_outputs else loss

    def _store_metrics(self, split: str, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self._stored[split][k].append(v)

    def _pair_threads(self, inputs, training: bool) -> Optional[PairThreads]:
        """The threads to run this batch's pairs on (``cpu_pair_threads``), or None to run it whole:
        off, not on the CPU, one torch thread (the load guard's single thread does not count: the
        shards keep the threads it had, and open no parallel region to wait in), one pair, a loss that
        cannot run in shards, a gradient scaler (fp16), which needs the whole loss, a
        ``compute_loss`` replaced by a subclass or on the instance, which the shards would bypass,
        or, in training, dropout (the shards would draw from the one random generator in an order
        that thread timing decides) or reentrant gradient checkpointing (no ``autograd.grad``)."""
        threads = self._load_guard.threads if self._load_guard is not None else torch.get_num_threads()
        replaced = type(self).compute_loss is not SparsePOTrainer.compute_loss or "compute_loss" in vars(self)
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        reentrant = self.args.gradient_checkpointing and (self.args.gradient_checkpointing_kwargs or {}).get(
            "use_reentrant", False
        )
        if (
            not self.args.cpu_pair_threads
            or replaced
            or self.args.device.type != "cpu"
            or threads < 2
            or not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.shape[0] < 4
            or self.accelerator.scaler is not None
            or not runs_in_shards(inputs, self.loss_config)
            or (training and (reentrant or any_dropout(self._dropout_sites)))
        ):
            return None
        if self._threads is None or self._threads.threads != threads:
            self._close_pair_threads()
            self._threads = PairThreads(threads)
        return self._threads

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's FLOP estimate (6 x input tokens x non-embedding parameters), with the
        parameter count taken once: the Trainer asks at every step, and counting walks every
        parameter (8 ms a step on SmolLM2)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        return 6 * inputs[main_input].numel() * self._parameter_count

    @functools.cached_property
    def _parameter_count(self) -> int:
        return self.model.num_parameters(exclude_embeddings=True)

    @functools.cached_property
    def _dropout_sites(self) -> list:
        """:func:`~sparsepo_lite.models.dropout_sites` of the model, found once: every step asks, and
        the model's modules do not change while it trains (the rates may, and are read each time)."""
        return dropout_sites(self.model)

    def _close_pair_threads(self) -> None:
        if self._threads is not None:
            self._threads.close()
            self._threads = None

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """``transformers.Trainer.evaluate``; ``eval_dataset`` may also be what the constructor takes
        (a file path, a ``datasets`` dataset or a list of dicts), tokenised as it does. With a
        reference cache, only the eval split it was made for can be evaluated."""
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._eval_examples(rows) for name, rows in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._eval_examples(eval_dataset)
        try:
            return super().evaluate(eval_dataset, *args, **kwargs)
        finally:  # a pool made here would otherwise idle until the process ends
            self._close_pair_threads()

    def _eval_examples(self, rows):
        """``rows`` passed to :meth:`evaluate`, as the collator takes them."""
        if isinstance(rows, str) and isinstance(self.eval_dataset, dict) and rows in self.eval_dataset:
            return rows  # the name of one of the constructor's eval sets
        if isinstance(rows, list) and rows and isinstance(rows[0], CachedExample):
            return rows
        examples = read_splits(self.processing_class, self.args, {"eval": rows})[0]["eval"]
        check_token_weights(self.args.loss_type, {"eval": examples})
        check_lengths(unwrap(self.model).config, {"eval": examples}, type(unwrap(self.model)).__name__)
        if self.ref_cache is None:
            return examples
        cached = self.ref_cache.fingerprint.get("data_sha256/eval")
        if examples_sha256(examples) != cached:
            raise ValueError(
                f"evaluate(eval_dataset=...): the reference cache {self.ref_cache.dir} "
                + (
                    "holds no eval split"
                    if cached is None
                    else "holds the eval split it was made for, and these rows differ"
                )
                + "; evaluate them with a trainer without ref_cache, or precompute a cache for them"
            )
        return [CachedExample(e, "eval") for e in examples]

    def predict(self, *args, **kwargs):
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._close_pair_threads()

    def _sharded_loss(self, threads: PairThreads, model, inputs, training: bool):
        """The batch's loss run in pair shards, its metrics stored. Each shard's thread enters the
        Trainer's autocast, and no_grad for evaluation: both are per thread."""

        def context():
            stack = contextlib.ExitStack()
            if not training:
                stack.enter_context(torch.no_grad())
            stack.enter_context(self.compute_loss_context_manager())
            return stack

        lm = self.accelerator.unwrap_model(model)
        sharded = sharded_loss(threads, lm, inputs, self.loss_config, context=context)
        self._store_metrics("train" if training else "eval", sharded.metrics)
        return sharded

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        threads = self._pair_threads(inputs, training=True)
        sharded = None
        if threads is None:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
        else:
            sharded = self._sharded_loss(threads, model, inputs, training=True)
            loss = sharded.loss
        if not torch.isfinite(loss):
            # Never backpropagate a NaN/inf: it would corrupt the adapter and the optimizer state.
            logger.warning("step %d: non-finite loss %s, micro-batch skipped", self.state.global_step + 1, loss.item())
            return torch.zeros((), device=loss.device)
        self._micro_losses.append(float(loss.detach()))
        if sharded is None:
            loss = loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(loss)
            return loss.detach()
        params = [p for p in self._trained_parameters() if p.requires_grad]
        add_gradients(threads, sharded, params, 1.0 / self.current_gradient_accumulation_steps)
        return loss / self.current_gradient_accumulation_steps

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        model.eval()
        threads = self._pair_threads(inputs, training=False)
        with torch.no_grad():
            if threads is None:
                loss = self.compute_loss(model, inputs)
            else:
                loss = self._sharded_loss(threads, model, inputs, training=False).loss
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        totals = {k: (sum(vals), len(vals)) for k, vals in self._stored[split].items() if vals and k != "loss"}
        if self.accelerator.num_processes > 1:  # each process holds its own shard's: average them all
            totals = gather_metric_totals(totals)
        for k, (total, count) in totals.items():
            logs[prefix + k] = total / count
        self._stored[split].clear()
        # The Trainer's own loss counts a skipped step as 0: report the mean over steps that trained.
        if "loss" in logs and split == "train":
            if self._window:
                logs["loss"] = sum(self._window) / len(self._window)
            else:
                del logs["loss"]
                logger.warning("every step since the last log was skipped (non-finite gradients or losses)")
            self._window = []
            logs["skipped_steps"] = self.skipped_steps
        if "train_loss" in logs:
            logs["train_loss"] = self._train_loss()
            logs["skipped_steps"] = self.skipped_steps
        if split == "train" and self.masks is not None and self._mask_init is not None:
            logs["mask/drift"] = mask_drift(self.masks, self._mask_init)
            self._warn_about_masks(logs)
        super().log(logs, start_time)

    def _warn_about_masks(self, logs) -> None:
        if logs.get("mask/dead_pairs") == 1.0 and "dead" not in self._mask_warned:
            self._mask_warned.add("dead")
            logger.warning(
                "the SparsePO masks were 0 on every token of every pair since the last log: no gradient "
                "reaches the policy and the ReLU units cannot recover (mask collapse); use mask_init: ones "
                "or a lower mask_learning_rate"
            )
        warmup = self.args.get_warmup_steps(self.state.max_steps) if self.state.max_steps else 0
        if (
            self._masks_train()
            and self.state.global_step > warmup
            and logs["mask/drift"] < 0.01
            and "still" not in self._mask_warned
        ):
            self._mask_warned.add("still")
            logger.warning(
                "the SparsePO mask nets have moved %.2f%% from their init after the warmup: they are "
                "not learning (raise mask_learning_rate)",
                100 * logs["mask/drift"],
            )

    def _guard_cpu_load(self) -> None:
        """Add the CPU load guard (once) where it can help: long spinning waits and more than one thread."""
        if not self.args.cpu_load_guard or self._load_guard is not None:
            return
        self._load_guard = cpu_load_guard()
        if self._load_guard is not None:
            self.add_callback(_CPULoadGuard(self._load_guard))

    def _train_loss(self) -> float:
        return sum(self._step_losses) / len(self._step_losses) if self._step_losses else float("nan")

    # --- the run folder, resuming, and how a run ends ---------------------------------------------
    def train(self, resume_from_checkpoint=None, **kwargs):
        """``transformers.Trainer.train``, after checking the output_dir (a non-empty one is refused
        unless ``overwrite_output_dir`` or resuming; it must be writable) and the checkpoint to
        resume from (it must hold its optimizer and scheduler state unless
        ``resume_fresh_optimizer``), and writing the run's configuration. Raises
        :class:`TrainingError` when the run cannot start or did not train (see the class doc)."""
        resume = self._checkpoint_to_resume(resume_from_checkpoint)
        self._old_run_files, self._old_run_aside, self._run_config_written = [], None, False
        self._on_main_then_all(lambda: self._prepare_output_dir(resume))
        self.skipped_steps, self._micro_losses, self._step_losses, self._window = 0, [], [], []
        self._mask_warned, self._diverged = set(), False
        if self.args.device.type == "cpu":
            from .. import OMP_WAIT_DECISION

            logger.info("CPU threads: %s", OMP_WAIT_DECISION)
            self._guard_cpu_load()
        try:
            out = super().train(resume_from_checkpoint=resume, **kwargs)
        except BaseException:
            self.restore_old_run()
            raise
        finally:
            self._close_pair_threads()
            if self._load_guard is not None:  # here, not in on_train_end, which a raising run skips
                self._load_guard.restore()
        steps = len(self._step_losses) + self.skipped_steps
        if steps and self.skipped_steps > MAX_SKIPPED_FRACTION * steps:
            raise TrainingError(
                f"{self.skipped_steps} of {steps} optimizer steps were skipped (non-finite gradients "
                "or losses): the run did not train; lower the learning rate or check beta and the data"
            )
        if self._diverged:
            raise TrainingError(
                "the last optimizer step was skipped (a non-finite loss or gradient): a run that ends there has "
                "diverged or ends on broken weights; lower the learning rate or check the data (the adapter was "
                "not saved)"
            )
        if self.state.global_step == 0:
            raise TrainingError("no optimizer step ran: check max_steps, num_train_epochs and the training data")
        return transformers.trainer_utils.TrainOutput(out.global_step, self._train_loss(), out.metrics)

    def _on_main_then_all(self, fn) -> None:
        """Run ``fn`` on the main process; if it raises, raise the same message on every process
        (a rank that raised alone would leave the others waiting at their next collective)."""
        error = None
        if self.args.should_save:
            try:
                fn()
            except TrainingError as exc:
                error = str(exc)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise TrainingError(error)

    def _checkpoint_to_resume(self, resume) -> Optional[str]:
        if resume is None or resume is False:
            return None
        if isinstance(resume, str) and resume.lower() == "true" and not os.path.exists(resume):
            resume = True  # --resume_from_checkpoint true: the last checkpoint of output_dir
        if resume is True:
            resume = self._last_complete_checkpoint()
        if not os.path.isfile(os.path.join(resume, transformers.trainer.TRAINER_STATE_NAME)):
            raise TrainingError(
                f"resume_from_checkpoint: {resume} is not a training checkpoint "
                f"({transformers.trainer.TRAINER_STATE_NAME} is missing)"
            )
        missing = [
            f
            for f in (transformers.trainer.OPTIMIZER_NAME, transformers.trainer.SCHEDULER_NAME)
            if not os.path.isfile(os.path.join(resume, f))
        ]
        if missing and not self.args.resume_fresh_optimizer:
            raise TrainingError(
                f"resume_from_checkpoint: {resume} has no {' or '.join(missing)}; resuming would "
                "restart the optimizer and end elsewhere than the interrupted run. Pass "
                "--resume_fresh_optimizer to accept that"
            )
        if missing:
            logger.warning("resuming from %s without %s: the optimizer starts afresh", resume, missing)
        self._check_checkpoint(resume, missing)
        return resume

    def _last_complete_checkpoint(self) -> str:
        """The output_dir's last ``checkpoint-N`` that holds its trainer state (written last): a later
        one cut off mid-save (a killed process) is passed over, with a warning naming it."""
        out = self.args.output_dir
        prefix = transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-"
        steps = sorted(
            (int(name[len(prefix) :]), os.path.join(out, name))
            for name in (os.listdir(out) if os.path.isdir(out) else [])
            if name.startswith(prefix) and name[len(prefix) :].isdigit() and os.path.isdir(os.path.join(out, name))
        )
        if not steps:
            raise TrainingError(f"resume_from_checkpoint: no checkpoint-* folder in {out}")
        complete = [
            path for _, path in steps if os.path.isfile(os.path.join(path, transformers.trainer.TRAINER_STATE_NAME))
        ]
        if not complete:
            return steps[-1][1]  # named as not a training checkpoint by the caller
        if steps[-1][1] != complete[-1]:
            logger.warning(
                "resume_from_checkpoint true: %s has no %s (cut off mid-save); resuming from %s",
                steps[-1][1],
                transformers.trainer.TRAINER_STATE_NAME,
                complete[-1],
            )
        return complete[-1]

    def _check_checkpoint(self, folder: str, missing) -> None:
        """A checkpoint must be readable and of this run: the same adapter shape and base, mask nets
        exactly when this run has them. Raises :class:`TrainingError` naming the file and field."""
        import zipfile

        from safetensors import safe_open

        def bad(name, why):
            raise TrainingError(f"resume_from_checkpoint: {os.path.join(folder, name)}: {why}")

        state = _checkpoint_json(os.path.join(folder, transformers.trainer.TRAINER_STATE_NAME))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            bad(transformers.trainer.TRAINER_STATE_NAME, "not a trainer state (no integer global_step)")
        # from a checkpoint at max_steps transformers would run one more step (it checks after a step);
        # at the end of its epochs it would run none and rewrite the run's files
        total = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        if total is not None and state["global_step"] >= total:
            raise TrainingError(
                f"resume_from_checkpoint: {folder} is at step {state['global_step']} and this run ends at step "
                f"{total} (max_steps, or num_train_epochs over this data): nothing is left to train; raise "
                "max_steps or num_train_epochs to train on"
            )
        # torch files are zip archives with a CRC per member: testzip reads them all, so a truncated or
        # bit-flipped optimizer, scheduler or RNG state is found here, not as garbage moments later
        torch_files = [
            n for n in (transformers.trainer.OPTIMIZER_NAME, transformers.trainer.SCHEDULER_NAME) if n not in missing
        ]
        torch_files += sorted(n for n in os.listdir(folder) if n.startswith("rng_state") and n.endswith(".pth"))
        for name in torch_files:
            path = os.path.join(folder, name)
            try:
                with zipfile.ZipFile(path) as archive:
                    damaged = archive.testzip()
            except (OSError, zipfile.BadZipFile) as exc:
                bad(name, f"not a complete torch file ({exc})")
            if damaged is not None:
                bad(name, f"damaged (its member {damaged} fails its checksum)")
        for name in ("adapter_model.safetensors", MASK_WEIGHTS):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                try:
                    with safe_open(path, framework="pt") as f:
                        list(f.keys())
                except Exception as exc:  # safetensors raises its own error types
                    bad(name, f"not a readable safetensors file ({exc})")
        peft_config = getattr(self.model, "peft_config", {}).get("default")
        config_path = os.path.join(folder, "adapter_config.json")
        if peft_config is not None and os.path.isfile(config_path):
            saved = _checkpoint_json(config_path)
            targets = peft_config.target_modules
            live = {
                "r": peft_config.r,
                "lora_alpha": peft_config.lora_alpha,
                "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
                "base_model_name_or_path": peft_config.base_model_name_or_path,
            }
            for key, value in live.items():
                old = saved.get(key)
                old = sorted(old) if isinstance(old, list) else old
                if old != value:
                    bad(
                        "adapter_config.json",
                        f"{key} is {old!r} there but {value!r} in this run; resume with "
                        "the checkpoint's model settings",
                    )
        has_masks = os.path.isfile(os.path.join(folder, MASK_WEIGHTS))
        if has_masks != (self.masks is not None):
            bad(
                MASK_WEIGHTS,
                f"{'present' if has_masks else 'missing'}, but this run "
                f"{'has no' if has_masks else 'has'} SparsePO mask nets (loss_type {self.args.loss_type}); resume "
                "with the checkpoint's loss settings",
            )
        if has_masks:
            try:
                saved_masks = load_masks(folder)
            except (OSError, ValueError) as exc:  # the message names the file
                raise TrainingError(f"resume_from_checkpoint: {exc}") from None
            mine = {k: tuple(v.shape) for k, v in self.masks.state_dict().items()}
            if {k: tuple(v.shape) for k, v in saved_masks.state_dict().items()} != mine:
                bad(MASK_WEIGHTS, "mask nets of another shape (independent_masks or the model differ)")
        self._check_same_objective(folder)
        base_file = os.path.join(folder, BASE_MODEL_FILE)
        if self.base_model is not None and os.path.isfile(base_file):
            try:
                check_base_model(_checkpoint_json(base_file), self.base_model, base_file)
            except ValueError as exc:
                raise TrainingError(f"resume_from_checkpoint: {exc}") from None

    def _check_same_objective(self, folder: str) -> None:
        """The checkpoint's recorded arguments (``training_args.json``, where present) must give the
        same loss and data as this run: a run resumed under another loss_type or beta would be no
        single run, and its record would claim the new values for all of it."""
        path = os.path.join(folder, TRAINING_ARGS_FILE)
        if not os.path.isfile(path):
            return
        saved = _checkpoint_json(path)
        mine = json.loads(self.args.to_json_string())
        unread = set(self.args.unread_settings())
        for name in self.args.objective_fields():
            if name not in unread and name in saved and name in mine and saved[name] != mine[name]:
                raise TrainingError(
                    f"resume_from_checkpoint: {path}: {name} is {saved[name]!r} there but {mine[name]!r} in "
                    "this run; resume with the checkpoint's settings, or start a new run"
                )

    def _prepare_output_dir(self, resume: Optional[str]) -> None:
        out = self.args.output_dir
        present = sorted(os.listdir(out)) if os.path.isdir(out) else []
        stale = [name for name in present if name.startswith(OLD_RUN_ASIDE)]
        if stale:  # the only copy of a run: neither overwritten nor resumed over
            raise TrainingError(
                f"output_dir {out} holds {stale[0]}, a run set aside by --overwrite_output_dir whose replacement "
                f"was killed in its first step: move the files in {os.path.join(out, stale[0])} back into {out} "
                "(replacing what is there), or delete the folder, then run again"
            )
        model_dir = getattr(unwrap(self.model).config, "name_or_path", None)
        if model_dir and os.path.isdir(model_dir) and os.path.realpath(model_dir) == os.path.realpath(out):
            raise TrainingError(f"output_dir {out} is the model's own folder; write the run elsewhere")
        if present and resume is not None:
            inside = os.path.commonpath([os.path.realpath(resume), os.path.realpath(out)]) == os.path.realpath(out)
            if not inside:
                raise TrainingError(
                    f"output_dir {out} is not empty and the checkpoint {resume} is not in it: resuming would mix "
                    "two runs; resume into the checkpoint's own run folder or an empty one"
                )
        if present and resume is None:
            if self.args.overwrite_output_dir and RUN_CONFIG not in present:
                raise TrainingError(
                    f"output_dir {out} is not empty and holds no {RUN_CONFIG}, so it is no sparsepo-lite run: "
                    "--overwrite_output_dir replaces runs only; choose an empty folder"
                )
            if not self.args.overwrite_output_dir:
                raise TrainingError(
                    f"output_dir {out} is not empty ({', '.join(present[:5])}"
                    f"{', ...' if len(present) > 5 else ''}): pass --overwrite_output_dir to replace "
                    "the run in it, or --resume_from_checkpoint to continue it"
                )
            # what a run writes, so nothing stale (an old mask net) outlives it; set aside only when
            # the first step begins and deleted when it ends, so a run that fails to start (a bad
            # optimizer setting, a checkpoint or device error) or in its first step leaves the old run
            self._old_run_files = [
                os.path.join(out, name)
                for name in present
                if name in RUN_FILES
                or name.startswith("data_report_")
                or (
                    name.startswith(transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-")
                    and os.path.isdir(os.path.join(out, name))
                )
            ]
            self._check_inputs_survive(self._old_run_files)
        check_writable(out)

    def _check_inputs_survive(self, replaced: List[str]) -> None:
        """Raise :class:`TrainingError` when something this run reads (the model, the tokenizer, the
        reference cache, a data file) lies in one of the ``replaced`` paths: a base model kept in the
        old run's ``checkpoint-*`` folder would be deleted after the first step."""
        inputs = {
            "the model": getattr(unwrap(self.model).config, "name_or_path", None),
            "the tokenizer": getattr(self.processing_class, "name_or_path", None),
            "the reference cache": self.args.ref_cache,
            **self._inputs,
        }
        for what, path in inputs.items():
            if not path or not os.path.exists(path):
                continue  # a hub name, or nothing on disk
            real = os.path.realpath(path)
            if real == os.path.realpath(self.args.output_dir):  # its tokenizer files would be replaced
                raise TrainingError(
                    f"--overwrite_output_dir would replace the files of {path}, {what} this run reads; move it "
                    "out of the output_dir first"
                )
            for old in replaced:
                if os.path.commonpath([real, os.path.realpath(old)]) == os.path.realpath(old):
                    raise TrainingError(
                        f"--overwrite_output_dir would delete {old}, which holds {what} this run reads ({path}); "
                        "move it out of the output_dir first"
                    )

    def set_old_run_aside(self) -> None:
        """Move the files of the run that ``overwrite_output_dir`` replaces (found by ``train``) into a
        new hidden folder of output_dir (renames: the same file system, no copy)."""
        if not self._old_run_files:
            return
        self._old_run_aside = tempfile.mkdtemp(prefix=OLD_RUN_ASIDE + "-", dir=self.args.output_dir)
        for path in self._old_run_files:
            try:
                os.replace(path, os.path.join(self._old_run_aside, os.path.basename(path)))
            except FileNotFoundError:  # another node's main process (save_on_each_node, shared disk) was first
                pass
        self._old_run_files = []

    def drop_old_run(self) -> None:
        """Delete the replaced run set aside at the first step (once that step has ended). A folder
        that will not go (a file held open on NFS) is left with a warning: the new run goes on."""
        aside, self._old_run_aside = self._old_run_aside, None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            if os.path.lexists(aside):
                logger.warning("could not delete %s (the replaced run); delete it by hand", aside)

    def restore_old_run(self) -> None:
        """Put the replaced run set aside back in place of what this run wrote (a run that failed in
        its first step)."""
        aside, self._old_run_aside = self._old_run_aside, None
        if aside is None:
            return
        for name in os.listdir(aside):
            path = os.path.join(self.args.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            os.replace(os.path.join(aside, name), path)
        os.rmdir(aside)

    def write_run_config(self) -> None:
        """Write the run's resolved configuration into output_dir (atomically). Called as the first
        step begins, after all of a checkpoint to resume from has loaded: a failed resume leaves the
        folder's configuration as it was."""
        import yaml

        path = os.path.join(self.args.output_dir, RUN_CONFIG)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.run_config, f, sort_keys=False)
        os.replace(tmp, path)

    # --- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:  # the Trainer may call _save on every rank; files come from one
            return
        os.makedirs(output_dir, exist_ok=True)
        pickled = os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_FILE), "w") as f:
            f.write(self.args.to_json_string())
        if self.base_model is not None:
            with open(os.path.join(output_dir, BASE_MODEL_FILE), "w") as f:
                json.dump(self.base_model, f, indent=1)
        if self.masks is not None:
            save_masks(self.masks, output_dir)
        for split, report in self.data_reports.items():
            with open(os.path.join(output_dir, f"data_report_{split}.json"), "w") as f:
                json.dump(
                    {
                        "total": report.total,
                        "kept": report.kept,
                        "truncated": report.truncated,
                        "dropped": report.dropped,
                    },
                    f,
                    indent=1,
                )

    def _load_optimizer_and_scheduler(self, checkpoint):
        # torch's optimizers take moments of any shape, which corrupt memory at the first step
        with checkpoint_errors(checkpoint, "optimizer or scheduler state", "does not load into this run"):
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._check_resumed_state(checkpoint)

    def _check_resumed_state(self, checkpoint: str) -> None:
        """The weights and optimizer state just loaded from ``checkpoint`` are finite and the
        optimizer's per-element moments have their parameters' shapes; raises :class:`TrainingError`
        naming the file and the parameter."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        if self.masks is not None:
            names.update({id(p): f"mask net {n}" for n, p in self.masks.named_parameters()})
        params = self._trained_parameters()
        if not all_finite(params):
            bad = next(names.get(id(p), "a trained weight") for p in params if not all_finite([p]))
            raise TrainingError(
                f"resume_from_checkpoint: {checkpoint}: {bad} is not finite in the checkpoint's weights "
                f"(adapter_model.safetensors or {MASK_WEIGHTS})"
            )
        optimizer_file = os.path.join(checkpoint, transformers.trainer.OPTIMIZER_NAME)
        moments = []
        for p in params:
            for key, value in self.optimizer.state.get(p, {}).items():
                # a tensor subclass (torchao's low-bit states) has its own layout and reductions
                if key not in PER_ELEMENT_STATE or type(value) is not torch.Tensor:
                    continue
                if not moment_fits(value, p):
                    raise TrainingError(
                        f"resume_from_checkpoint: {optimizer_file}: {key} of {names.get(id(p), 'a parameter')} "
                        f"has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}"
                    )
                moments.append((p, key, value))
        if not all_finite([v for _, _, v in moments if v.is_floating_point()]):
            p, key, _ = next(m for m in moments if m[2].is_floating_point() and not all_finite([m[2]]))
            raise TrainingError(
                f"resume_from_checkpoint: {optimizer_file}: {key} of {names.get(id(p), 'a parameter')} is not finite"
            )

    def _load_rng_state(self, checkpoint):  # transformers restores them as the first step begins
        with checkpoint_errors(checkpoint, "random-generator state", "(rng_state*.pth) cannot be restored"):
            super()._load_rng_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.masks is not None:
            self.masks.load_state_dict(load_masks(resume_from_checkpoint).state_dict())
            self.masks.to(self.args.device)
