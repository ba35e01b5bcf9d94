"""The reference cache's on-disk format: layout, constants, manifest checks, errors.

Layout of a cache directory (no pickle anywhere: safetensors and JSON)::

    manifest.json                 fingerprint, contents, and per split the list of complete shards
    train-00000.safetensors ...   one shard per ``shard_size`` examples, written atomically
    eval-00000.safetensors ...

A shard holds E examples (pairs) and their Nt response tokens, example by example, chosen tokens
then rejected tokens:

    row_index   [E]      int64    the example's row in the dataset (PreferenceExample.index)
    tokens      [E, 2]   int64    response tokens of (chosen, rejected)
    label_logp  [Nt]     float32  log q(y_t), exact
    topk_ids    [Nt, k]  int32    the reference's k most likely tokens (k > 0)
    topk_logp   [Nt, k]  16-bit   their log-probs (float16 by default; bfloat16/float32 on request)
    tail_ids    [Nt, m]  int32    m tokens drawn from the reference outside its top-k (m > 0)
    tail_logp   [Nt, m]  16-bit   their log-probs on the top-k's scale, log(q(v) r_hat / r), same dtype as
                                 topk_logp (writer.reference_token_stats)
    hidden      [Nt, H]  model dtype  final hidden states (``store_hidden``: exact KL)
    mapo_mask   [Nt]     float32  MaPO token weights (caches made with loss_type mapo)

Storage per response token: 4 + 6k + 6m bytes with 16-bit log-probs (+ 4 with MaPO masks, + H x dtype
with hidden states).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

MANIFEST = "manifest.json"
#: The default cache: the reference's 16 most likely tokens and 64 draws from the rest per response
#: token (4 + 96 + 384 = 484 payload bytes per token with 16-bit log-probs). At equal storage, draws
#: buy more accuracy than top-k entries: the KL error shrinks as 1/sqrt(m) and barely depends on k
#: (bench/bench_ref_cache.py, docs/reference-cache.md).
DEFAULT_TOP_K = 16
DEFAULT_TAIL_SAMPLES = 64
FORMAT = "sparsepo-lite-ref-cache"
FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
}  # safetensors' dtype names


class CacheError(ValueError):
    """A cache that cannot be used: missing, corrupted, or made for a different run."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- manifest ------------------------------------------------------------------------------------


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.safetensors"


def read_manifest(cache_dir: str) -> dict:
    """The cache's manifest, checked field by field: a malformed one raises :class:`CacheError` with
    one line naming the file and the field. Shard files must be the names precompute writes, so no
    manifest can point outside the cache directory."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isdir(cache_dir):
        raise CacheError(f"reference cache not found: {cache_dir} is not a directory")
    if not os.path.isfile(path):
        raise CacheError(f"{path} is missing: not a reference cache, or its precompute never finished a shard")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise CacheError(f"{path}: unreadable manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} manifest (field 'format')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: format version {manifest.get('format_version')!r}, this package reads {FORMAT_VERSION}"
        )
    _check_manifest_fields(path, manifest)
    return manifest


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENTS = {  # field: (type, predicate on the value, what it must be)
    "top_k": (int, lambda v: v >= 0, "an integer >= 0"),
    "tail_samples": (int, lambda v: v >= 0, "an integer >= 0"),
    "topk_dtype": (str, lambda v: v in ("float16", "bfloat16", "float32"), "float16, bfloat16 or float32"),
    "store_hidden": (bool, None, "true or false"),
    "hidden_dtype": ((str, type(None)), lambda v: v is None or v in DTYPES, "null or a float dtype"),
    "hidden_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "vocab_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "mapo_masks": (bool, None, "true or false"),
    "shard_size": (int, lambda v: v >= 1, "an integer >= 1"),
}
_SHARD = {
    "sha256": (str, _SHA256.fullmatch, "64 lowercase hex digits"),
    "bytes": (int, lambda v: v >= 0, "an integer >= 0"),
    "examples": (int, lambda v: v >= 1, "an integer >= 1"),
    "tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "first_row": (int, lambda v: v >= 0, "an integer >= 0"),
}


def _check_fields(path: str, where: str, obj, spec) -> None:
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: field {where!r} must be an object, got {type(obj).__name__}")
    for key, (kind, ok, what) in spec.items():
        value = obj.get(key)
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if key not in obj or wrong_type or (ok is not None and not ok(value)):
            raise CacheError(f"{path}: field '{where}.{key}' must be {what}, got {value!r}"[:300])


def _check_manifest_fields(path: str, manifest: dict) -> None:
    fp = manifest.get("fingerprint")
    if not isinstance(fp, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool, type(None))) for k, v in fp.items()
    ):
        raise CacheError(f"{path}: field 'fingerprint' must be an object of plain values")
    contents = manifest.get("contents")
    if isinstance(contents, dict):
        contents.setdefault("tail_samples", 0)  # caches written before tail samples existed
    _check_fields(path, "contents", contents, _CONTENTS)
    if contents["tail_samples"] and not contents["top_k"]:
        raise CacheError(f"{path}: field 'contents.tail_samples' needs 'contents.top_k' > 0")
    if manifest["contents"]["store_hidden"] and manifest["contents"]["hidden_dtype"] is None:
        raise CacheError(f"{path}: field 'contents.hidden_dtype' must name a dtype when store_hidden is true")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise CacheError(f"{path}: field 'splits' must be an object, got {type(splits).__name__}")
    for split, info in splits.items():
        if not _SPLIT_NAME.fullmatch(split):
            raise CacheError(f"{path}: split name {split[:50]!r} must be letters, digits and '_'")
        _check_fields(path, f"splits.{split}", info, {"examples": _SHARD["tokens"], "num_shards": _SHARD["tokens"]})
        shards = info.get("shards")
        if not isinstance(shards, list) or len(shards) > info["num_shards"]:
            raise CacheError(f"{path}: field 'splits.{split}.shards' must be a list of at most num_shards entries")
        for i, shard in enumerate(shards):
            where = f"splits.{split}.shards[{i}]"
            _check_fields(path, where, shard, _SHARD)
            if shard.get("file") != shard_name(split, i):
                raise CacheError(
                    f"{path}: field '{where}.file' must be {shard_name(split, i)!r}, got "
                    f"{str(shard.get('file'))[:100]!r}"
                )


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def token_bytes(contents: dict) -> int:
    """Bytes a cache with these contents stores per response token (its tensors' payload)."""
    k, m = contents["top_k"], contents["tail_samples"]
    lp = DTYPES[contents["topk_dtype"]].itemsize
    n = 4 + k * (4 + lp) + m * (4 + lp)
    if contents["store_hidden"]:
        n += contents["hidden_size"] * DTYPES[contents["hidden_dtype"]].itemsize
    if contents["mapo_masks"]:
        n += 4
    return n
