"""``sparsepo-lite``: the command line.

    sparsepo-lite train CONFIG.yaml [--field value ...]

The YAML keys are the fields of ModelConfig (model_name_or_path, quantization, dtype, lora_r,
lora_alpha, lora_dropout, lora_target_modules, attn_implementation),
DataConfig (train_file, eval_file) and SparsePOConfig (loss_type, beta, learning_rate,
output_dir, ... every transformers.TrainingArguments field). ``--field value`` overrides a key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional


@dataclass
class DataConfig:
    """Where the preference pairs are (.jsonl / .json / .parquet, TRL formats)."""

    train_file: str = ""
    eval_file: Optional[str] = None


def _model_args_dataclass():
    # ModelConfig's lora_target_modules is a str-or-tuple; the parser needs one type per field.
    from .modeling import ModelConfig

    @dataclass
    class ModelArgs:
        model_name_or_path: str = ""
        quantization: str = "4bit"
        dtype: str = "auto"
        lora_r: int = 16
        lora_alpha: int = 32
        lora_dropout: float = 0.0
        lora_target_modules: List[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
        attn_implementation: Optional[str] = None

        def to_model_config(self, gradient_checkpointing: bool) -> ModelConfig:
            targets = self.lora_target_modules
            targets = targets[0] if targets == ["all-linear"] else tuple(targets)
            return ModelConfig(self.model_name_or_path, quantization=self.quantization, dtype=self.dtype,
                               lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               lora_target_modules=targets, gradient_checkpointing=gradient_checkpointing,
                               attn_implementation=self.attn_implementation)

    return ModelArgs


def _to_argv(values: dict) -> List[str]:
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def parse_train_config(config_path: str, overrides: List[str]):
    """(ModelArgs, DataConfig, SparsePOConfig, resolved dict) from a YAML file plus overrides."""
    import yaml
    from transformers import HfArgumentParser

    from .trainer import SparsePOConfig

    if not os.path.isfile(config_path):
        raise SystemExit(f"config file not found: {config_path}")
    with open(config_path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise SystemExit(f"{config_path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"{config_path}: expected a mapping of config keys, got {type(values).__name__}")
    ModelArgs = _model_args_dataclass()
    parser = HfArgumentParser((ModelArgs, DataConfig, SparsePOConfig))
    known = {f.name for dc in (ModelArgs, DataConfig, SparsePOConfig) for f in dataclasses.fields(dc)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"{config_path}: unknown config key(s) {unknown}; see `sparsepo-lite train --help`")
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=_to_argv(values) + overrides)
    except ValueError as exc:
        raise SystemExit(f"{config_path}: {exc}") from None
    if not model_args.model_name_or_path:
        raise SystemExit(f"{config_path}: model_name_or_path is required")
    if not data_args.train_file:
        raise SystemExit(f"{config_path}: train_file is required")
    resolved = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args),
                **{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(SparsePOConfig)}}}
    return model_args, data_args, train_args, resolved


def train(config_path: str, overrides: List[str]) -> str:
    """Run training from a YAML config; returns the output directory."""
    import yaml

    from .modeling import load_policy
    from .trainer import SparsePOTrainer

    model_args, data_args, args, resolved = parse_train_config(config_path, overrides)
    from transformers import set_seed

    set_seed(args.seed)  # the LoRA init draws from the global RNG
    # gradient_checkpointing is the TrainingArguments field; load_policy sets it up (non-reentrant).
    model, tok = load_policy(model_args.to_model_config(args.gradient_checkpointing))
    trainer = SparsePOTrainer(model=model, args=args, train_dataset=data_args.train_file,
                              eval_dataset=data_args.eval_file, processing_class=tok)
    for split, report in trainer.data_reports.items():
        print(f"{split} data: {report.summary()}", flush=True)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if data_args.eval_file:
        metrics.update(trainer.evaluate())
    trainer.save_model(args.output_dir)
    tok.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "sparsepo_config.yaml"), "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump({"final": metrics, "log_history": trainer.state.log_history}, f, indent=1)
    print(f"saved adapter, mask network, config and metrics to {args.output_dir}", flush=True)
    return args.output_dir


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsepo-lite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune with a YAML config")
    p_train.add_argument("config", help="YAML file whose keys are the config fields")
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        train(args.config, rest)


if __name__ == "__main__":
    main(sys.argv[1:])
