"""The offline reference cache: what the loss needs from the reference, per response token, on disk.

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
                                 topk_logp (precompute.reference_token_stats)
    hidden      [Nt, H]  model dtype  final hidden states (``store_hidden``: exact KL)
    mapo_mask   [Nt]     float32  MaPO token weights (caches made with loss_type mapo)

Storage per response token: 4 + 6k + 6m bytes with 16-bit log-probs (+ 4 with MaPO masks, + H x dtype
with hidden states).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .data import PreferenceCollator, PreferenceExample

MANIFEST = "manifest.json"
#: The default cache: the reference's 16 most likely tokens and 64 draws from the rest per response
#: token (4 + 96 + 384 = 484 payload bytes per token with 16-bit log-probs). At equal storage, draws
#: buy more accuracy than top-k entries: the KL error shrinks as 1/sqrt(m) and barely depends on k
#: (bench/bench_ref_cache.py, docs/reference-cache.md).
DEFAULT_TOP_K = 16
DEFAULT_TAIL_SAMPLES = 64
FORMAT = "sparsepo-lite-ref-cache"
FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I32": torch.int32, "I64": torch.int64}  # safetensors' dtype names


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


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- fingerprint ---------------------------------------------------------------------------------

def examples_sha256(examples: Sequence[PreferenceExample]) -> str:
    """Hash of the tokenised pairs: data, tokenizer, chat template and truncation in one number."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.index, e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


def model_identity(lm, name: str) -> Dict[str, str]:
    """Name, config hash, quantization and a probe of the (never quantized) head weights."""
    from .masks import _unwrap

    lm = _unwrap(lm)
    quantization = "4bit" if getattr(lm, "is_loaded_in_4bit", False) else "none"
    cfg = {k: v for k, v in lm.config.to_dict().items()
           if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype",
                                                  "quantization_config", "use_cache")}
    head = lm.get_output_embeddings().weight.detach()
    probe = head.double()
    return {"model": name, "model_config_sha256": _sha256_json(cfg), "quantization": quantization,
            "compute_dtype": dtype_name(head.dtype),
            "head_probe": f"{probe.sum().item():.17g}/{probe.square().sum().item():.17g}"}


def tokenizer_identity(tokenizer) -> Dict[str, str]:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"tokenizer_sha256": _sha256_json([vocab, special]),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}


def run_fingerprint(lm, tokenizer, splits: Dict[str, Sequence[PreferenceExample]], *, model_name: Optional[str],
                    max_length: int, max_prompt_length: int) -> Dict[str, object]:
    """Everything a cache's contents depend on. Training compares it field by field.

    lm: the reference (or the peft policy whose base it is); model_name: how the run names it
    (None: the model's own ``name_or_path``).
    """
    from . import __version__
    from .masks import _unwrap

    model_name = model_name or _unwrap(lm).config.name_or_path
    fp = {**model_identity(lm, model_name), **tokenizer_identity(tokenizer),
          "max_length": max_length, "max_prompt_length": max_prompt_length, "package_version": __version__}
    for split, examples in splits.items():
        fp[f"data_sha256/{split}"] = examples_sha256(examples)
    return fp


def compare_fingerprints(cached: Dict[str, object], run: Dict[str, object], where: str) -> None:
    """Raise naming the first field that differs. Splits the run does not use are not compared."""
    for key, value in run.items():
        if key not in cached:
            raise CacheError(f"{where}: the cache has no {key!r} (it was made without that split or by "
                             f"another version); precompute it again for this run")
        if cached[key] != value:
            raise CacheError(f"{where} was made for a different run: {key} is {cached[key]!r} in the cache "
                             f"but {value!r} now; precompute the reference again (or fix the config)")


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
        raise CacheError(f"{path}: format version {manifest.get('format_version')!r}, this package reads "
                         f"{FORMAT_VERSION}")
    _check_manifest_fields(path, manifest)
    return manifest


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENTS = {  # field: (type, predicate on the value, what it must be)
    "top_k": (int, lambda v: v >= 0, "an integer >= 0"),
    "tail_samples": (int, lambda v: v >= 0, "an integer >= 0"),
    "topk_dtype": (str, lambda v: v in ("float16", "bfloat16", "float32"), "float16, bfloat16 or float32"),
    "store_hidden": (bool, None, "true or false"),
    "hidden_dtype": ((str, type(None)), lambda v: v is None or v in _DTYPES, "null or a float dtype"),
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
    if not isinstance(fp, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool, type(None)))
                                           for k, v in fp.items()):
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
                raise CacheError(f"{path}: field '{where}.file' must be {shard_name(split, i)!r}, got "
                                 f"{str(shard.get('file'))[:100]!r}")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- reading -------------------------------------------------------------------------------------

@dataclass
class _Shard:
    path: str
    handle: object  # safetensors safe_open handle (memory-mapped, lazy slices)
    row_index: List[int]
    offsets: List[int]  # token offset of each example's chosen tokens; len E + 1 (per example pair)
    tokens: torch.Tensor  # [E, 2]


class CacheSplit:
    """One split of a cache: looks up an example's cached tensors by its dataset row index."""

    def __init__(self, cache_dir: str, split: str, info: dict, contents: dict):
        self.dir, self.split, self.contents = cache_dir, split, contents
        self.shards_info = info["shards"]
        if len(self.shards_info) != info.get("num_shards"):
            raise CacheError(f"{os.path.join(cache_dir, MANIFEST)}: split {split!r} is incomplete "
                             f"({len(self.shards_info)} of {info.get('num_shards')} shards); finish the "
                             "precompute (run it again with the same --out: it resumes)")
        self._first_rows = [s["first_row"] for s in self.shards_info]
        self._open: Dict[int, _Shard] = {}
        self.verified = False  # set once verify_cache has checked every shard: no second hashing

    def _shard(self, i: int) -> _Shard:
        if i not in self._open:
            self._open[i] = open_shard(self.dir, self.shards_info[i], self.contents, check_sum=not self.verified)
        return self._open[i]

    def lookup(self, row: int) -> Dict[str, torch.Tensor]:
        """Cached tensors of example ``row``: label_logp [n_c + n_r] etc., and ``tokens`` (n_c, n_r)."""
        i = bisect.bisect_right(self._first_rows, row) - 1
        if i >= 0:
            shard = self._shard(i)
            j = bisect.bisect_left(shard.row_index, row)
            if j < len(shard.row_index) and shard.row_index[j] == row:
                a, b = shard.offsets[j], shard.offsets[j + 1]
                out = {name: shard.handle.get_slice(name)[a:b] for name in _token_tensors(self.contents)}
                out["tokens"] = shard.tokens[j]
                return out
        raise CacheError(f"{self.dir}: split {self.split!r} has no entry for dataset row {row}")


def _token_tensors(contents: dict) -> List[str]:
    names = ["label_logp"]
    if contents["top_k"]:
        names += ["topk_ids", "topk_logp"]
    if contents["tail_samples"]:
        names += ["tail_ids", "tail_logp"]
    if contents["store_hidden"]:
        names.append("hidden")
    if contents["mapo_masks"]:
        names.append("mapo_mask")
    return names


def open_shard(cache_dir: str, info: dict, contents: dict, check_values: bool = False,
               check_sum: bool = True) -> _Shard:
    """Open one shard after checking its checksum (unless ``check_sum`` is False: the cache was
    verified whole), tensors, shapes and dtypes (and, with ``check_values``, its value ranges).
    Any problem raises :class:`CacheError` naming the file."""
    from safetensors import safe_open

    path = os.path.join(cache_dir, info["file"])
    if os.path.islink(path) or not os.path.isfile(path):
        raise CacheError(f"{path}: shard missing (or not a regular file)")
    if os.path.getsize(path) != info["bytes"]:
        raise CacheError(f"{path}: {os.path.getsize(path)} bytes, the manifest says {info['bytes']} (truncated?)")
    if check_sum and sha256_file(path) != info["sha256"]:
        raise CacheError(f"{path}: checksum mismatch (corrupted shard)")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error types
        raise CacheError(f"{path}: not a readable safetensors file ({exc})") from None
    e, n = info["examples"], info["tokens"]
    k, hsize = contents["top_k"], contents["hidden_size"]
    expect = {"row_index": ([e], torch.int64), "tokens": ([e, 2], torch.int64), "label_logp": ([n], torch.float32)}
    if k:
        expect["topk_ids"] = ([n, k], torch.int32)
        expect["topk_logp"] = ([n, k], _DTYPES[contents["topk_dtype"]])
    m = contents["tail_samples"]
    if m:
        expect["tail_ids"] = ([n, m], torch.int32)
        expect["tail_logp"] = ([n, m], _DTYPES[contents["topk_dtype"]])
    if contents["store_hidden"]:
        expect["hidden"] = ([n, hsize], _DTYPES[contents["hidden_dtype"]])
    if contents["mapo_masks"]:
        expect["mapo_mask"] = ([n], torch.float32)
    names = set(handle.keys())
    if names != set(expect):
        raise CacheError(f"{path}: tensors {sorted(names)}, expected {sorted(expect)}")
    for name, (shape, dtype) in expect.items():
        sl = handle.get_slice(name)
        if list(sl.get_shape()) != shape or _ST_DTYPES.get(sl.get_dtype()) != dtype:
            raise CacheError(f"{path}: {name} has shape {sl.get_shape()} / {sl.get_dtype()}, expected {shape} / {dtype}")
    tokens = handle.get_tensor("tokens")
    row_index = handle.get_tensor("row_index").tolist()
    if int(tokens.sum()) != n or bool((tokens < 1).any()):
        raise CacheError(f"{path}: token counts do not add up to {n} (or a response has no tokens)")
    if row_index != sorted(set(row_index)) or (row_index and row_index[0] != info["first_row"]):
        raise CacheError(f"{path}: row indices are not the ascending rows the manifest says")
    offsets = [0] + torch.cumsum(tokens.sum(dim=1), 0).tolist()
    if check_values:
        with open(path, "rb") as f:  # safetensors: an 8-byte header length, the JSON header, the payload
            header = int.from_bytes(f.read(8), "little")
        payload = info["bytes"] - 8 - header
        if payload != n * token_bytes(contents) + e * 3 * 8:  # + row_index [E] and tokens [E, 2] int64
            raise CacheError(f"{path}: {payload} payload bytes for {n} tokens and {e} pairs; the contents say "
                             f"{n * token_bytes(contents) + e * 24}")
        _check_values(path, handle, contents)
    return _Shard(path, handle, row_index, offsets, tokens)


def _check_values(path: str, handle, contents: dict) -> None:
    def bad(msg):
        raise CacheError(f"{path}: {msg}")

    label = handle.get_tensor("label_logp")
    if not torch.isfinite(label).all() or (label > 1e-4).any():
        bad("label_logp has non-finite or positive values")
    if contents["top_k"]:
        ids, lp = handle.get_tensor("topk_ids"), handle.get_tensor("topk_logp").float()
        if (ids < 0).any() or (ids >= contents["vocab_size"]).any():
            bad(f"topk_ids outside [0, {contents['vocab_size']})")
        if torch.isnan(lp).any() or (lp > 1e-2).any():
            bad("topk_logp has NaN or positive values")
        if (lp[:, 1:] > lp[:, :-1]).any():
            bad("topk_logp is not sorted (descending) per token")
        if (torch.logsumexp(lp, dim=1) > 1e-2).any():
            bad("topk_logp holds more than probability 1 per token")
        if (ids.sort(dim=1).values.diff(dim=1) == 0).any():
            bad("topk_ids repeat within a token")
        if contents["tail_samples"]:
            tids, tlp = handle.get_tensor("tail_ids").long(), handle.get_tensor("tail_logp").float()
            if (tids < 0).any() or (tids >= contents["vocab_size"]).any():
                bad(f"tail_ids outside [0, {contents['vocab_size']})")
            srt = ids.long().sort(dim=1).values
            pos = torch.searchsorted(srt, tids).clamp_max(srt.shape[1] - 1)
            if (srt.gather(1, pos) == tids).any():
                bad("tail_ids include a token of the same row's top-k (they must be tail samples)")
            if not torch.isfinite(tlp).all() or (tlp > 1e-2).any():
                bad("tail_logp has non-finite or positive values")
            # A draw's stored log-prob is log(q(v) / r * r_hat) <= log r_hat, r_hat the tail mass the
            # stored top-k leave (precompute.reference_token_stats); 16-bit rounding allowed for.
            r_hat = (1.0 - lp.double().exp().sum(1, keepdim=True)).clamp_min(0.0)
            live = (r_hat > 1e-6).expand_as(tlp)
            if (live & (tlp.double() > r_hat.clamp_min(1e-300).log() + 0.05)).any():
                bad("tail_logp exceeds the tail mass its row's top-k leave (misaligned rows or another cache's "
                    "values)")
    if contents["store_hidden"] and not torch.isfinite(handle.get_tensor("hidden")).all():
        bad("hidden has non-finite values")
    if contents["mapo_masks"]:
        m = handle.get_tensor("mapo_mask")
        if not torch.isfinite(m).all() or (m < 0).any() or (m > 1 + 1e-6).any():
            bad("mapo_mask outside [0, 1]")


class RefCache:
    """A reference cache directory opened for training. :meth:`verify` checks every shard of the
    splits a run uses before it starts; otherwise each shard is checked when first used."""

    def __init__(self, cache_dir: str):
        self.dir = cache_dir
        self.manifest = read_manifest(cache_dir)
        self.contents = self.manifest["contents"]
        self.fingerprint = self.manifest["fingerprint"]
        self._splits: Dict[str, CacheSplit] = {}

    def check_run(self, run_fp: Dict[str, object]) -> None:
        compare_fingerprints(self.fingerprint, run_fp, self.dir)

    def verify(self, splits: Sequence[str]) -> Dict[str, int]:
        """Check every shard of ``splits`` (checksums, tensors, shapes, value ranges) now."""
        totals = verify_cache(self.dir, splits=splits)
        for name in splits:
            self.split(name).verified = True
        return totals

    def split(self, name: str) -> CacheSplit:
        if name not in self._splits:
            info = self.manifest["splits"].get(name)
            if info is None:
                raise CacheError(f"{self.dir}: no {name!r} split in the cache (it has "
                                 f"{sorted(self.manifest['splits'])})")
            self._splits[name] = CacheSplit(self.dir, name, info, self.contents)
        return self._splits[name]


def verify_cache(cache_dir: str, splits: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Check every shard of every split (or of ``splits``): checksum, tensors, shapes, counts, value
    ranges. Returns totals ({"shards", "examples", "tokens", "bytes"}); raises :class:`CacheError`.
    """
    manifest = read_manifest(cache_dir)
    totals = {"shards": 0, "examples": 0, "tokens": 0, "bytes": 0}
    missing = sorted(set(splits or ()) - set(manifest["splits"]))
    if missing:
        raise CacheError(f"{cache_dir}: no {missing} split(s) in the cache (it has {sorted(manifest['splits'])})")
    for split, info in manifest["splits"].items():
        if splits is not None and split not in splits:
            continue
        CacheSplit(cache_dir, split, info, manifest["contents"])  # completeness
        rows_seen = -1
        for sinfo in info["shards"]:
            shard = open_shard(cache_dir, sinfo, manifest["contents"], check_values=True)
            if shard.row_index[0] <= rows_seen:
                raise CacheError(f"{shard.path}: rows overlap the previous shard")
            rows_seen = shard.row_index[-1]
            totals["shards"] += 1
            totals["examples"] += sinfo["examples"]
            totals["tokens"] += sinfo["tokens"]
            totals["bytes"] += sinfo["bytes"]
        if sum(s["examples"] for s in info["shards"]) != info["examples"]:
            raise CacheError(f"{cache_dir}: split {split!r} holds a different number of examples than its manifest says")
    return totals


def token_bytes(contents: dict) -> int:
    """Bytes a cache with these contents stores per response token (its tensors' payload)."""
    k, m = contents["top_k"], contents["tail_samples"]
    lp = _DTYPES[contents["topk_dtype"]].itemsize
    n = 4 + k * (4 + lp) + m * (4 + lp)
    if contents["store_hidden"]:
        n += contents["hidden_size"] * _DTYPES[contents["hidden_dtype"]].itemsize
    if contents["mapo_masks"]:
        n += 4
    return n


def storage_per_token(cache: "RefCache", totals: Dict[str, int]) -> tuple:
    """(bytes per response token of the whole cache, the formula it follows as text)."""
    c = cache.contents
    lp = _DTYPES[c["topk_dtype"]].itemsize
    text = f"4 + {4 + lp} x {c['top_k']} top-k + {4 + lp} x {c['tail_samples']} tail samples"
    if c["store_hidden"]:
        text += f" + {c['hidden_size']} x {_DTYPES[c['hidden_dtype']].itemsize} hidden"
    if c["mapo_masks"]:
        text += " + 4 MaPO"
    text += f" = {token_bytes(c)} payload bytes"
    return totals["bytes"] / max(totals["tokens"], 1), text


# --- feeding the loss ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedExample:
    """A :class:`PreferenceExample` tagged with the cache split that holds its reference."""

    example: PreferenceExample
    split: str


class CachedReferenceCollator:
    """:class:`PreferenceCollator` plus the cached reference tensors ``compute_loss`` reads.

    Token order matches ``compute_loss``: rows are the B chosen then the B rejected sequences,
    tokens row by row in position order.
    """

    def __init__(self, pad_token_id: int, cache: RefCache):
        self.base = PreferenceCollator(pad_token_id)
        self.cache = cache

    def __call__(self, items: Sequence[CachedExample]) -> Dict[str, torch.Tensor]:
        if not all(isinstance(it, CachedExample) for it in items):
            raise TypeError("CachedReferenceCollator takes CachedExample items (example + cache split)")
        batch = self.base([it.example for it in items])
        entries = [self.cache.split(it.split).lookup(it.example.index) for it in items]
        chosen_parts, rejected_parts = [], []
        counts_c, counts_r = [], []
        for e in entries:
            nc, nr = (int(x) for x in e["tokens"])
            counts_c.append(nc)
            counts_r.append(nr)
            chosen_parts.append({k: v[:nc] for k, v in e.items() if k != "tokens"})
            rejected_parts.append({k: v[nc:nc + nr] for k, v in e.items() if k != "tokens"})
        parts = chosen_parts + rejected_parts
        for name in parts[0]:
            batch["ref_" + name] = torch.cat([p[name] for p in parts])
        batch["ref_tokens_per_row"] = torch.tensor(counts_c + counts_r, dtype=torch.long)
        return batch
