"""The fingerprint of a run: everything a cache's contents depend on (model, quantisation, tokenizer,
chat template, tokenised data, truncation, package version). Training compares it with the cache's.

Its model part (:func:`model_identity`) is also what a run folder and each of its checkpoints record
of the base they trained on (:data:`BASE_MODEL_FILE`), so that a base changed in place under a run is
found by whatever reads the run again (resume, evaluation, the mask page)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Dict, Optional, Sequence

import torch

from ..data import PreferenceExample
from ..models import unwrap
from .format import CacheError, dtype_name, sha256_json

logger = logging.getLogger(__name__)

#: The file of a run folder (and of each checkpoint) that records the base model the adapter was
#: trained on: :func:`model_identity` plus the device type it was computed on.
BASE_MODEL_FILE = "base_model.json"
#: The fields of :func:`model_identity` that identify a model (the name is how a run spelled it).
IDENTITY_FIELDS = ("model_config_sha256", "quantization", "compute_dtype", "weights_sha256")


def examples_sha256(examples: Sequence[PreferenceExample]) -> str:
    """Hash of the tokenised pairs: data, tokenizer, chat template and truncation in one number."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.index, e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


#: Signed integers of each element size, to read a tensor's bits as numbers.
_BITS_AS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_sha256(lm) -> str:
    """Hash of the bits of every base weight of ``lm`` (a causal LM, peft-wrapped or not; LoRA
    adapters left out), 4-bit codes included, so that a model changed in place under the same name
    and config (an SFT merged into its folder) does not pass for the one a cache was made from.

    Each tensor enters as two integer sums of its bits (all of them, and every 7th), which are
    exact and so the same on any device and thread count; float sums are not (torch's CPU sum of
    SmolLM2's head in float64 differs in its last digit between 1 and 2 threads)."""
    entries, sums = [], []
    with torch.no_grad():
        for name, p in unwrap(lm).named_parameters():
            if "lora_" in name:
                continue
            bits = p.detach().contiguous().view(-1).view(_BITS_AS[p.element_size()])
            entries.append([name.replace(".base_layer", ""), list(p.shape), dtype_name(p.dtype)])
            # in pieces: a sum to int64 converts its input first, 8x a 4-bit tensor's bytes, which
            # for an 8B model's embedding would be 4.8 GB more on the GPU at once
            for part in (bits, bits[::7]):
                sums.append(torch.stack([c.sum(dtype=torch.int64) for c in part.split(1 << 24)]).sum())
        device = sums[0].device if sums else "cpu"
        values = torch.stack([s.to(device) for s in sums]).tolist() if sums else []  # one sync
    for i, entry in enumerate(entries):
        entry += values[2 * i : 2 * i + 2]
    return sha256_json(entries)


def model_identity(lm, name: str) -> Dict[str, str]:
    """Name, config hash, quantization, compute dtype and :func:`weights_sha256`."""
    lm = unwrap(lm)
    quantization = "4bit" if getattr(lm, "is_loaded_in_4bit", False) else "none"
    cfg = {
        k: v
        for k, v in lm.config.to_dict().items()
        if not k.startswith("_")
        and k not in ("transformers_version", "torch_dtype", "dtype", "quantization_config", "use_cache")
    }
    return {
        "model": name,
        "model_config_sha256": sha256_json(cfg),
        "quantization": quantization,
        "compute_dtype": dtype_name(lm.get_output_embeddings().weight.dtype),
        "weights_sha256": weights_sha256(lm),
    }


def tokenizer_identity(tokenizer) -> Dict[str, str]:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": sha256_json([vocab, special]),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }


def base_model_record(lm, name: str) -> Dict[str, str]:
    """What :data:`BASE_MODEL_FILE` holds for the base of the peft policy ``lm``: its
    :func:`model_identity` and the type of the device it sits on."""
    return {**model_identity(lm, name), "device": next(unwrap(lm).parameters()).device.type}


def check_base_model(recorded: Dict[str, object], identity: Dict[str, str], where: str) -> None:
    """Raise ``ValueError`` when ``identity`` (the :func:`base_model_record` of the base loaded now)
    is not the base ``recorded`` in the file ``where`` (a :data:`BASE_MODEL_FILE`).

    The config checksum is always compared. The weights checksum is compared where the base was
    loaded as in training: the same quantisation and compute dtype (``dtype: auto`` gives bfloat16 on
    a GPU and float32 on the CPU), and for a 4-bit base the same device type (each device's kernels
    quantise). Otherwise the weights cannot be compared, which is logged."""
    if not isinstance(recorded, dict) or any(key not in recorded for key in IDENTITY_FIELDS):
        raise ValueError(f"{where}: not a base model record (it needs {', '.join(IDENTITY_FIELDS)})")

    def changed(key: str) -> ValueError:
        return ValueError(
            f"{where}: the base model {recorded.get('model')!r} has changed since this run trained on it "
            f"({key} is {recorded[key]!r} there but {identity[key]!r} for the model loaded now); load the base "
            "the run was trained on (an adapter on another base is another model)"
        )

    if recorded["model_config_sha256"] != identity["model_config_sha256"]:
        raise changed("model_config_sha256")
    loaded = {key: identity.get(key) for key in ("quantization", "compute_dtype", "device")}
    if identity["quantization"] != "4bit":
        del loaded["device"]  # unquantised weights have the same bits on every device
    if any(recorded.get(key) != value for key, value in loaded.items()):
        logger.warning(
            "%s: the base is loaded as %s, not as in training (%s), so its weights cannot be compared with the "
            "checksum the run recorded; only its config is",
            where,
            loaded,
            {key: recorded.get(key) for key in loaded},
        )
    elif recorded["weights_sha256"] != identity["weights_sha256"]:
        raise changed("weights_sha256")


def run_fingerprint(
    lm,
    tokenizer,
    splits: Dict[str, Sequence[PreferenceExample]],
    *,
    model_name: Optional[str],
    max_length: int,
    max_prompt_length: int,
    identity: Optional[Dict[str, str]] = None,
) -> Dict[str, object]:
    """Everything a cache's contents depend on. Training compares it field by field.

    lm: the reference (or the peft policy whose base it is); model_name: how the run names it
    (None: the model's own ``name_or_path``); identity: ``lm``'s :func:`model_identity`, where the
    caller has it already (it reads every weight).
    """
    from .. import __version__

    model_name = model_name or unwrap(lm).config.name_or_path
    identity = identity or model_identity(lm, model_name)
    fp = {
        **{key: value for key, value in identity.items() if key != "device"},
        "model": model_name,
        **tokenizer_identity(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "package_version": __version__,
    }
    for split, examples in splits.items():
        fp[f"data_sha256/{split}"] = examples_sha256(examples)
    return fp


#: Fingerprint fields recorded for people, not compared: the model is identified by its config and
#: weights checksums, and the name is only how a run spelled it (``./model``, an absolute path, a
#: hub name of the same weights).
RECORDED_ONLY = ("model",)


def compare_fingerprints(cached: Dict[str, object], run: Dict[str, object], where: str) -> None:
    """Raise naming the first field that differs. Splits the run does not use are not compared, nor
    the fields in :data:`RECORDED_ONLY`."""
    for key, value in run.items():
        if key in RECORDED_ONLY:
            continue
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
