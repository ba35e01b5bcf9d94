"""Worker for test_precompute's kill test: precompute a small cache, optionally SIGKILL-ing itself
after writing the temporary file of shard N (before its rename), as a crash mid-shard would."""

import argparse
import os
import signal
import sys

import transformers

sys.path.insert(0, os.path.dirname(__file__))
import sparsepo_lite.refcache.writer as pre  # noqa: E402
from sparsepo_lite.data import tokenize_dataset  # noqa: E402
from sparsepo_lite.models import ModelConfig, load_policy  # noqa: E402
from sparsepo_lite.refcache import run_fingerprint  # noqa: E402

from conftest import review_rows  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--kill-in-shard", type=int, default=None)
a = ap.parse_args()

transformers.set_seed(0)
model, tok = load_policy(ModelConfig(a.model, lora_r=4, gradient_checkpointing=False))
examples, _ = tokenize_dataset(review_rows(14), tok, max_length=32, max_prompt_length=16)
fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)

if a.kill_in_shard is not None:
    from safetensors.torch import save_file

    def save_then_die(tensors, path):
        if path.endswith(f"-{a.kill_in_shard:05d}.safetensors"):
            save_file(tensors, f"{path}.tmp-{os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(tensors, path)

    real_save, pre._save_atomic = pre._save_atomic, save_then_die

pre.precompute_reference(
    model, tok, {"train": examples}, a.out, fingerprint=fp, top_k=8, batch_size=3, shard_size=4, progress=False
)
