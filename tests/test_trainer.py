"""SparsePOTrainer on a tiny 4-bit QLoRA Llama: loss falls, masks train and are saved, NaN steps skip."""

from __future__ import annotations

import math
import os

import pytest
import torch
import transformers

from sparsepo_lite.errors import TrainingError
from sparsepo_lite.masks import load_masks
from sparsepo_lite.models import ModelConfig, load_policy
from sparsepo_lite.training import SparsePOConfig, SparsePOTrainer

from conftest import review_rows

rows = review_rows


def make_trainer(tiny_dir, out, loss_type="sparsepo", steps=30, callbacks=None, **kw):
    transformers.set_seed(0)  # LoRA init
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=8, gradient_checkpointing=False))
    opts = dict(
        output_dir=str(out),
        loss_type=loss_type,
        beta=0.5,
        learning_rate=1e-2,
        mask_init_std=0.3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=steps,
        logging_steps=5,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        max_length=32,
        max_prompt_length=16,
        seed=0,
        use_cpu=True,
    )
    args = SparsePOConfig(**{**opts, **kw})
    return SparsePOTrainer(
        model=model,
        args=args,
        train_dataset=rows(32),
        eval_dataset=rows(16, offset=100),
        processing_class=tok,
        callbacks=callbacks,
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sparsepo", "tdpo2"])
def test_training_learns_the_preference_and_saves_adapter_and_masks(tiny_dir, tmp_path, loss_type):
    trainer = make_trainer(tiny_dir, tmp_path, loss_type)
    before = trainer.evaluate()
    masks0 = None if trainer.masks is None else [p.detach().clone() for p in trainer.masks.parameters()]
    trainer.train()
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/accuracies"] > 0.5
    assert all(math.isfinite(v) for v in after.values() if isinstance(v, float))
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in files and "data_report_train.json" in files
    if loss_type == "sparsepo":
        assert any(not torch.equal(a, p) for a, p in zip(masks0, trainer.masks.parameters()))
        loaded = load_masks(str(tmp_path / "final"))
        for a, b in zip(loaded.state_dict().values(), trainer.masks.state_dict().values()):
            torch.testing.assert_close(a, b.cpu())
        first = trainer.state.log_history[0]
        assert {"mask/dead", "mask/dead_pairs", "mask/mean", "mask/drift", "mask/grad_norm"} <= set(first)
        assert trainer.state.log_history[-2]["mask/drift"] > first["mask/drift"] > 0


def test_mask_gradients_do_not_accumulate_across_steps(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, "sparsepo", steps=2)
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(all(p.grad is None for p in trainer.masks.parameters()))

    trainer.add_callback(Spy())
    trainer.train()
    assert seen == [True, True]


def test_non_finite_loss_skips_the_step(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, "dpo", steps=1)
    trainer.loss_config.beta = float("nan")
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    with pytest.raises(TrainingError, match="1 of 1 optimizer steps were skipped"):  # a run that never trained
        trainer.train()
    assert trainer.skipped_steps == 1
    for n, p in trainer.model.named_parameters():
        if n in lora:
            assert torch.equal(p, lora[n]), n


def test_bad_rows_are_reported_not_fatal(tiny_dir, tmp_path):
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    args = SparsePOConfig(
        output_dir=str(tmp_path),
        loss_type="dpo",
        max_steps=1,
        report_to=[],
        use_cpu=True,
        max_length=32,
        max_prompt_length=16,
    )
    data = rows(4) + [{"prompt": "x", "chosen": "same", "rejected": "same"}, {"chosen": 1}]
    trainer = SparsePOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    rep = trainer.data_reports["train"]
    assert rep.kept == 4 and [i for i, _ in rep.dropped] == [4, 5]
    with pytest.raises(ValueError, match="loss_type must be one of"):
        SparsePOConfig(output_dir=str(tmp_path), loss_type="orpo", report_to=[])


@pytest.mark.slow
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    class StopAt2(transformers.TrainerCallback):  # an interruption right after the step-2 checkpoint
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out, resume=None, stop=False):
        trainer = make_trainer(
            tiny_dir,
            out,
            "sparsepo",
            steps=4,
            save_strategy="steps",
            save_steps=2,
            callbacks=[StopAt2()] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        return lora, [p.detach().clone() for p in trainer.masks.parameters()], trainer.state.global_step

    # (This test found the mask nets' gradients piling up across steps: the Trainer's
    # model.zero_grad() does not reach them.)
    full_lora, full_masks, _ = run(tmp_path / "full")
    _, _, stopped_at = run(tmp_path / "part", stop=True)
    assert stopped_at == 2 and (tmp_path / "part" / "checkpoint-2" / "mask_net.safetensors").is_file()
    checkpoint = set(os.listdir(tmp_path / "part" / "checkpoint-2"))
    assert "training_args.json" in checkpoint and "training_args.bin" not in checkpoint  # no pickle
    resumed_lora, resumed_masks, _ = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    for n, p in full_lora.items():
        torch.testing.assert_close(resumed_lora[n], p, rtol=0, atol=0, msg=n)
    for a, b in zip(resumed_masks, full_masks):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_model_config_beside_the_training_config_loads_the_policy(tiny_dir, tmp_path):
    args = SparsePOConfig(
        output_dir=str(tmp_path),
        loss_type="dpo",
        max_steps=1,
        report_to=[],
        use_cpu=True,
        max_length=32,
        max_prompt_length=16,
    )
    model_config = ModelConfig(tiny_dir, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    trainer = SparsePOTrainer(model_config=model_config, args=args, train_dataset=rows(4))
    lora = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert lora and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in lora)
    assert trainer.model.peft_config["default"].r == 4
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(tiny_dir, quantization="8bit")
    assert trainer.run_config["lora_target_modules"] == ["q_proj", "v_proj"]  # the run folder records the model


@pytest.mark.slow
def test_two_processes_keep_identical_weights_and_learn(tiny_dir, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): compute_loss bypasses DDP's forward, so without
    the trainer's own gradient all-reduce the ranks would drift apart (checked: by ~0.1 here)."""
    import json
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        worker,
        tiny_dir,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "log_history.json") as f:
        log = json.load(f)
    assert log["world"] == 2
    # each process measured its own half of the held-out rows: the logged metrics cover both halves
    for key in ("logps/chosen", "logps/rejected", "rewards/accuracies", "kl/chosen"):
        assert log["held_out"]["eval_" + key] == pytest.approx(log["whole"][key], rel=1e-5, abs=1e-6), key
    losses = [h["loss"] for h in log["log_history"] if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert set(w0) == set(w1) and any(k.startswith("masks.") for k in w0)
    saved = load_masks(str(tmp_path / "final"))
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, w0["masks." + k], rtol=0, atol=0)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)


class _ThreadLog(transformers.TrainerCallback):
    def __init__(self):
        self.threads = []

    def on_step_end(self, args, state, control, **kwargs):
        self.threads.append(torch.get_num_threads())


@pytest.mark.parametrize("guard_on", [True, False])
def test_cpu_load_guard_runs_on_one_thread_while_the_machine_is_busy(tiny_dir, tmp_path, monkeypatch, guard_on):
    """The trainer checks the load before each step: one thread from the first busy check, the usual
    count after three quiet ones in a row, and that count again when training ends. The pair shards
    run at every step, on one thread each, whatever the guard chose for torch."""
    import sparsepo_lite.training.trainer as trainer_module
    from sparsepo_lite.waits import LoadGuard

    real, shards = trainer_module.sharded_loss, []
    monkeypatch.setattr(
        trainer_module, "sharded_loss", lambda pool, *a, **k: shards.append(pool.threads) or real(pool, *a, **k)
    )

    readings = iter([5, 0, 0, 0, 0])  # others' runnable threads, one read per check
    monkeypatch.setattr(
        trainer_module,
        "cpu_load_guard",
        lambda: LoadGuard(torch.get_num_threads(), 2, samples=1, interval_s=0, others=lambda: next(readings)),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        log = _ThreadLog()
        trainer = make_trainer(tiny_dir, tmp_path, "dpo", steps=5, callbacks=[log], cpu_load_guard=guard_on)
        trainer.train()
        assert log.threads == ([1, 1, 1, 2, 2] if guard_on else [2] * 5)
        assert shards == [2] * 5
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("busy, guard_on, threads", [(True, True, 1), (False, True, 2), (True, False, 2)])
def test_the_model_loads_on_one_thread_while_the_machine_is_busy(
    tiny_dir, tmp_path, monkeypatch, busy, guard_on, threads
):
    """Where the threads spin long, the model load checks the load once: one thread for the load while
    the machine is oversubscribed, the caller's count again afterwards (also when the load fails);
    training's cpu_load_guard setting reaches it."""
    import sparsepo_lite.models as models
    from sparsepo_lite.training.trainer import load_model
    from sparsepo_lite.waits import LoadGuard

    auto = transformers.AutoModelForCausalLM
    seen, real = [], auto.from_pretrained
    monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    monkeypatch.setattr(
        models.waits,
        "cpu_load_guard",
        lambda: LoadGuard(torch.get_num_threads(), 2, samples=1, interval_s=0, others=lambda: 5 if busy else 0),
    )
    args = SparsePOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], cpu_load_guard=guard_on)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load_model(ModelConfig(tiny_dir, lora_r=4, quantization="none"), args)
        assert seen == [threads] and torch.get_num_threads() == 2

        def fail(*a, **k):
            raise OSError("unreadable weights")

        monkeypatch.setattr(auto, "from_pretrained", fail)
        with pytest.raises(OSError, match="unreadable weights"):
            load_model(ModelConfig(tiny_dir, lora_r=4, quantization="none"), args)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _FailAtStep(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt  # what a notebook's stop button raises


def test_cpu_load_guard_restores_the_threads_when_training_fails(tiny_dir, tmp_path, monkeypatch):
    """The Trainer skips on_train_end when training raises: the threads come back all the same."""
    import sparsepo_lite.training.trainer as trainer_module
    from sparsepo_lite.waits import LoadGuard

    monkeypatch.setattr(
        trainer_module,
        "cpu_load_guard",
        lambda: LoadGuard(torch.get_num_threads(), 2, samples=1, interval_s=0, others=lambda: 5),  # always busy
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        log = _ThreadLog()
        trainer = make_trainer(tiny_dir, tmp_path, "dpo", steps=5, callbacks=[log, _FailAtStep()])
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        assert log.threads == [1, 1]  # the guard was in force
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "2000"}])
def test_cpu_load_guard_stays_out_with_passive_waits_or_short_spins(tiny_dir, tmp_path, monkeypatch, env):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    trainer = make_trainer(tiny_dir, tmp_path, "dpo", steps=1)
    trainer.train()
    assert not [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "_CPULoadGuard"]


class _FirstGradients(transformers.TrainerCallback):
    """The trained parameters' gradients just before the first optimizer step, and the threads."""

    def __init__(self, trainer):
        self.trainer, self.grads = trainer, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = [p.grad.clone() for p in self.trainer.optimizer.param_groups[0]["params"]]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_pair_threads_step_matches_the_whole_batch_step(tiny_dir, tmp_path, monkeypatch, accumulate):
    """cpu_pair_threads runs each micro-batch in shards (counted here) and gives the whole batch's
    gradients, losses and metrics, in training and evaluation; off, no shard runs."""
    import sparsepo_lite.training.trainer as trainer_module

    calls = []
    real = trainer_module.sharded_loss
    monkeypatch.setattr(trainer_module, "sharded_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = {}
        for on in (True, False):
            calls.clear()
            trainer = make_trainer(
                tiny_dir, tmp_path / str(on), steps=2, cpu_pair_threads=on, gradient_accumulation_steps=accumulate
            )
            first = _FirstGradients(trainer)
            trainer.add_callback(first)
            out = trainer.train()
            got[on] = (first.grads, out.training_loss, trainer.evaluate(), len(calls))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    (grads, loss, evals, shards), (want_grads, want_loss, want_evals, no_shards) = got[True], got[False]
    assert shards == 2 * accumulate + 2 and no_shards == 0  # 16 eval rows: 2 batches of 8
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())
    assert loss == pytest.approx(want_loss, rel=1e-4)
    for k, v in want_evals.items():
        if k.startswith("eval_") and "runtime" not in k and "per_second" not in k:
            assert evals[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_a_subclass_compute_loss_runs_on_whole_batches(tiny_dir, tmp_path, monkeypatch):
    """The shards call the package's loss directly: a trainer whose compute_loss was replaced keeps
    getting every micro-batch whole."""
    import sparsepo_lite.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "sharded_loss", lambda *a, **k: pytest.fail("ran in shards"))
    seen = []

    class Custom(SparsePOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(inputs["input_ids"].shape[0])
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = make_trainer(tiny_dir, tmp_path / "plain", steps=1)
        Custom(
            model=plain.model, args=plain.args, train_dataset=rows(8), processing_class=plain.processing_class
        ).train()
    finally:
        torch.set_num_threads(threads)
    assert seen == [8]  # one micro-batch of 4 pairs, whole


def test_dropout_trains_on_whole_batches_and_evaluation_leaves_no_threads(tiny_dir, tmp_path, monkeypatch):
    """With dropout the shards would draw from one random generator in thread order: training runs
    whole batches (evaluation, in eval mode, still runs in shards); evaluate() closes its threads."""
    import threading

    import sparsepo_lite.training.trainer as trainer_module

    real = trainer_module.sharded_loss
    calls = []

    def spy(pool, model, batch, config, **kw):
        calls.append(model.training)
        return real(pool, model, batch, config, **kw)

    monkeypatch.setattr(trainer_module, "sharded_loss", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = make_trainer(tiny_dir, tmp_path, "dpo", steps=1)
        layer = next(m for m in trainer.model.modules() if hasattr(m, "lora_dropout"))
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)  # what ModelConfig(lora_dropout=0.1) makes
        trainer.train()
        assert calls == []
        trainer.evaluate()
        assert calls == [False, False]
        assert not [t for t in threading.enumerate() if t.name.startswith("sparsepo-pairs")]
    finally:
        torch.set_num_threads(threads)
