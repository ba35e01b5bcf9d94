"""``sparsepo-lite train CONFIG.yaml [--field value ...]``: fine-tune with a YAML config.

The YAML keys are the fields of ``DataConfig`` (train_file, eval_file), ``ModelConfig`` (the policy)
and ``SparsePOConfig`` (the loss, masks, cache, and every ``transformers.TrainingArguments`` field);
``--field value`` overrides a key. ``sparsepo-lite train --help`` lists them by group.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import types
import typing
from typing import List

HELP = "fine-tune with a YAML config"


def config_parser():
    """An ``HfArgumentParser`` over (DataConfig, ModelConfig, SparsePOConfig) whose help lists our own
    fields by group (model, data, loss, masks, cache, run) before the TrainingArguments fields."""
    from transformers import HfArgumentParser

    from ..training.config import GROUPS, config_classes

    class Parser(HfArgumentParser):
        """Fields marked ``cli: False`` (ModelConfig's load-time options that the training config owns,
        such as gradient_checkpointing) get no flag and keep their defaults."""

        @staticmethod
        def _parse_dataclass_field(parser, field):
            if not field.metadata.get("cli", True):
                return
            # HfArgumentParser passes the metadata on to argparse, which knows no "group"
            field = copy.copy(field)
            field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k != "group"})
            HfArgumentParser._parse_dataclass_field(parser, field)

        def parse_args_into_dataclasses(self, args, nulls=()):
            """The dataclasses from ``args``; the Optional fields named in ``nulls`` get None."""
            namespace, rest = self.parse_known_args(args=args)
            if rest:
                raise ValueError(f"arguments that are no config field: {rest}")
            values = {**vars(namespace), **{name: None for name in nulls}}
            return tuple(
                dc(
                    **{
                        f.name: values[f.name]
                        for f in dataclasses.fields(dc)
                        if f.init and f.metadata.get("cli", True) and f.name in values
                    }
                )
                for dc in self.dataclass_types
            )

        def error(self, message):  # argparse would print its usage and exit; one line naming the field instead
            raise ValueError(message)

    classes = config_classes()
    parser = Parser(
        classes,
        usage="sparsepo-lite train CONFIG.yaml [--field value ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --learning_rat must not silently set learning_rate
    )
    group_of = {f.name: f.metadata["group"] for dc in classes for f in dataclasses.fields(dc) if "group" in f.metadata}
    groups = {name: parser.add_argument_group(f"{name}: {title}") for name, title in GROUPS.items()}
    rest = parser.add_argument_group("training: transformers.TrainingArguments")
    for action in list(parser._actions):  # argparse has no public API to regroup arguments
        if action.dest == "help":
            continue
        target = groups.get(group_of.get(action.dest), rest)
        for group in parser._action_groups:
            if action in group._group_actions and group is not target:
                group._group_actions.remove(action)
        target._group_actions.append(action)
    return parser


def _to_argv(values: dict, parser) -> tuple:
    """(argv, nulls): the YAML values as command-line arguments, and the keys set to null.

    null is taken only by fields that accept None (it then means None, not the default); a list only
    by list fields. Either mistake raises ``ValueError`` naming the key.
    """
    actions = {a.dest: a for a in parser._actions}
    argv, nulls = [], []
    for key, value in values.items():
        action = actions[key]
        if key == "report_to" and value is None:
            value = "none"  # the Trainer's word for no reporting
        if value is None:
            if action.default is not None and not _takes_none(key):
                raise ValueError(
                    f"config key {key!r}: null is not a value here (remove the key for its default, {action.default!r})"
                )
            nulls.append(key)
            continue
        if key == "report_to" and isinstance(value, (list, tuple)) and len(value) <= 1:
            value = value[0] if value else "none"  # one flag value; "none" is its word for the empty list
        if isinstance(value, (list, tuple)) and action.nargs not in ("+", "*"):
            raise ValueError(f"config key {key!r}: takes one value, got a list {value!r}")
        if isinstance(value, (list, tuple)) and not value:  # argparse cannot take an empty list
            raise ValueError(f"config key {key!r}: an empty list is not a valid value")
        if isinstance(value, dict):
            value = json.dumps(value)  # TrainingArguments' dict fields take JSON text
        if isinstance(value, (list, tuple)):
            # argparse would read an item that looks like a flag as the next option, setting another field
            flag_like = [str(v) for v in value if _reads_as_flag(str(v))]
            if flag_like:
                raise ValueError(f"config key {key!r}: the list item {flag_like[0]!r} starts with '-' (not supported)")
            argv.append(f"--{key}")
            argv.extend(str(v) for v in value)
        else:
            argv.append(f"--{key}={value}")  # one word: a value that starts with '-' stays this key's
    return argv, nulls


def _reads_as_flag(word: str) -> bool:
    """Whether argparse takes ``word`` for an option rather than a value: it starts with '-' and is
    neither '-' alone, a plain negative number (argparse's own pattern: no exponent), nor has a space."""
    return word.startswith("-") and len(word) > 1 and " " not in word and not re.fullmatch(r"-\d+|-\d*\.\d+", word)


def _takes_none(name: str) -> bool:
    """Whether the config field ``name`` is declared Optional (None is a meaningful value)."""
    from ..training.config import config_classes

    for dc in config_classes():
        if name in {f.name for f in dataclasses.fields(dc)}:
            hint = typing.get_type_hints(dc)[name]
            return type(None) in typing.get_args(hint)
    return False


def parse_train_config(config_path: str, overrides: List[str]):
    """(DataConfig, ModelConfig, SparsePOConfig, resolved dict) from a YAML file plus ``--field value``
    overrides.

    The resolved dict is what the run folder records (``sparsepo_config.yaml``): the data and model
    fields, every field of SparsePOConfig's own and the TrainingArguments fields the YAML or the
    command line set, all with their final values. Reading it back as a config gives the same run.
    """
    from ..training.config import config_keys
    from ..validation import load_yaml

    if not os.path.isfile(config_path):
        raise SystemExit(f"config file not found: {config_path}")
    try:
        values = load_yaml(config_path) or {}
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not isinstance(values, dict):
        raise SystemExit(f"{config_path}: expected a mapping of config keys, got {type(values).__name__}")
    parser = config_parser()
    known = config_keys()
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise SystemExit(f"{config_path}: unknown config key(s) {unknown}; see `sparsepo-lite train --help`")
    flags = parser._option_string_actions  # every spelling of a flag: --lora_r, --lora-r, --no_verify_ref_cache
    overridden = {flags[a.split("=", 1)[0]].dest for a in overrides if a.split("=", 1)[0] in flags}
    try:
        argv, nulls = _to_argv(values, parser)
        nulls = [n for n in nulls if n not in overridden]  # the command line wins over the YAML's null
        data_args, model_args, train_args = parser.parse_args_into_dataclasses(args=argv + overrides, nulls=nulls)
    except ValueError as exc:
        raise SystemExit(f"{config_path}: {exc}") from None
    if not model_args.model_name_or_path:
        raise SystemExit(f"{config_path}: model_name_or_path is required")
    if not data_args.train_file:
        raise SystemExit(f"{config_path}: train_file is required")
    given = set(values) | overridden
    resolved = {**dataclasses.asdict(data_args), **model_args.to_dict(), **train_args.run_config(given & known)}
    return data_args, model_args, train_args, resolved


def train(config_path: str, overrides: List[str]) -> str:
    """Run training from a YAML config; returns the output directory.

    The run folder gets its resolved configuration before step 0, and the adapter (and mask net)
    before the final evaluation, so a failing evaluation loses no training.
    """
    from ..training import SparsePOTrainer

    data_args, model_args, args, resolved = parse_train_config(config_path, overrides)
    # `--eval_file ""` turns off the config's evaluation split
    trainer = SparsePOTrainer(
        model_config=model_args,
        args=args,
        train_dataset=data_args.train_file,
        eval_dataset=data_args.eval_file or None,
        run_config=resolved,
    )
    tok = trainer.processing_class
    main_process = trainer.is_world_process_zero()
    for split, report in trainer.data_reports.items():
        if main_process:
            print(f"{split} data: {report.summary()}", flush=True)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # writes on the main process only
    if main_process:
        tok.save_pretrained(args.output_dir)
    metrics = dict(result.metrics)
    if data_args.eval_file:
        metrics.update(trainer.evaluate())
    if not main_process:
        return args.output_dir
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump({"final": metrics, "log_history": trainer.state.log_history}, f, indent=1)
    print(f"saved adapter, mask network, config and metrics to {args.output_dir}", flush=True)
    return args.output_dir


def add_parser(sub) -> None:
    p = sub.add_parser("train", help=HELP, add_help=False)
    p.add_argument("config", nargs="?", help="YAML file whose keys are the config fields")
    p.add_argument("-h", "--help", action="store_true", help="list every config field, by group")


def run(args, rest: List[str]) -> None:
    if args.help or args.config is None:
        config_parser().print_help()
        if not args.help:
            raise SystemExit("sparsepo-lite train: give a YAML config file")
        return
    train(args.config, rest)
