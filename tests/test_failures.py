"""No silent damage: bad configs, non-finite steps, run folders, resuming and hostile caches each end
in a clear error or a correct run (docs/failures.md states what is checked when)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers
import yaml

from sparsepo_lite.cli import main
from sparsepo_lite.cli.train import parse_train_config
from sparsepo_lite.errors import TrainingError
from sparsepo_lite.eval.runs import load_run
from sparsepo_lite.models import ModelConfig, load_policy, load_tokenizer, resolve_model_path
from sparsepo_lite.refcache import CacheError, RefCache, read_manifest, run_fingerprint, verify_cache
from sparsepo_lite.refcache.writer import precompute_reference
from sparsepo_lite.training import SparsePOConfig, SparsePOTrainer
from sparsepo_lite.training.trainer import moment_fits, read_splits

from conftest import review_rows, save_tiny_llama

CLI = [sys.executable, "-m", "sparsepo_lite.cli"]


def make_trainer(tiny_dir, out, loss_type="dpo", steps=6, **kw):
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    opts = dict(
        output_dir=str(out),
        loss_type=loss_type,
        beta=0.5,
        learning_rate=1e-2,
        mask_init_std=0.3,
        per_device_train_batch_size=4,
        max_steps=steps,
        logging_steps=2,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        max_length=32,
        max_prompt_length=16,
        seed=0,
        use_cpu=True,
    )
    return SparsePOTrainer(
        model=model, args=SparsePOConfig(**{**opts, **kw}), train_dataset=review_rows(24), processing_class=tok
    )


def lora_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


class PoisonGradients(transformers.TrainerCallback):
    """On the listed (1-based) steps, make the loss's gradient NaN while the loss itself stays finite:
    0 * sqrt(0 * w) is 0 in the forward pass, and its derivative is 0 * inf = NaN."""

    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.seen = trainer, set(steps), []
        real = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = real(model, inputs, return_outputs, num_items_in_batch)
            if model.training and trainer.state.global_step + 1 in self.steps:
                w = next(p for n, p in model.named_parameters() if "lora_A" in n)
                loss = loss + 0.0 * torch.sqrt(0.0 * w.sum())
            return loss

        trainer.compute_loss = compute_loss

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(lora_weights(self.trainer))


# --- non-finite steps ------------------------------------------------------------------------------


def test_a_finite_loss_with_nan_gradients_skips_the_step_and_the_reported_loss_counts_trained_steps(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path)
    spy = PoisonGradients(trainer, steps=[2, 5])
    trainer.add_callback(spy)
    losses = []
    real_settle = trainer._settle_step

    def settle(grad_norm):
        losses.append((sum(trainer._micro_losses) / len(trainer._micro_losses), math.isfinite(float(grad_norm))))
        real_settle(grad_norm)

    trainer._settle_step = settle
    start = lora_weights(trainer)
    out = trainer.train()
    assert trainer.skipped_steps == 2
    assert [ok for _, ok in losses] == [True, False, True, True, False, True]
    before = [start] + spy.seen[:-1]
    for step, (w0, w1) in enumerate(zip(before, spy.seen), 1):  # skipped steps change nothing
        changed = any(not torch.equal(w0[n], w1[n]) for n in w0)
        assert changed == (step not in (2, 5)), step
    assert all(torch.isfinite(p).all() for p in spy.seen[-1].values())
    trained = [l for l, ok in losses if ok]
    assert out.training_loss == pytest.approx(sum(trained) / 4) and out.metrics["train_loss"] == out.training_loss
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(losses[0][0])  # steps 1-2: only step 1 trained
    assert logged[1]["loss"] == pytest.approx((losses[2][0] + losses[3][0]) / 2)
    assert logged[2]["loss"] == pytest.approx(losses[5][0]) and logged[2]["skipped_steps"] == 2


def test_a_run_whose_steps_are_mostly_skipped_fails(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, steps=4)
    trainer.add_callback(PoisonGradients(trainer, steps=[1, 2, 4]))
    with pytest.raises(TrainingError, match="3 of 4 optimizer steps were skipped"):
        trainer.train()


def test_weights_that_stop_being_finite_stop_the_run(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, steps=3)

    class Blowup(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 1:
                with torch.no_grad():
                    next(p for n, p in trainer.model.named_parameters() if "lora_B" in n).fill_(float("inf"))

    trainer.add_callback(Blowup())
    with pytest.raises(TrainingError, match="step 2: trained weights are no longer finite"):
        trainer.train()


@pytest.mark.parametrize(
    "bad, stops",
    [
        ("nan", True),
        ("-inf", True),
        ("inf and -inf", True),  # their sum is NaN, not inf
        ("huge", False),  # finite: its sum overflows, so the elements decide
        ("none", False),
    ],
)
def test_the_finite_weights_check_is_exact(tiny_dir, tmp_path, bad, stops):
    trainer = make_trainer(tiny_dir, tmp_path, steps=1)
    trainer.create_optimizer()
    (check,) = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "_FiniteWeights"]
    params = trainer._trained_parameters()
    with torch.no_grad():
        p = params[len(params) // 2]
        if bad == "huge":
            p.fill_(3e38)
        elif bad == "inf and -inf":
            p.view(-1)[0], p.view(-1)[1] = float("inf"), float("-inf")
        elif bad != "none":
            p.view(-1)[-1] = float(bad)
    state = transformers.TrainerState(global_step=5)
    if stops:
        with pytest.raises(TrainingError, match="step 5: trained weights are no longer finite"):
            check.on_step_end(trainer.args, state, transformers.TrainerControl())
    else:
        check.on_step_end(trainer.args, state, transformers.TrainerControl())


def test_the_flop_estimate_counts_the_parameters_once(tiny_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_dir, tmp_path, steps=1)
    inputs = {"input_ids": torch.ones(8, 21, dtype=torch.long)}
    want = transformers.Trainer.floating_point_ops(trainer, inputs)
    counted = []
    real = trainer.model.num_parameters
    monkeypatch.setattr(trainer.model, "num_parameters", lambda **kw: counted.append(kw) or real(**kw))
    assert want > 0 and [trainer.floating_point_ops(inputs) for _ in range(3)] == [want] * 3
    assert counted == [{"exclude_embeddings": True}]
    assert trainer.floating_point_ops({"labels": torch.ones(2, 3)}) == 0  # no input ids: as the Trainer


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("failures")
    save_tiny_llama(d / "model")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in review_rows(8)) + "\n")
    config = {
        "model_name_or_path": str(d / "model"),
        "train_file": str(d / "train.jsonl"),
        "output_dir": str(d / "out"),
        "loss_type": "sparsepo",
        "lora_r": 4,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_length": 32,
        "max_prompt_length": 16,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "gradient_checkpointing": False,
        "mask_init_std": 0.3,
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(config))
    return d


def cli_error(*args) -> str:
    """The one-line error of ``sparsepo-lite ARGS``, run in this process (an unexpected exception, the
    case of a traceback, propagates and fails the test)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code not in (0, None) and "\n" not in str(info.value.code), info.value.code
    return str(info.value.code)


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_huge_learning_rate_ends_with_an_error_and_saves_no_adapter(cli_setup, tmp_path):
    res = run_cli("train", cli_setup / "cfg.yaml", "--learning_rate", "1e30", "--output_dir", tmp_path / "run")
    assert res.returncode != 0
    assert "optimizer steps were skipped" in res.stderr or "no longer finite" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("beta", ".nan", "beta must be finite"),
        ("beta", "0", "beta must be > 0"),
        ("alpha", "-1", "alpha must be >= 0"),
        ("label_smoothing", "0.5", "label_smoothing must be < 0.5"),
        ("l1_reward", ".inf", "l1_reward must be finite"),
        ("learning_rate", "-0.1", "learning_rate must be >= 0"),
        ("mask_init_std", "0", "mask_init_std must be > 0"),
        ("mask_learning_rate", ".nan", "mask_learning_rate must be finite"),
        ("max_prompt_length", "0", "max_prompt_length must be >= 1"),
        ("lora_dropout", "1.0", "lora_dropout must be < 1"),
        ("chunk_size", "0", "chunk_size must be >= 1"),
    ],
)
def test_config_values_are_checked_before_the_model_loads(cli_setup, tmp_path, key, value, message):
    cfg = yaml.safe_load((cli_setup / "cfg.yaml").read_text())
    cfg["model_name_or_path"] = str(tmp_path / "no-such-model")  # never reached
    cfg[key] = yaml.safe_load(value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=message):
        parse_train_config(str(path), [])
    with pytest.raises(ValueError, match=message):
        if key in {f.name for f in dataclasses.fields(ModelConfig)}:
            ModelConfig("x", **{key: cfg[key]})
        else:
            SparsePOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{key: cfg[key]})


# --- the run folder ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_run_folder_records_command_line_overrides_and_readers_use_them(cli_setup, tmp_path):
    out = tmp_path / "run"
    overrides = ["--lora_r", "8", "--beta", "0.25", "--mask_init_std=0.2", "--max_steps", "1", "--output_dir", str(out)]
    main(["train", str(cli_setup / "cfg.yaml"), *overrides])
    saved = yaml.safe_load((out / "sparsepo_config.yaml").read_text())
    assert (saved["lora_r"], saved["beta"], saved["mask_init_std"], saved["max_steps"]) == (8, 0.25, 0.2, 1)
    assert saved["loss_type"] == "sparsepo" and saved["alpha"] == 0.5  # defaults are recorded too
    # the saved file is a config: it parses back to the same run
    _, again_model, again, resolved = parse_train_config(str(out / "sparsepo_config.yaml"), [])
    _, first_model, first, _ = parse_train_config(str(cli_setup / "cfg.yaml"), overrides)
    assert again_model == first_model and again_model.lora_r == 8
    for name in SparsePOConfig.own_fields() + ["learning_rate", "max_steps", "output_dir", "seed"]:
        assert getattr(again, name) == getattr(first, name), name
    assert resolved == saved
    model, _, masks, cfg = load_run(str(out))  # the LoRA size comes from the run, not the YAML
    assert model.peft_config["default"].r == 8 and masks is not None and cfg["beta"] == 0.25


@pytest.mark.slow
def test_a_non_empty_output_dir_is_refused_unless_overwritten_and_nothing_stale_survives(cli_setup, tmp_path):
    out = tmp_path / "run"
    main(["train", str(cli_setup / "cfg.yaml"), "--output_dir", str(out), "--max_steps", "1"])
    assert (out / "mask_net.safetensors").is_file()
    adapter = (out / "adapter_model.safetensors").read_bytes()
    res = run_cli("train", cli_setup / "cfg.yaml", "--output_dir", out, "--loss_type", "dpo", "--max_steps", "1")
    assert res.returncode != 0 and "is not empty" in res.stderr and "--overwrite_output_dir" in res.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # the earlier run is intact
    (out / "notes.txt").write_text("mine")
    main(
        [
            "train",
            str(cli_setup / "cfg.yaml"),
            "--output_dir",
            str(out),
            "--loss_type",
            "dpo",
            "--max_steps",
            "1",
            "--overwrite_output_dir",
        ]
    )
    files = set(os.listdir(out))
    assert "mask_net.safetensors" not in files and "mask_net.json" not in files  # the DPO run has none
    assert "notes.txt" in files and yaml.safe_load((out / "sparsepo_config.yaml").read_text())["loss_type"] == "dpo"


def test_an_unwritable_output_dir_is_found_before_training(tiny_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="a-file/run is not writable"):
        make_trainer(tiny_dir, blocker / "run")
    trainer = make_trainer(tiny_dir, tmp_path / "run")
    steps = []

    class Count(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append(1)

    trainer.add_callback(Count())
    os.rmdir(tmp_path / "run")
    (tmp_path / "run").write_text("replaced by a file after the trainer was made")
    with pytest.raises(TrainingError, match="is not writable"):
        trainer.train()
    assert steps == []


@pytest.mark.slow
def test_the_adapter_is_saved_before_the_final_evaluation(cli_setup, tmp_path, monkeypatch):
    def broken_eval(self, *a, **k):
        raise CacheError("eval-00000.safetensors: checksum mismatch (corrupted shard)")

    monkeypatch.setattr(SparsePOTrainer, "evaluate", broken_eval)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="checksum mismatch"):
        main(
            [
                "train",
                str(cli_setup / "cfg.yaml"),
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
                "--eval_file",
                str(cli_setup / "train.jsonl"),
            ]
        )
    assert (out / "adapter_model.safetensors").is_file() and (out / "mask_net.safetensors").is_file()


@pytest.mark.slow
def test_resuming_without_optimizer_state_is_an_error_unless_asked(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    ckpt = tmp_path / "checkpoint-1"
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(TrainingError, match="checkpoint-1 has no optimizer.pt; resuming would restart the optimizer"):
        make_trainer(tiny_dir, tmp_path, steps=2).train(resume_from_checkpoint=str(ckpt))
    resumed = make_trainer(tiny_dir, tmp_path, steps=2, resume_fresh_optimizer=True)
    assert resumed.train(resume_from_checkpoint=str(ckpt)).global_step == 2
    with pytest.raises(TrainingError, match="not a training checkpoint"):
        make_trainer(tiny_dir, tmp_path, steps=2).train(resume_from_checkpoint=str(tmp_path))


# --- the reference cache is untrusted input --------------------------------------------------------


@pytest.fixture(scope="module")
def cache_setup(tiny_dir):
    from sparsepo_lite.data import tokenize_dataset

    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    examples, _ = tokenize_dataset(review_rows(24), tok, max_length=32, max_prompt_length=16)
    return model, tok, examples


def build_cache(cache_setup, out, splits=None, fingerprint=None, **kw):
    """A cache of ``splits`` (default: the train examples): top-8, in shards of 8 pairs, unless ``kw`` says."""
    model, tok, examples = cache_setup
    splits = splits or {"train": examples}
    if fingerprint is None:
        fingerprint = run_fingerprint(model, tok, splits, model_name=None, max_length=32, max_prompt_length=16)
    kw = {"top_k": 8, "batch_size": 8, "shard_size": 8, **kw}
    precompute_reference(model, tok, splits, str(out), fingerprint=fingerprint, progress=False, **kw)
    return out


@pytest.mark.slow
def test_evaluate_reads_rows_as_the_constructor_does_and_with_a_cache_only_its_eval_split(
    tiny_dir, cache_setup, tmp_path
):
    """trainer.evaluate(eval_dataset=rows or a path) handed the rows to the collator untokenised."""
    from sparsepo_lite.data import tokenize_dataset

    _, tok, examples = cache_setup
    rows = review_rows(6, offset=100)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_examples, _ = tokenize_dataset(rows, tok, max_length=32, max_prompt_length=16)
    trainer = make_trainer(tiny_dir, tmp_path / "run", "dpo")
    losses = [trainer.evaluate(d)["eval_loss"] for d in (rows, str(tmp_path / "eval.jsonl"), eval_examples)]
    assert losses[0] == losses[1] == losses[2]
    assert trainer.evaluate(eval_dataset={"held": rows})["eval_held_loss"] == losses[0]
    cache = build_cache(cache_setup, tmp_path / "cache", splits={"train": examples, "eval": eval_examples})
    cached = make_trainer(tiny_dir, tmp_path / "run2", "dpo", ref_cache=str(cache))
    assert cached.evaluate(rows)["eval_loss"] == pytest.approx(losses[0], rel=1e-5)
    with pytest.raises(ValueError, match="holds the eval split it was made for, and these rows differ"):
        cached.evaluate(review_rows(6, offset=200))
    train_only = make_trainer(
        tiny_dir, tmp_path / "run3", "dpo", ref_cache=str(build_cache(cache_setup, tmp_path / "c2"))
    )
    with pytest.raises(ValueError, match="c2 holds no eval split; evaluate them with a trainer without ref_cache"):
        train_only.evaluate(rows)
    # the constructor's checks, for these rows too: not at their first batch
    weighted = [
        {**r, "chosen_token_weights": [1.0] * len(tok(r["chosen"], add_special_tokens=False).input_ids + [0])}
        for r in rows
    ]
    with pytest.raises(ValueError, match=r"eval rows \[0, 1, 2, 3, 4\] have token weights, which loss_type tdpo2"):
        make_trainer(tiny_dir, tmp_path / "run4", "tdpo2").evaluate(weighted)


def flip_a_byte(path) -> None:
    """Damage a file in its middle, as a bad disk or an interrupted copy would."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupt_cache_stops_training_before_step_0(tiny_dir, cache_setup, tmp_path):
    cache = build_cache(cache_setup, tmp_path / "cache")
    flip_a_byte(cache / "train-00002.safetensors")
    with pytest.raises(CacheError, match="train-00002.safetensors: checksum mismatch"):
        make_trainer(tiny_dir, tmp_path / "run", ref_cache=str(cache))
    # --no_verify_ref_cache: the run starts, and the shard is checked when it is first read
    trainer = make_trainer(tiny_dir, tmp_path / "run", ref_cache=str(cache), verify_ref_cache=False, steps=6)
    with pytest.raises(CacheError, match="train-00002.safetensors: checksum mismatch"):
        trainer.train()


@pytest.mark.slow
def test_a_cache_without_what_the_loss_reads_is_refused_before_anything_runs(tiny_dir, cache_setup, tmp_path):
    """Refused when the trainer is built, not at the first batch (when an overwritten run would be
    set aside already): a label-only cache for a KL loss, a cache without MaPO masks for MaPO."""
    label_only = build_cache(cache_setup, tmp_path / "label", top_k=0, tail_samples=0)
    with pytest.raises(CacheError, match="loss_type='tdpo1' needs the reference distribution, but the cache holds"):
        make_trainer(tiny_dir, tmp_path / "run", "tdpo1", ref_cache=str(label_only))
    make_trainer(tiny_dir, tmp_path / "run", "dpo", ref_cache=str(label_only))  # DPO reads label log-probs only
    top_k = build_cache(cache_setup, tmp_path / "topk")
    with pytest.raises(CacheError, match="mapo_mapping='zn_rescale' needs the cache's precomputed MaPO masks"):
        make_trainer(tiny_dir, tmp_path / "run", "mapo", ref_cache=str(top_k), mapo_mapping="zn_rescale")
    make_trainer(tiny_dir, tmp_path / "run", "mapo", ref_cache=str(top_k), mapo_mapping="uniform")


def _edit_manifest(cache, edit):
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../../x"), "'splits.train.shards[0].file' must be"),
        (lambda m: m["splits"]["train"]["shards"][1].update(file="/etc/hostname"), "'splits.train.shards[1].file'"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "'splits.train.shards[0].sha256' must be"),
        (lambda m: m["splits"]["train"]["shards"][0].update(bytes="12"), "'splits.train.shards[0].bytes' must be"),
        (lambda m: m["splits"]["train"].update(shards="all"), "'splits.train.shards' must be a list"),
        (lambda m: m["splits"].update(train=[1]), "'splits.train' must be an object"),
        (lambda m: m.update(splits=[]), "'splits' must be an object"),
        (lambda m: m["contents"].pop("top_k"), "'contents.top_k' must be"),
        (lambda m: m["contents"].update(topk_dtype="int8"), "'contents.topk_dtype' must be"),
        (lambda m: m.update(fingerprint={"model": {"nested": 1}}), "'fingerprint' must be an object of plain values"),
        (lambda m: m["splits"].update({"../up": m["splits"]["train"]}), "split name '../up'"),
        (lambda m: m.update(format_version="1"), "format version"),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_file_and_field(cache_setup, tmp_path, edit, field):
    cache = build_cache(cache_setup, tmp_path / "cache")
    _edit_manifest(cache, edit)
    with pytest.raises(CacheError) as info:
        RefCache(str(cache))
    msg = str(info.value)
    assert "manifest.json" in msg and field in msg and "\n" not in msg, msg
    res = run_cli("verify-ref", cache)
    assert res.returncode != 0 and field in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_a_deeply_nested_or_non_utf8_manifest_is_a_cache_error(tmp_path):
    for body in (b"[" * 100000 + b"]" * 100000, b'{"format": "\xff"}', b"{"):
        (tmp_path / "manifest.json").write_bytes(body)
        with pytest.raises(CacheError, match="manifest.json: unreadable manifest"):
            read_manifest(str(tmp_path))


def test_a_shard_that_is_a_link_out_of_the_cache_is_refused(cache_setup, tmp_path):
    cache = build_cache(cache_setup, tmp_path / "cache")
    outside = tmp_path / "outside.safetensors"
    os.replace(cache / "train-00000.safetensors", outside)
    os.symlink(outside, cache / "train-00000.safetensors")
    with pytest.raises(CacheError, match="train-00000.safetensors: shard missing \\(or not a regular file\\)"):
        verify_cache(str(cache))


def test_precompute_deletes_only_temporary_files_it_wrote(cache_setup, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = ["train-00001.safetensors.tmp-4242", "manifest.json.tmp-17"]
    theirs = ["notes.tmp-keep", "data.tmp-123", "train-1.safetensors.tmp-9", "x.safetensors.tmp-abc"]
    for name in mine + theirs:
        (cache / name).write_text("user data")
    build_cache(cache_setup, cache)
    files = set(os.listdir(cache))
    assert not files & set(mine) and set(theirs) <= files
    assert verify_cache(str(cache))["examples"] == 24


# --- the second probe: the classes it found -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("beta", '"abc"', "argument --beta: invalid float value: 'abc'"),
        ("beta", "true", "argument --beta: invalid float value"),
        ("lora_r", "[4, 8]", "config key 'lora_r': takes one value"),
        ("max_steps", '"1e3"', "argument --max_steps"),
        ("beta", "null", "config key 'beta': null is not a value here"),
        ("per_device_train_batch_size", "0", "per_device_train_batch_size must be >= 1"),
        ("gradient_accumulation_steps", "0", "gradient_accumulation_steps must be >= 1"),
        ("gradient_accumulation_steps", "-1", "gradient_accumulation_steps must be >= 1"),
        ("max_steps", "0", "max_steps must be >= 1"),
    ],
)
def test_a_value_of_the_wrong_kind_is_one_line_naming_the_field(cli_setup, tmp_path, capsys, key, value, message):
    cfg = yaml.safe_load((cli_setup / "cfg.yaml").read_text())
    cfg[key] = yaml.safe_load(value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        parse_train_config(str(path), [])
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)[:500]
    capsys.readouterr()
    assert message in cli_error("train", path, "--output_dir", tmp_path / "run")
    assert "usage:" not in capsys.readouterr().err  # no usage dump


def test_null_sets_a_field_that_takes_none_and_every_override_spelling_is_recorded(cli_setup, tmp_path):
    cfg = yaml.safe_load((cli_setup / "cfg.yaml").read_text())
    del cfg["learning_rate"]
    cfg["mask_learning_rate"] = None  # documented: None means the adapter's learning rate
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _, _, args, resolved = parse_train_config(str(path), ["--learning-rate", "0.5"])
    assert args.mask_learning_rate is None and resolved["mask_learning_rate"] is None
    assert args.learning_rate == 0.5 and resolved["learning_rate"] == 0.5
    _, _, args, resolved = parse_train_config(str(path), ["--mask_learning_rate", "0.05"])  # the flag beats the null
    assert args.mask_learning_rate == 0.05 and resolved["mask_learning_rate"] == 0.05
    _, _, args, resolved = parse_train_config(str(path), ["--no-verify-ref-cache"])
    assert args.verify_ref_cache is False and resolved["verify_ref_cache"] is False
    cfg["report_to"] = None  # null for report_to means no reporting
    path.write_text(yaml.safe_dump(cfg))
    assert parse_train_config(str(path), [])[2].report_to in ([], "none", ["none"])
    with pytest.raises(SystemExit, match="no config field: \\['--learning_rat'"):  # no silent abbreviations
        parse_train_config(str(path), ["--learning_rat", "0.5"])


def test_a_run_that_ends_on_a_skipped_step_fails(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, steps=3)
    trainer.add_callback(PoisonGradients(trainer, steps=[3]))
    with pytest.raises(TrainingError, match="the last optimizer step was skipped"):
        trainer.train()


@pytest.mark.slow
def test_a_huge_learning_rate_over_two_steps_is_not_a_success(cli_setup, tmp_path):
    res = run_cli(
        "train", cli_setup / "cfg.yaml", "--learning_rate", "1e30", "--max_steps", "2", "--output_dir", tmp_path / "run"
    )
    assert res.returncode != 0, res.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def _checkpointed_run(tiny_dir, out, loss_type="sparsepo"):
    make_trainer(tiny_dir, out, loss_type, steps=2, save_strategy="steps", save_steps=1).train()
    return out / "checkpoint-1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 1,'), "trainer_state.json: unreadable"),
        (
            lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:500]),
            "optimizer.pt: not a complete",
        ),
        (
            lambda c: (c / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
            "adapter_model.safetensors: not a readable safetensors file",
        ),
        (lambda c: (c / "mask_net.json").write_text("{"), "mask_net.json: not a mask net description"),
        (lambda c: (c / "trainer_state.json").write_text("[1, 2]"), "trainer_state.json: not a trainer state"),
        (lambda c: flip_a_byte(c / "optimizer.pt"), "optimizer.pt: damaged"),
        (lambda c: (c / "rng_state.pth").write_bytes((c / "rng_state.pth").read_bytes()[:30]), "rng_state.pth: not a"),
        (
            lambda c: torch.save({"python": 5}, c / "rng_state.pth"),
            r"random-generator state \(rng_state\*.pth\) cannot",
        ),
        (lambda c: torch.save({"cpu": RunsCode(c)}, c / "rng_state.pth"), "random-generator state holds objects other"),
        (lambda c: torch.save({}, c / "scheduler.pt"), r"scheduler state does not load into this run \(KeyError"),
        (lambda c: edit_optimizer(c, lambda sd: sd.update(evil=RunsCode(c))), "state holds objects other than tensors"),
        (
            lambda c: edit_optimizer(
                c, lambda sd: sd["state"][0].update(exp_avg=sd["state"][0]["exp_avg"][:1].clone())
            ),
            r"optimizer.pt: exp_avg of .*lora_A.* has shape \(1, 32\), the parameter \(4, 32\)",
        ),
        (
            lambda c: edit_optimizer(c, lambda sd: sd["state"][3]["exp_avg_sq"].fill_(float("nan"))),
            "optimizer.pt: exp_avg_sq of .* is not finite",
        ),
        (
            lambda c: edit_safetensors(c / "adapter_model.safetensors", lambda t: t.fill_(float("inf"))),
            "lora_.* is not finite in the checkpoint's weights",
        ),
    ],
)
def test_a_damaged_checkpoint_is_named_before_anything_loads(tiny_dir, tmp_path, damage, message):
    ckpt = _checkpointed_run(tiny_dir, tmp_path)
    config_before = (tmp_path / "sparsepo_config.yaml").read_text()
    damage(ckpt)
    with pytest.raises(TrainingError, match=message):
        make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2).train(resume_from_checkpoint=str(ckpt))
    assert (tmp_path / "sparsepo_config.yaml").read_text() == config_before  # the run's record is untouched
    assert not (ckpt / "code-ran").exists()


class RunsCode:
    """Pickles to a call that makes ``folder/code-ran``: what a hostile checkpoint file could hold."""

    def __init__(self, folder):
        self.marker = str(folder / "code-ran")

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def edit_optimizer(ckpt, edit):
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    edit(state)
    torch.save(state, ckpt / "optimizer.pt")


def edit_safetensors(path, edit, name=None):
    """Replace the tensor ``name`` (default: the first) of a safetensors file by ``edit(tensor)``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = name or next(iter(tensors))
    tensors[name] = edit(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.slow
def test_resuming_with_other_model_or_loss_settings_is_refused_and_the_run_config_survives(tiny_dir, tmp_path, caplog):
    ckpt = _checkpointed_run(tiny_dir, tmp_path)
    config_before = (tmp_path / "sparsepo_config.yaml").read_text()
    with pytest.raises(TrainingError, match="mask_net.safetensors: present, but this run has no SparsePO mask nets"):
        make_trainer(tiny_dir, tmp_path, "dpo", steps=2).train(resume_from_checkpoint=str(ckpt))
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=8, gradient_checkpointing=False))
    other = SparsePOTrainer(
        model=model,
        args=SparsePOConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            report_to=[],
            use_cpu=True,
            max_length=32,
            max_prompt_length=16,
            per_device_train_batch_size=4,
        ),
        train_dataset=review_rows(24),
        processing_class=tok,
    )
    with pytest.raises(TrainingError, match="adapter_config.json: r is 4 there but 8 in this run"):
        other.train(resume_from_checkpoint=str(ckpt))
    # the same model, another loss: no single run, and its record would claim the new loss for all of it
    with pytest.raises(TrainingError, match="training_args.json: beta is 0.5 there but 0.9 in this run"):
        make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2, beta=0.9).train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(TrainingError, match="training_args.json: max_length is 32 there but 48 in this run"):
        make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2, max_length=48).train(resume_from_checkpoint=str(ckpt))
    # a finished checkpoint: transformers would train one step past max_steps and replace the run's adapter
    with pytest.raises(TrainingError, match="checkpoint-2 is at step 2 and this run ends at step 2"):
        make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2")
        )
    assert (tmp_path / "sparsepo_config.yaml").read_text() == config_before
    # "true" from a YAML or the command line means the folder's last complete checkpoint, not a path
    # named "true": one cut off mid-save (no trainer state, written last) is passed over, by name
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-10").mkdir()
    with caplog.at_level(logging.WARNING):
        trained = make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2).train(resume_from_checkpoint="true")
    assert trained.global_step == 2
    assert "checkpoint-10 has no trainer_state.json (cut off mid-save); resuming from" in caplog.text
    assert "resuming from " + str(tmp_path / "checkpoint-1") in caplog.text
    # a setting this loss does not read (alpha is TDPO2's) may differ
    assert make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2, alpha=0.9).train(resume_from_checkpoint=str(ckpt))


@pytest.mark.slow
def test_resuming_on_a_base_model_changed_in_place_is_refused(tmp_path):
    """The model folder re-saved with other weights under the same name and config (an SFT merged into
    it): the checkpoint's adapter was trained on the old weights, and resuming would go on from there."""
    base = save_tiny_llama(tmp_path / "base")
    ckpt = _checkpointed_run(base, tmp_path / "run")
    record = json.loads((ckpt / "base_model.json").read_text())
    assert record["model"] == base and record["quantization"] == "4bit" and record["device"] == "cpu"
    assert make_trainer(base, tmp_path / "run", "sparsepo", steps=3).train(resume_from_checkpoint=str(ckpt))
    save_tiny_llama(tmp_path / "base", seed=1)
    with pytest.raises(TrainingError, match=r"checkpoint-1/base_model.json: the base model .* has changed since "):
        make_trainer(base, tmp_path / "run", "sparsepo", steps=3).train(resume_from_checkpoint=str(ckpt))


@pytest.mark.slow
def test_resuming_into_another_runs_folder_and_overwriting_a_non_run_folder_are_refused(tiny_dir, tmp_path):
    ckpt = _checkpointed_run(tiny_dir, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="is not in it: resuming would mix two runs"):
        make_trainer(tiny_dir, tmp_path / "b", "sparsepo", steps=2).train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(TrainingError, match="holds no sparsepo_config.yaml, so it is no sparsepo-lite run"):
        make_trainer(tiny_dir, tmp_path / "b", "sparsepo", steps=2, overwrite_output_dir=True).train()
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    with pytest.raises(TrainingError, match="is the model's own folder"):
        make_trainer(tiny_dir, tiny_dir, "dpo", steps=2, overwrite_output_dir=True).train()
    assert os.path.isfile(os.path.join(tiny_dir, "config.json"))


def test_an_overwritten_run_survives_a_run_that_fails_before_or_in_its_first_step(tiny_dir, tmp_path):
    first = make_trainer(tiny_dir, tmp_path, "sparsepo", steps=1)
    first.train()
    first.save_model()
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if (tmp_path / n).is_file()}
    assert "adapter_model.safetensors" in before and "mask_net.safetensors" in before

    class NoOptimizer(SparsePOTrainer):
        def create_optimizer(self, model=None):
            raise RuntimeError("the optimizer could not be made")

    failing = make_trainer(tiny_dir, tmp_path, "dpo", steps=1, overwrite_output_dir=True)
    failing.__class__ = NoOptimizer
    with pytest.raises(RuntimeError, match="could not be made"):
        failing.train()
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if (tmp_path / n).is_file()}
    assert after == before  # nothing removed, nothing written

    class FailsInStep(SparsePOTrainer):  # e.g. a position table shorter than the batch, out of memory
        def compute_loss(self, *a, **k):
            raise RuntimeError("the first step failed")

    failing = make_trainer(tiny_dir, tmp_path, "dpo", steps=1, overwrite_output_dir=True)
    failing.__class__ = FailsInStep
    with pytest.raises(RuntimeError, match="the first step failed"):
        failing.train()
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # the old run back, no hidden folder left
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    assert after == before
    make_trainer(tiny_dir, tmp_path, "dpo", steps=1, overwrite_output_dir=True).train()
    names = os.listdir(tmp_path)
    assert "mask_net.safetensors" not in names  # a run that starts still replaces the old one
    assert not [n for n in names if n.startswith(".")]  # and deletes it once its first step ends
    # a process killed in its first step leaves the set-aside run, its only copy: it is named, not deleted
    (tmp_path / ".replaced-run-1").mkdir()
    (tmp_path / ".replaced-run-1" / "adapter_model.safetensors").write_bytes(before["adapter_model.safetensors"])
    with pytest.raises(TrainingError, match=r"holds \.replaced-run-1, a run set aside .* killed in its first step"):
        make_trainer(tiny_dir, tmp_path, "dpo", steps=1, overwrite_output_dir=True).train()
    assert (tmp_path / ".replaced-run-1" / "adapter_model.safetensors").read_bytes() == before[
        "adapter_model.safetensors"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "-1"], "--top-k must be >= 0, got -1"),
        (["--tail-samples", "-2"], "--tail-samples must be >= 0, got -2"),
        (["--tail-seed", "-5"], "--tail-seed must be >= 0, got -5"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    ],
)
def test_precompute_flags_are_named_before_the_config_is_read(tmp_path, flags, message):
    # the config does not exist: a flag error must come first, not after the data and the model load
    error = cli_error("precompute-ref", tmp_path / "missing.yaml", "--out", tmp_path / "cache", *flags)
    assert error == f"sparsepo-lite precompute-ref: {message}"
    assert not (tmp_path / "cache").exists()


def test_precompute_settings_are_checked_by_name_from_python_too(cache_setup, tmp_path):
    for kw, message in (
        ({"tail_seed": -1}, "tail_seed must be >= 0, got -1"),
        ({"top_k": -2}, "top_k must be >= 0, got -2"),
        ({"shard_size": 0}, "shard_size must be >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            build_cache(cache_setup, tmp_path / "cache", **kw)
        assert not (tmp_path / "cache" / "manifest.json").exists()


def test_loss_settings_the_loss_does_not_read_are_named(tmp_path, caplog):
    with pytest.raises(ValueError, match="mask_on_reward and mask_on_kl both false is TDPO1"):
        SparsePOConfig(output_dir=str(tmp_path), loss_type="sparsepo", mask_on_reward=False, mask_on_kl=False)
    with caplog.at_level(logging.WARNING, logger="sparsepo_lite.training.config"):
        SparsePOConfig(output_dir=str(tmp_path), loss_type="dpo", l1_reward=0.1, independent_masks=True, alpha=0.3)
    assert "loss_type dpo does not read independent_masks, l1_reward, alpha: ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsepo_lite.training.config"):
        SparsePOConfig(output_dir=str(tmp_path), loss_type="sparsepo", l1_reward=0.1, mask_on_kl=False)
        SparsePOConfig(output_dir=str(tmp_path), loss_type="tdpo2", alpha=0.3)
    assert "does not read" not in caplog.text


def test_rows_longer_than_the_models_context_are_refused_or_named(tiny_dir, tmp_path, caplog):
    from sparsepo_lite.data import tokenize_dataset
    from sparsepo_lite.training.trainer import check_lengths

    tok = load_tokenizer(tiny_dir)
    examples, _ = tokenize_dataset(review_rows(4), tok, max_length=32, max_prompt_length=16)
    longest = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    learned = transformers.GPT2Config(n_positions=longest - 1)  # a learned table: index error mid-step
    with pytest.raises(
        ValueError, match=rf"gpt2: eval row \d+ has {longest} tokens but the model's context is {longest - 1}"
    ):
        check_lengths(learned, {"train": examples[:0], "eval": examples}, "gpt2")
    check_lengths(learned, {"train": None, "eval": None}, "gpt2")  # a split left out
    check_lengths(transformers.GPT2Config(n_positions=longest), {"train": examples}, "gpt2")
    # rotary positions run on (rope scaling may stretch them): named in a warning, through the trainer
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    model.config.max_position_embeddings = longest - 1
    args = SparsePOConfig(output_dir=str(tmp_path), loss_type="dpo", max_length=32, max_prompt_length=16, use_cpu=True)
    with caplog.at_level(logging.WARNING, logger="sparsepo_lite.training.trainer"):
        SparsePOTrainer(model=model, args=args, train_dataset=review_rows(4), processing_class=tok)
    assert "LlamaForCausalLM: train row" in caplog.text and f"context is {longest - 1}" in caplog.text


def test_overwrite_never_deletes_what_the_run_reads(tiny_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    first = make_trainer(tiny_dir, run, "dpo", steps=1)
    first.train()
    first.save_model()  # the adapter and the tokenizer files
    kept = run / "checkpoint-100"  # say, an SFT checkpoint kept in the old run's folder
    shutil.copytree(tiny_dir, kept)
    with pytest.raises(TrainingError, match=r"would delete .*checkpoint-100, which holds the model this run reads"):
        make_trainer(str(kept), run, "dpo", steps=1, overwrite_output_dir=True).train()
    assert (kept / "config.json").is_file() and (run / "sparsepo_config.yaml").is_file()
    shutil.rmtree(kept)
    # a tokenizer read from the run folder itself, whose tokenizer files the new run would replace
    model, _ = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    args = SparsePOConfig(
        output_dir=str(run), overwrite_output_dir=True, max_steps=1, use_cpu=True, max_length=32, max_prompt_length=16
    )
    trainer = SparsePOTrainer(
        model=model, args=args, train_dataset=review_rows(8), processing_class=load_tokenizer(str(run))
    )
    with pytest.raises(TrainingError, match=r"would replace the files of .*run, the tokenizer this run reads"):
        trainer.train()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("adam_beta1", 2.0, "adam_beta1 must be < 1"),
        ("adam_beta2", -0.1, "adam_beta2 must be >= 0"),
        ("adam_epsilon", -1.0, "adam_epsilon must be >= 0"),
        ("seed", -1, "seed must be >= 0"),
        ("data_seed", 2**32, "data_seed must be <= 4294967295"),
        ("dataloader_num_workers", -1, "dataloader_num_workers must be >= 0"),
    ],
)
def test_optimizer_and_loader_settings_are_checked_by_name_before_anything_loads(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        SparsePOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})


@pytest.mark.slow
def test_reading_a_damaged_or_edited_run_names_the_file(cli_setup, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    assert run_cli("train", cli_setup / "cfg.yaml", "--output_dir", run).returncode == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in review_rows(3)))
    empty_prompt = tmp_path / "empty.jsonl"
    empty_prompt.write_text(
        "".join(json.dumps(r) + "\n" for r in [review_rows(1)[0], {**review_rows(1)[0], "prompt": " "}])
    )

    def broken(edit):
        copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
        shutil.copytree(run, copy)
        edit(copy)
        return cli_error("inspect-masks", copy, "--data", pairs, "--pairs", "2")

    assert "sparsepo_config.yaml: not valid YAML" in broken(
        lambda d: (d / "sparsepo_config.yaml").write_text((d / "sparsepo_config.yaml").read_text() + "beta: [\n")
    )
    assert "max_length must be an integer" in broken(
        lambda d: (d / "sparsepo_config.yaml").write_text(
            (d / "sparsepo_config.yaml").read_text().replace("max_length: 32", "max_length: abc")
        )
    )
    from sparsepo_lite.eval.runs import run_config

    future = tmp_path / "future"  # a field of another version, which no reader uses: read, with a warning
    shutil.copytree(run, future)
    (future / "sparsepo_config.yaml").write_text((run / "sparsepo_config.yaml").read_text() + "zz_new_field: 1\n")
    with caplog.at_level(logging.WARNING, logger="sparsepo_lite.eval.runs"):
        assert run_config(str(future))["zz_new_field"] == 1
    assert "unknown config key 'zz_new_field' ignored" in caplog.text
    assert "sparsepo_config.yaml: unknown config key 'lora_alhpa' (did you mean 'lora_alpha'?)" in broken(
        lambda d: (d / "sparsepo_config.yaml").write_text(
            (d / "sparsepo_config.yaml").read_text().replace("lora_alpha: 32", "lora_alhpa: 32")
        )
    )
    assert "lora_alpha is 4000 in its configuration but 32 in adapter_config.json" in broken(
        lambda d: (d / "sparsepo_config.yaml").write_text(
            (d / "sparsepo_config.yaml").read_text().replace("lora_alpha: 32", "lora_alpha: 4000")
        )
    )
    assert "mask_net.safetensors: not a readable safetensors file" in broken(
        lambda d: (d / "mask_net.safetensors").write_bytes((d / "mask_net.safetensors").read_bytes()[:40])
    )
    assert "adapter_model.safetensors: not a readable safetensors file" in broken(
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:40])
    )
    assert "mask_net.safetensors: common_net.layer_bias holds a non-finite value" in broken(
        lambda d: edit_safetensors(
            d / "mask_net.safetensors", lambda t: t.fill_(math.inf), name="common_net.layer_bias"
        )
    )
    assert "lora_A.weight holds a non-finite value (NaN or inf)" in broken(
        lambda d: edit_safetensors(d / "adapter_model.safetensors", lambda t: t.fill_(math.nan))
    )

    def drop_first_tensor(path):  # as an adapter from a run with fewer target modules lacks layers
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        del tensors[next(iter(tensors))]
        save_file(tensors, path, metadata={"format": "pt"})

    assert "adapter_model.safetensors: no weights for 1 LoRA tensors of this run's layers" in broken(
        lambda d: drop_first_tensor(d / "adapter_model.safetensors")
    )
    message = broken(lambda d: edit_safetensors(d / "adapter_model.safetensors", lambda t: t[:1].clone()))
    assert "adapter_model.safetensors: weights that do not fit this model (size mismatch for" in message
    for args, message in (
        (["inspect-masks", run, "--data", pairs, "--pairs", "-3"], "pairs must be >= 1"),
        (["eval-sentiment", run, "--data", pairs, "--prompts", "-1"], "prompts must be >= 1"),
        (["eval-sentiment", run, "--data", pairs, "--samples", "0"], "samples must be >= 1"),
        (["eval-sentiment", run, "--data", pairs, "--seed", "99999999999999999"], "seed must be <= 4294967295"),
        (["eval-sentiment", run, "--data", empty_prompt, "--prompts", "2"], "empty.jsonl: row 1: the prompt is empty"),
    ):
        assert message in cli_error(*args), args


def _rewrite_shard(cache, edit):
    """Change a committed shard's tensors and fix its checksum and size in the manifest, as a
    hostile or buggy writer could: only the value checks can catch it."""
    from safetensors.torch import load_file, save_file

    from sparsepo_lite.refcache.format import sha256_file

    path = cache / "train-00000.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _edit_manifest(
        cache,
        lambda m: m["splits"]["train"]["shards"][0].update(sha256=sha256_file(str(path)), bytes=path.stat().st_size),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["topk_logp"][0].fill_(float("-inf")), "most likely entry has probability below 1/V"),
        (lambda t: t["label_logp"][:3].fill_(-1e30), "label_logp below -10000"),
        (lambda t: t["label_logp"][:3].fill_(-1e-6), "label_logp exceeds its token's top-1 log-prob"),
    ],
)
def test_impossible_cache_values_are_refused_with_or_without_the_verify_pass(
    tiny_dir, cache_setup, tmp_path, edit, message
):
    cache = build_cache(cache_setup, tmp_path / "cache")
    _rewrite_shard(cache, edit)
    with pytest.raises(CacheError, match=message):
        verify_cache(str(cache))
    trainer = make_trainer(tiny_dir, tmp_path / "run", ref_cache=str(cache), verify_ref_cache=False, steps=2)
    with pytest.raises(CacheError, match=message):  # checked when the shard is first read
        trainer.train()


@pytest.mark.slow
def test_precompute_never_overwrites_unlisted_shard_files_and_rechecks_what_it_resumes(cache_setup, tmp_path):
    stranger = tmp_path / "x"
    stranger.mkdir()
    (stranger / "train-00000.safetensors").write_text("the user's own file")
    with pytest.raises(CacheError, match="no manifest.json: not a cache in progress"):
        build_cache(cache_setup, stranger)
    assert (stranger / "train-00000.safetensors").read_text() == "the user's own file"

    model, tok, examples = cache_setup
    cache = tmp_path / "cache"
    both = {"train": examples, "eval": examples[:8]}
    fp = run_fingerprint(model, tok, both, model_name=None, max_length=32, max_prompt_length=16)

    def stop(split, i):
        if (split, i) == ("train", 0):
            raise KeyboardInterrupt  # killed after the first shard

    with pytest.raises(KeyboardInterrupt):
        build_cache(cache_setup, cache, splits=both, fingerprint=fp, on_shard=stop)
    # resumed for the train split alone: the eval split keeps its data hash in the fingerprint
    train_fp = {k: v for k, v in fp.items() if k != "data_sha256/eval"}
    build_cache(cache_setup, cache, splits={"train": examples}, fingerprint=train_fp)
    assert read_manifest(str(cache))["fingerprint"]["data_sha256/eval"] == fp["data_sha256/eval"]
    # a committed shard damaged before a resume is found, not built on
    flip_a_byte(cache / "train-00001.safetensors")
    with pytest.raises(CacheError, match="train-00001.safetensors: checksum mismatch"):
        build_cache(cache_setup, cache, splits=both, fingerprint=fp)


def test_token_weights_with_tdpo2_are_refused_when_the_data_is_read(tiny_dir, tmp_path):
    from sparsepo_lite.data import PreferenceExample

    weighted = [PreferenceExample(0, [1, 2], [3, 4], [5, 6]), PreferenceExample(7, [1, 2], [3, 4], [5, 6], [1.0, 0.5])]
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    args = SparsePOConfig(output_dir=str(tmp_path), loss_type="tdpo2", report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=r"rows \[7\] have token weights, which loss_type tdpo2 does not support"):
        SparsePOTrainer(model=model, args=args, train_dataset=weighted, processing_class=tok)


def _model_folder(path, config, model_cls=None, tokenizer_from=None):
    """``config`` saved under ``path``, with random weights of ``model_cls`` and a tokenizer copied
    from ``tokenizer_from`` where given."""
    if model_cls is not None:
        torch.manual_seed(0)
        model_cls(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    if tokenizer_from is not None:
        transformers.AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_unsupported_models_are_refused_by_name_before_any_adapter(tiny_dir, tmp_path, quantization):
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    cases = [
        (
            _model_folder(tmp_path / "t5", transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2)),
            "t5: encoder-decoder models are not supported",
        ),
        (
            _model_folder(tmp_path / "vit", transformers.ViTConfig(**small)),
            "vit: transformers has no causal-LM class for vit models",
        ),
        (  # peft used to fail on it with an AttributeError naming nothing (4-bit)
            _model_folder(
                tmp_path / "bert",
                transformers.BertConfig(vocab_size=64, is_decoder=True, **small),
                transformers.BertLMHeadModel,
            ),
            "bert: need an lm_head without bias",
        ),
        (
            _model_folder(
                tmp_path / "softcap",
                transformers.Gemma2Config(vocab_size=64, head_dim=16, **small),
                transformers.Gemma2ForCausalLM,
            ),
            r"softcap transforms its logits \(final_logit_softcapping\)",
        ),
        (  # IBM ships 8-16: the op would train on logits 8-16x too sharp
            _model_folder(
                tmp_path / "granite",
                transformers.GraniteConfig(vocab_size=64, logits_scaling=8.0, **small),
                transformers.GraniteForCausalLM,
            ),
            r"granite transforms its logits \(logits_scaling\)",
        ),
        (str(tmp_path / "missing"), "missing: no such folder"),
        (str(tmp_path / "notes"), "notes: no model config could be read"),
    ]
    for folder, message in cases:
        with pytest.raises(ValueError, match=message):
            load_policy(ModelConfig(folder, quantization=quantization, lora_r=4), tokenizer=False)


def test_logit_transforms_are_refused_by_config_field_or_found_by_a_test_forward(tiny_dir, tmp_path):
    from sparsepo_lite.models import check_config, check_logits_are_the_head, quantize_linears_nf4
    from sparsepo_lite.refcache.fingerprint import weights_sha256

    for config, field in [
        (transformers.RecurrentGemmaConfig(), "logits_soft_cap"),
        (transformers.FalconH1Config(lm_head_multiplier=0.5), "lm_head_multiplier"),
        (transformers.Gemma3nConfig(), "final_logit_softcapping"),  # in its text_config
    ]:
        with pytest.raises(ValueError, match=rf"m transforms its logits \({field}\)"):
            check_config(config, "m")

    class HalvedLogits(transformers.LlamaForCausalLM):
        """A transform no config field names."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 2
            return out

    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    check_logits_are_the_head(model)  # a plain Llama, adapter and all
    # a 4-bit model that bitsandbytes may still repack (at an eval-mode forward on an AVX512-BF16 CPU,
    # into another layout and checksum), with a part in training mode: both as they were afterwards
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    quantized = transformers.LlamaForCausalLM(config)
    quantize_linears_nf4(quantized, torch.float32)
    quantized.eval()
    quantized.model.layers[0].mlp.train()
    before = weights_sha256(quantized)
    check_logits_are_the_head(quantized)
    assert weights_sha256(quantized) == before
    assert not quantized.training and quantized.model.layers[0].mlp.training
    # passed to the trainer already loaded: its reference passes may not repack it either (LoRA would
    # get no gradient), as load_policy sees to for the models it loads
    import peft

    policy = peft.get_peft_model(quantized, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    args = SparsePOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=32, max_prompt_length=16)
    SparsePOTrainer(model=policy, args=args, train_dataset=review_rows(4), processing_class=tok)
    flags = [m.support_avx512bf16_for_cpu for m in policy.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)
    odd = HalvedLogits.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="HalvedLogits: its logits are not its lm_head applied to its last hidden"):
        check_logits_are_the_head(odd)
    with pytest.raises(ValueError, match="HalvedLogits: its logits are not its lm_head"):  # a model passed in
        SparsePOTrainer(model=odd, args=args, train_dataset=review_rows(4), processing_class=tok)


@pytest.mark.parametrize(
    "config, missing",
    [
        (transformers.Phi3Config, r"'attn' hooks.*Phi3ForCausalLM has no 'self_attn.q_proj' in Phi3DecoderLayer"),
        (transformers.Olmo2Config, r"'resid' hooks.*Olmo2ForCausalLM has no 'input_layernorm' in Olmo2DecoderLayer"),
    ],
)
def test_mapo_on_a_model_without_its_hook_points_is_refused_when_the_trainer_is_built(
    tiny_dir, tmp_path, config, missing
):
    """Not at the first step with a traceback from torch's get_submodule: by the module it lacks."""
    folder = _model_folder(
        tmp_path / "model",
        config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        transformers.AutoModelForCausalLM.from_config,
        tokenizer_from=tiny_dir,
    )
    args = dict(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_length=32, max_prompt_length=16)
    with pytest.raises(ValueError, match=missing):
        SparsePOTrainer(
            model_config=ModelConfig(folder, lora_r=4),
            args=SparsePOConfig(loss_type="mapo", **args),
            train_dataset=review_rows(4),
        )
    uniform = SparsePOConfig(loss_type="mapo", mapo_mapping="uniform", **args)  # needs no hooks
    SparsePOTrainer(model_config=ModelConfig(folder, lora_r=4), args=uniform, train_dataset=review_rows(4))
    from sparsepo_lite.data import tokenize_dataset

    model, tok = load_policy(ModelConfig(folder, lora_r=4))  # and a cache of MaPO masks, before any batch
    examples, _ = tokenize_dataset(review_rows(4), tok, max_length=32, max_prompt_length=16)
    with pytest.raises(ValueError, match=missing):
        precompute_reference(
            model, tok, {"train": examples}, str(tmp_path / "cache"), fingerprint={}, mapo_mapping="zn_rescale"
        )
    assert not (tmp_path / "cache").exists()


def test_a_tokenizer_with_ids_past_the_embeddings_is_refused_by_name(tiny_dir, tmp_path):
    folder = _model_folder(
        tmp_path / "small-vocab",
        transformers.LlamaConfig(
            vocab_size=100, **{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
        ),
        transformers.LlamaForCausalLM,
        tokenizer_from=tiny_dir,
    )
    message = r"small-vocab: the tokenizer has 49152 tokens but the model's embeddings 100 rows"
    with pytest.raises(ValueError, match=message):
        load_policy(ModelConfig(folder, lora_r=4))
    with pytest.raises(ValueError, match=message):  # the trainer, which loads the tokenizer first
        SparsePOTrainer(
            model_config=ModelConfig(folder, lora_r=4),
            args=SparsePOConfig(
                output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_length=32, max_prompt_length=16
            ),
            train_dataset=review_rows(4),
        )
    with pytest.raises(ValueError, match="no tokenizer could be read"):
        load_tokenizer(str(tmp_path))


def test_a_bad_row_under_strict_data_names_the_split_and_its_file(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    good, bad = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in review_rows(4)))
    rows = review_rows(3)
    rows[2]["rejected"] = rows[2]["chosen"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SparsePOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], strict_data=True)
    with pytest.raises(ValueError, match=rf"^eval data \({bad}\): row 2: 'chosen' and 'rejected' are identical"):
        read_splits(tok, args, {"train": str(good), "eval": str(bad)})
    with pytest.raises(ValueError, match=r"^train data: row 2: 'chosen' and 'rejected' are identical"):
        read_splits(tok, args, {"train": rows})


def test_optimizer_moments_fit_their_parameter_or_stack_on_it():
    p = torch.zeros(4, 32)
    assert moment_fits(torch.zeros(4, 32), p)
    assert moment_fits(torch.zeros(2, 4, 32), p)  # bitsandbytes' AdEMAMix keeps two moments in one state1
    for shape in [(1, 32), (32,), (4, 33), (2, 2, 4, 32), (128,)]:
        assert not moment_fits(torch.zeros(shape), p), shape
    assert moment_fits(torch.zeros(()), torch.zeros(())) and not moment_fits(torch.zeros(3, 3), torch.zeros(()))


def test_model_paths_that_are_plainly_local_are_resolved_or_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_model_path("~/models/m") == str(tmp_path / "models" / "m")  # not left for a hub name
    with pytest.raises(ValueError, match=rf"^{tmp_path}/models/gone: no such folder"):
        resolve_model_path("~/models/gone")
    with pytest.raises(ValueError, match="^./not-here: no such folder"):
        resolve_model_path("./not-here")
    assert resolve_model_path("org/name") == "org/name"  # a hub name, or a relative folder: transformers decides
