"""The fingerprint of a run: everything a cache's contents depend on (model, quantisation, tokenizer,
chat template, tokenised data, truncation, package version). Training compares it with the cache's."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, Optional, Sequence

from ..data import PreferenceExample
from ..models import unwrap
from .format import CacheError, dtype_name, sha256_json


def examples_sha256(examples: Sequence[PreferenceExample]) -> str:
    """Hash of the tokenised pairs: data, tokenizer, chat template and truncation in one number."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.index, e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


def model_identity(lm, name: str) -> Dict[str, str]:
    """Name, config hash, quantization and a probe of the (never quantized) head weights."""
    lm = unwrap(lm)
    quantization = "4bit" if getattr(lm, "is_loaded_in_4bit", False) else "none"
    cfg = {
        k: v
        for k, v in lm.config.to_dict().items()
        if not k.startswith("_")
        and k not in ("transformers_version", "torch_dtype", "dtype", "quantization_config", "use_cache")
    }
    head = lm.get_output_embeddings().weight.detach()
    probe = head.double()
    return {
        "model": name,
        "model_config_sha256": sha256_json(cfg),
        "quantization": quantization,
        "compute_dtype": dtype_name(head.dtype),
        "head_probe": f"{probe.sum().item():.17g}/{probe.square().sum().item():.17g}",
    }


def tokenizer_identity(tokenizer) -> Dict[str, str]:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": sha256_json([vocab, special]),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }


def run_fingerprint(
    lm,
    tokenizer,
    splits: Dict[str, Sequence[PreferenceExample]],
    *,
    model_name: Optional[str],
    max_length: int,
    max_prompt_length: int,
) -> Dict[str, object]:
    """Everything a cache's contents depend on. Training compares it field by field.

    lm: the reference (or the peft policy whose base it is); model_name: how the run names it
    (None: the model's own ``name_or_path``).
    """
    from .. import __version__

    model_name = model_name or unwrap(lm).config.name_or_path
    fp = {
        **model_identity(lm, model_name),
        **tokenizer_identity(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "package_version": __version__,
    }
    for split, examples in splits.items():
        fp[f"data_sha256/{split}"] = examples_sha256(examples)
    return fp


def compare_fingerprints(cached: Dict[str, object], run: Dict[str, object], where: str) -> None:
    """Raise naming the first field that differs. Splits the run does not use are not compared."""
    for key, value in run.items():
        if key not in cached:
            raise CacheError(
                f"{where}: the cache has no {key!r} (it was made without that split or by "
                f"another version); precompute it again for this run"
            )
        if cached[key] != value:
            raise CacheError(
                f"{where} was made for a different run: {key} is {cached[key]!r} in the cache "
                f"but {value!r} now; precompute the reference again (or fix the config)"
            )
