"""sparsepo-lite train: YAML round trip on a tiny 4-bit model, clear errors for bad configs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

import sparsepo_lite
from sparsepo_lite.cli import main
from sparsepo_lite.cli.train import config_parser, parse_train_config
from sparsepo_lite.masks import load_masks
from sparsepo_lite.models import ModelConfig
from sparsepo_lite.training.config import GROUPS, DataConfig, SparsePOConfig

from conftest import save_tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_tiny_llama(d / "model")
    rows = [{"prompt": f"Review {i}:", "chosen": " great.", "rejected": " awful."} for i in range(8)]
    rows.append({"prompt": "bad row", "chosen": "same", "rejected": "same"})
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {
        "model_name_or_path": str(d / "model"),
        "train_file": str(d / "train.jsonl"),
        "eval_file": str(d / "train.jsonl"),
        "output_dir": str(d / "out"),
        "loss_type": "sparsepo",
        "lora_r": 4,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_length": 32,
        "max_prompt_length": 16,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "gradient_checkpointing": False,
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(config))
    return d


@pytest.mark.slow
def test_train_round_trip(setup):
    main(["train", str(setup / "cfg.yaml"), "--beta", "0.2"])
    out = setup / "out"
    files = set(os.listdir(out))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "mask_net.safetensors",
        "mask_net.json",
        "sparsepo_config.yaml",
        "metrics.json",
        "data_report_train.json",
    } <= files
    saved = yaml.safe_load((out / "sparsepo_config.yaml").read_text())
    assert saved["loss_type"] == "sparsepo" and saved["lora_r"] == 4
    # the Trainer's arguments as JSON, not the pickle transformers writes
    assert "training_args.bin" not in files
    args = json.loads((out / "training_args.json").read_text())
    assert args["learning_rate"] == saved["learning_rate"] and args["beta"] == 0.2
    metrics = json.loads((out / "metrics.json").read_text())
    assert "eval_loss" in metrics["final"] and "eval_rewards/accuracies" in metrics["final"]
    report = json.loads((out / "data_report_train.json").read_text())
    assert report["kept"] == 8 and report["dropped"][0][0] == 8
    load_masks(str(out))
    _, _, args, _ = parse_train_config(str(setup / "cfg.yaml"), ["--beta", "0.2"])
    assert args.beta == 0.2


def test_the_run_record_leaves_out_what_to_do_with_the_folder(setup):
    """Training a run's recorded config again must neither delete that run nor resume its checkpoint."""
    flags = ["--overwrite_output_dir", "--resume_from_checkpoint", "true", "--resume_fresh_optimizer", "--beta", "0.3"]
    _, _, args, resolved = parse_train_config(str(setup / "cfg.yaml"), flags)
    assert args.overwrite_output_dir and args.resume_from_checkpoint == "true" and args.resume_fresh_optimizer
    assert resolved["beta"] == 0.3
    assert not {"overwrite_output_dir", "resume_from_checkpoint", "resume_fresh_optimizer"} & set(resolved)


def test_yaml_values_that_start_with_a_dash_stay_their_keys_values(setup, tmp_path):
    """The YAML goes through the command-line parser: '-lr-sweep' used to read as a flag, and a list
    item '--beta' set beta (9.0 against the file's 0.1)."""
    cfg = yaml.safe_load((setup / "cfg.yaml").read_text())
    path = tmp_path / "dash.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run_name": "-lr-sweep", "beta": 0.1}))
    _, _, args, resolved = parse_train_config(str(path), [])
    assert args.run_name == resolved["run_name"] == "-lr-sweep" and args.beta == 0.1
    path.write_text(yaml.safe_dump({**cfg, "lora_target_modules": ["q_proj", "--beta", "9"]}))
    with pytest.raises(SystemExit, match="config key 'lora_target_modules': the list item '--beta' starts with '-'"):
        parse_train_config(str(path), [])
    for item in ("-1e-5", "-inf"):  # numbers to float(), flags to argparse
        path.write_text(yaml.safe_dump({**cfg, "lora_target_modules": ["q_proj", item]}))
        with pytest.raises(SystemExit, match=f"the list item '{item}' starts with '-'"):
            parse_train_config(str(path), [])


@pytest.mark.slow
def test_empty_eval_file_turns_evaluation_off(setup, tmp_path):
    main(["train", str(setup / "cfg.yaml"), "--eval_file", "", "--output_dir", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "train_loss" in metrics["final"] and not any(k.startswith("eval_") for k in metrics["final"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, message",
    [
        ({"lerning_rate": 1e-4}, "unknown config key(s) ['lerning_rate']"),
        ({"loss_type": "orpo"}, "loss_type must be one of"),
        ({"beta": "high"}, "argument --beta: invalid float value: 'high'"),
        ({"train_file": ""}, "train_file is required"),
    ],
)
def test_bad_configs_give_clear_errors(setup, tmp_path, edit, message):
    cfg = yaml.safe_load((setup / "cfg.yaml").read_text())
    cfg.update(edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "sparsepo_lite.cli", "train", str(path)], capture_output=True, text=True
    )
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_precompute_verify_and_train_with_the_cache(setup, tmp_path):
    cache = tmp_path / "ref"
    cli = [sys.executable, "-m", "sparsepo_lite.cli"]
    res = subprocess.run(
        cli + ["precompute-ref", str(setup / "cfg.yaml"), "--out", str(cache), "--top-k", "16", "--shard-size", "3"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bytes/token" in res.stdout and "reference train" in res.stderr  # summary and progress bar
    res = subprocess.run(cli + ["verify-ref", str(cache)], capture_output=True, text=True)
    assert res.returncode == 0 and "OK (6 shards, 16 pairs" in res.stdout, res.stdout + res.stderr
    out = tmp_path / "out"
    main(["train", str(setup / "cfg.yaml"), "--ref_cache", str(cache), "--output_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["eval_kl/chosen"] >= 0 and "eval_loss" in metrics["final"]
    # a cache made with other truncation stops the run, naming the field
    res = subprocess.run(
        cli + ["train", str(setup / "cfg.yaml"), "--ref_cache", str(cache), "--max_length", "30"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "max_length is 32 in the cache but 30 now" in res.stderr, res.stderr[-2000:]
    shard = next(cache.glob("train-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    res = subprocess.run(cli + ["verify-ref", str(cache)], capture_output=True, text=True)
    assert res.returncode != 0 and shard.name in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize(
    "name",
    sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "examples")) if f.endswith(".yaml")),
)
def test_shipped_example_configs_parse(name, monkeypatch):
    root = os.path.join(os.path.dirname(__file__), "..")
    monkeypatch.chdir(root)  # their data paths are relative to the repository root
    # The GPU configs ask for bf16, which TrainingArguments refuses on a machine without a GPU
    # unless told to run on the CPU.
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    data, model, args, resolved = parse_train_config(os.path.join("examples", name), cpu)
    if data.train_file.startswith("examples/"):  # the 8B config names the user's own data
        assert os.path.isfile(data.train_file), data.train_file
    assert args.loss_type in ("dpo", "tdpo1", "tdpo2", "sparsepo", "mapo") and resolved["train_file"] == data.train_file
    assert resolved["model_name_or_path"] == model.model_name_or_path


def test_a_repeated_yaml_key_is_an_error_naming_the_file_and_the_key(setup, tmp_path):
    """safe_load keeps a repeated key's last value silently: a run with the wrong learning rate."""
    from sparsepo_lite.eval.runs import run_config
    from sparsepo_lite.validation import load_yaml

    text = (setup / "cfg.yaml").read_text() + "learning_rate: 5.0\n"
    line = text.splitlines().index("learning_rate: 0.001") + 1
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    message = f"{path}: key 'learning_rate' appears twice (lines {line} and {len(text.splitlines())})"
    with pytest.raises(SystemExit) as info:
        parse_train_config(str(path), [])
    assert str(info.value.code) == message
    run = tmp_path / "run"  # the run folder's record is read by the same rule
    run.mkdir()
    (run / "sparsepo_config.yaml").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{run / 'sparsepo_config.yaml'}: key 'learning_rate' appears")):
        run_config(str(run))
    (tmp_path / "nested.yaml").write_text("a: {x: 1, x: 2}\n")
    with pytest.raises(ValueError, match=r"nested.yaml: key 'x' appears twice \(lines 1 and 1\)"):
        load_yaml(str(tmp_path / "nested.yaml"))
    # a merged mapping's key given again is an override YAML defines, not a repeat
    (tmp_path / "merge.yaml").write_text("base: &b {beta: 0.1}\nrun:\n  <<: *b\n  beta: 0.2\n")
    assert load_yaml(str(tmp_path / "merge.yaml"))["run"] == {"beta": 0.2}


def test_precompute_ref_refuses_a_folder_that_is_not_a_cache_before_loading(setup, tmp_path, monkeypatch):
    import sparsepo_lite.training.trainer as trainer

    def never(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(trainer, "load_model", never)
    model = setup / "model"
    before = sorted(os.listdir(model))
    with pytest.raises(SystemExit) as info:  # the model's own folder
        main(["precompute-ref", str(setup / "cfg.yaml"), "--out", str(model)])
    assert str(info.value.code).startswith(f"sparsepo-lite precompute-ref: {model} holds {before[:3]} ... but no")
    assert sorted(os.listdir(model)) == before


def test_train_help_lists_every_field_with_help_by_group(capsys):
    main(["train", "--help"])
    text = capsys.readouterr().out
    parser = config_parser()
    fields = [a for a in parser._actions if a.dest != "help"]
    assert all(a.help for a in fields), [a.dest for a in fields if not a.help]
    own = {f.name for dc in (DataConfig, ModelConfig) for f in dataclasses.fields(dc) if f.metadata.get("cli", True)}
    own |= set(SparsePOConfig.own_fields())
    assert own <= {a.dest for a in fields} and all(f"--{name}" in text for name in own)
    headings = [f"{name}: {title}" for name, title in GROUPS.items()] + ["training: transformers.TrainingArguments"]
    assert [text.index(h) for h in headings] == sorted(text.index(h) for h in headings)  # grouped, in order
    assert text.index("--lora_r") < text.index("--beta") < text.index("--ref_cache") < text.index("--learning_rate")


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"sparsepo-lite {sparsepo_lite.__version__}"


@pytest.mark.parametrize("flag, guard", [([], True), (["--cpu_load_guard", "false"], False)])
def test_precompute_ref_passes_the_configs_cpu_load_guard(setup, tmp_path, monkeypatch, flag, guard):
    import sparsepo_lite.refcache.writer as writer

    class Seen(Exception):
        pass

    def fake(*args, **kwargs):
        raise Seen(kwargs["cpu_load_guard"])

    monkeypatch.setattr(writer, "precompute_reference", fake)
    with pytest.raises(Seen) as seen:
        main(["precompute-ref", str(setup / "cfg.yaml"), "--out", str(tmp_path / "ref"), *flag])
    assert seen.value.args == (guard,)
