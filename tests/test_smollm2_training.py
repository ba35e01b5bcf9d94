"""Short real runs: every loss type on SmolLM2-135M-Instruct in 4-bit with LoRA, on the example
preference set (examples/data/polite_pairs.*): training loss falls, held-out accuracy > 0.5."""

from __future__ import annotations

import os

import pytest

from sparsepo_lite.data import read_rows
from sparsepo_lite.models import SMOLLM2, ModelConfig, load_policy
from sparsepo_lite.training import SparsePOConfig, SparsePOTrainer

pytestmark = pytest.mark.slow  # trains or runs real models, compiles, or starts processes

DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "polite_pairs.{}.jsonl")


@pytest.mark.parametrize("loss_type", ["dpo", "tdpo1", "tdpo2", "sparsepo", "mapo"])
def test_each_loss_learns_on_smollm2(loss_type, tmp_path):
    model, tok = load_policy(ModelConfig(SMOLLM2, lora_r=8, gradient_checkpointing=False))
    # Kept short for CI (4-bit matmuls on the CPU de-quantise on every call): 8 steps of 4 pairs,
    # 8 held-out pairs.
    args = SparsePOConfig(
        output_dir=str(tmp_path),
        loss_type=loss_type,
        beta=0.1,
        learning_rate=3e-4,
        mask_learning_rate=1e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=8,
        logging_steps=4,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        max_length=80,
        max_prompt_length=40,
        seed=0,
        use_cpu=True,
    )
    trainer = SparsePOTrainer(
        model=model,
        args=args,
        train_dataset=DATA.format("train"),
        eval_dataset=read_rows(DATA.format("eval"))[:8],
        processing_class=tok,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/accuracies"] > 0.5, after
