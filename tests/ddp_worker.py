"""Worker for test_trainer's 2-process run: ``accelerate launch --multi_gpu --num_processes 2 ddp_worker.py TINY OUT``.

Each rank trains the same tiny 4-bit QLoRA SparsePO run on its shard of the data and writes its
final LoRA and mask weights to ``OUT/rank{r}.safetensors``; rank 0 also writes the log history.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from sparsepo_lite.data import PreferenceCollator, pad_id, tokenize_dataset
from sparsepo_lite.objective import compute_loss

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import make_trainer  # noqa: E402

from conftest import review_rows  # noqa: E402

tiny_dir, out = sys.argv[1], sys.argv[2]
trainer = make_trainer(
    tiny_dir, out, "sparsepo", steps=12, per_device_train_batch_size=2, per_device_eval_batch_size=2, logging_steps=3
)
trainer.train()
trainer.save_model(os.path.join(out, "final"))  # every rank calls it; the files come from rank 0
rank = trainer.args.process_index
weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
weights.update({"masks." + n: p.detach().clone() for n, p in trainer.masks.named_parameters()})
save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
# held-out metrics over both processes' shards, and the same rows in this process alone
rows = review_rows(8, offset=50)
held_out = trainer.evaluate(rows)
examples, _ = tokenize_dataset(rows, trainer.processing_class, max_length=32, max_prompt_length=16)
with torch.no_grad():
    _, whole = compute_loss(
        trainer.model, PreferenceCollator(pad_id(trainer.processing_class))(examples), trainer.loss_config
    )
if rank == 0:
    with open(os.path.join(out, "log_history.json"), "w") as f:
        json.dump(
            {
                "world": trainer.args.world_size,
                "log_history": trainer.state.log_history,
                "held_out": held_out,
                "whole": whole,
            },
            f,
        )
