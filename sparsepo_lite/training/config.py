"""Training configuration: ``SparsePOConfig`` (``transformers.TrainingArguments`` plus the loss, mask,
data and cache fields) and ``DataConfig`` (where the pairs are). The model is configured apart, by
:class:`~sparsepo_lite.models.ModelConfig`, as TRL configures it beside its trainer configs.

Every field's ``metadata`` holds its help text and its group in ``sparsepo-lite train --help``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import transformers

from ..losses import LOSS_TYPES
from ..masks import MASK_INITS, SparsePOMasks
from ..objective import MAPO_MAPPINGS, LossConfig, check_loss_settings
from ..validation import MAX_SEED, check_choice, check_number

logger = logging.getLogger(__name__)

#: The resolved configuration of a run, written into its output_dir before training starts.
RUN_CONFIG = "sparsepo_config.yaml"

#: Fields that say what to do with the run folder this once, not how the run trains: a run folder does
#: not record them, so that training its recorded config again neither deletes the run nor resumes one
#: of its checkpoints (a resumed run's record trains the same run from the start).
RUN_ACTIONS = ("overwrite_output_dir", "resume_from_checkpoint", "resume_fresh_optimizer")

#: Groups of ``train --help``, in order; TrainingArguments' own fields form the last one.
GROUPS = {
    "model": "the policy: base model, quantisation, LoRA adapter",
    "data": "the preference pairs and their truncation",
    "loss": "the preference loss",
    "masks": "SparsePO's learned token masks",
    "cache": "the offline reference cache",
    "run": "the run folder and resuming",
}


def config_classes():
    """The dataclasses a training config fills (DataConfig, ModelConfig, SparsePOConfig), in the order
    ``sparsepo-lite train``'s parser returns them."""
    from ..models import ModelConfig

    return DataConfig, ModelConfig, SparsePOConfig


def config_keys() -> set:
    """Every key a training config (and so a run's ``sparsepo_config.yaml``) may hold."""
    return {f.name for dc in config_classes() for f in dataclasses.fields(dc) if f.metadata.get("cli", True)}


def _field(default=dataclasses.MISSING, *, group: str, help: str, **kw):
    return field(default=default, metadata={"group": group, "help": help}, **kw)


@dataclass
class DataConfig:
    """Where the preference pairs are: .jsonl / .json / .parquet files in TRL's preference formats."""

    train_file: str = _field("", group="data", help="training pairs (required)")
    eval_file: Optional[str] = _field(None, group="data", help='evaluation pairs (optional; "" turns it off)')


@dataclass
class SparsePOConfig(transformers.TrainingArguments):
    """``TrainingArguments`` plus the loss, mask, data and cache fields (loss defaults: the paper's code).

    :meth:`loss_config` builds the :class:`~sparsepo_lite.objective.LossConfig` that
    ``compute_loss`` takes from these fields. Every value is checked when the config is made,
    before anything loads.
    """

    # --- loss ---
    loss_type: str = _field("sparsepo", group="loss", help=f"one of {', '.join(LOSS_TYPES)}")
    beta: float = _field(0.1, group="loss", help="strength of the tie to the reference (> 0)")
    alpha: float = _field(0.5, group="loss", help="TDPO2's weight on the sequence KL difference (>= 0)")
    label_smoothing: float = _field(0.0, group="loss", help="DPO's conservative label smoothing, in [0, 0.5)")
    mapo_mapping: str = _field(
        "zn_rescale", group="loss", help=f"MaPO's token weights: {' or '.join(MAPO_MAPPINGS)} (uniform: TDPO1)"
    )
    chunk_size: Optional[int] = _field(
        None, group="loss", help="response tokens per chunk of the op (default: from a memory budget)"
    )
    # --- masks ---
    independent_masks: bool = _field(
        False, group="masks", help="two mask nets (reward and KL) instead of one shared net"
    )
    mask_on_reward: bool = _field(True, group="masks", help="weight the reward term by the mask")
    mask_on_kl: bool = _field(True, group="masks", help="weight the KL term by the mask")
    l1_reward: float = _field(0.0, group="masks", help="L1 penalty on the reward mask (>= 0)")
    l1_kl: float = _field(0.0, group="masks", help="L1 penalty on the KL mask (>= 0)")
    mask_init: str = _field(
        "ones",
        group="masks",
        help="mask net init: 'ones' (masks start near 1: SparsePO starts as TDPO1) or 'official' (the paper "
        "code's N(0, mask_init_std^2) init: masks start near 0 and can collapse to all-zero)",
    )
    mask_init_std: float = _field(0.02, group="masks", help="std of the mask net's initial weights (> 0)")
    mask_normalize: bool = _field(
        False,
        group="masks",
        help="divide each response's masks by their mean over its tokens, so a mask can move weight between "
        "tokens but never remove it all",
    )
    mask_learning_rate: Optional[float] = _field(
        1e-2,
        group="masks",
        help="learning rate of the mask nets, which need a far higher rate than the adapter to move "
        "(docs/masks.md); None: learning_rate; 0 freezes them at their init",
    )
    mask_weight_decay: float = _field(0.01, group="masks", help="weight decay of the mask nets' weights")
    # --- data ---
    max_length: int = _field(512, group="data", help="prompt + response tokens per sequence; longer ones are cut")
    max_prompt_length: int = _field(256, group="data", help="prompt tokens kept (its end) before the response")
    strict_data: bool = _field(False, group="data", help="stop at the first bad row instead of skipping it")
    # --- cache ---
    ref_cache: Optional[str] = _field(
        None, group="cache", help="a `sparsepo-lite precompute-ref` directory: use it and run no reference forward"
    )
    verify_ref_cache: bool = _field(
        True,
        group="cache",
        help="check every shard of ref_cache (checksums, shapes, values) before step 0; --no_verify_ref_cache "
        "skips it for huge caches (each shard is then checked when first read)",
    )
    # --- run folder ---
    overwrite_output_dir: bool = _field(
        False,
        group="run",
        help="replace the run in a non-empty output_dir (its adapter, masks, config, metrics and checkpoints)",
    )
    resume_fresh_optimizer: bool = _field(
        False,
        group="run",
        help="allow resuming from a checkpoint without optimizer.pt/scheduler.pt (the optimizer restarts)",
    )
    cpu_load_guard: bool = _field(
        True,
        group="run",
        help="on the CPU, when OpenMP threads spin long (SPARSEPO_LITE_OMP_PASSIVE=0, OMP_WAIT_POLICY=ACTIVE or a "
        "GOMP_SPINCOUNT above 2000), run torch on one thread while other processes oversubscribe the cores, "
        "checked when the model loads, before every step and before every batch of precompute-ref (docs/training.md)",
    )
    cpu_pair_threads: bool = _field(
        True,
        group="run",
        help="on the CPU, run each micro-batch as shards of its pairs on torch's threads at once, each shard's ops "
        "on its share of the threads, instead of splitting every op across all threads: no barrier per op, so a "
        "step is faster alone and keeps its share beside other busy processes (docs/training.md); needs 2 pairs "
        "per micro-batch, not with MaPO's activation weights from an online reference",
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "(fixed at False: the examples are dataclasses, not column dicts)"}
    )

    def __post_init__(self):
        # Every value is checked before anything loads: a NaN beta or a negative rate would
        # otherwise train (or silently not train) for the whole run.
        check_loss_settings(self)
        check_choice("mask_init", self.mask_init, MASK_INITS)
        check_number("mask_init_std", self.mask_init_std, low=0, low_open=True)
        check_number("mask_learning_rate", self.mask_learning_rate, low=0, optional=True)
        check_number("mask_weight_decay", self.mask_weight_decay, low=0)
        check_number("max_length", self.max_length, low=2, integer=True)
        check_number(
            "max_prompt_length", self.max_prompt_length, low=1, high=self.max_length, high_open=True, integer=True
        )
        check_number("learning_rate", self.learning_rate, low=0)
        check_number("weight_decay", self.weight_decay, low=0)
        # torch's optimizers check these only when training starts, after the model has loaded, and
        # name an "index 0" rather than the field
        check_number("adam_beta1", self.adam_beta1, low=0, high=1, high_open=True)
        check_number("adam_beta2", self.adam_beta2, low=0, high=1, high_open=True)
        check_number("adam_epsilon", self.adam_epsilon, low=0)
        check_number("seed", self.seed, low=0, high=MAX_SEED, integer=True)
        check_number("data_seed", self.data_seed, low=0, high=MAX_SEED, integer=True, optional=True)
        check_number("dataloader_num_workers", self.dataloader_num_workers, low=0, integer=True)
        check_number("max_grad_norm", self.max_grad_norm, low=0, optional=True)
        check_number("num_train_epochs", self.num_train_epochs, low=0, low_open=True)
        check_number("warmup_steps", self.warmup_steps, low=0)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_number(name, getattr(self, name), low=1, integer=True)
        if self.max_steps != -1:  # -1: run num_train_epochs
            check_number("max_steps", self.max_steps, low=1, integer=True)
        if self.loss_type == "sparsepo" and not (self.mask_on_reward or self.mask_on_kl):
            raise ValueError(
                "loss_type sparsepo with mask_on_reward and mask_on_kl both false is TDPO1 with a mask net that "
                "trains for nothing; use loss_type tdpo1, or turn a mask on"
            )
        unused = [
            name for name in self.unread_settings() if getattr(self, name) != self.__dataclass_fields__[name].default
        ]
        if unused:
            logger.warning("loss_type %s does not read %s: ignored", self.loss_type, ", ".join(unused))
        super().__post_init__()

    def objective_fields(self) -> List[str]:
        """The settings that say what a run optimises: its loss settings (``LossConfig``'s fields that
        this config has, ``chunk_size`` aside, which changes rounding only), the mask nets' layout and
        the truncation that makes its examples. A resumed run must share them with its checkpoint."""
        loss = {f.name for f in dataclasses.fields(LossConfig)} - {"chunk_size"}
        own = [f.name for f in dataclasses.fields(self) if f.name in loss]
        return own + ["independent_masks", "max_length", "max_prompt_length"]

    def unread_settings(self) -> List[str]:
        """The loss settings this config's loss_type does not read: the mask fields but for sparsepo,
        alpha but for tdpo2, mapo_mapping but for mapo."""
        readers = {f.name: ("sparsepo",) for f in dataclasses.fields(self) if f.metadata.get("group") == "masks"}
        readers.update(alpha=("tdpo2",), mapo_mapping=("mapo",))
        return [name for name, losses in readers.items() if self.loss_type not in losses]

    def loss_config(self, masks: Optional[SparsePOMasks] = None, ref_model=None) -> LossConfig:
        """The :class:`LossConfig` of this run: every ``LossConfig`` field this config has, plus the
        mask nets and an optional separate reference model."""
        shared = {f.name for f in dataclasses.fields(LossConfig)} & {f.name for f in dataclasses.fields(self)}
        return LossConfig(**{name: getattr(self, name) for name in shared}, masks=masks, ref_model=ref_model)

    @classmethod
    def own_fields(cls) -> List[str]:
        """The fields this class adds to ``transformers.TrainingArguments`` (loss, masks, data, cache)."""
        base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in base]

    def run_config(self, given: Iterable[str] = ()) -> dict:
        """What a run folder records of this config: every field of this class's own, plus the
        ``TrainingArguments`` fields named in ``given`` (set by the YAML or the command line), as plain
        YAML values that ``sparsepo-lite train`` reads back to the same config; :data:`RUN_ACTIONS`
        left out."""
        names = list(self.own_fields()) + [n for n in given if n not in self.own_fields()]
        return {n: _plain(getattr(self, n)) for n in names if hasattr(self, n) and n not in RUN_ACTIONS}


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value
