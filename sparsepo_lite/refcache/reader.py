"""Reading a reference cache: opening and checking shards, looking examples up, verifying a cache."""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..ops.kinds import LOGP_SLACK, TOPK_LOG_MASS_SLACK
from .fingerprint import compare_fingerprints
from .format import DTYPES, MANIFEST, SAFETENSORS_DTYPES, CacheError, read_manifest, sha256_file, token_bytes
from .keys import TOKENS, token_tensors

#: No float32 log-softmax of real logits goes this low; a stored log-prob below it is damage.
LOGP_FLOOR = -1e4


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
            raise CacheError(
                f"{os.path.join(cache_dir, MANIFEST)}: split {split!r} is incomplete "
                f"({len(self.shards_info)} of {info.get('num_shards')} shards); finish the "
                "precompute (run it again with the same --out: it resumes)"
            )
        self._first_rows = [s["first_row"] for s in self.shards_info]
        self._open: Dict[int, _Shard] = {}
        self.verified = False  # set once verify_cache has checked every shard: no second hashing

    def _shard(self, i: int) -> _Shard:
        if i not in self._open:
            # unverified (--no_verify_ref_cache): the full check, values included, when first read
            self._open[i] = open_shard(
                self.dir,
                self.shards_info[i],
                self.contents,
                check_sum=not self.verified,
                check_values=not self.verified,
            )
        return self._open[i]

    def lookup(self, row: int) -> Dict[str, torch.Tensor]:
        """Cached tensors of example ``row``: label_logp [n_c + n_r] etc., and ``tokens`` (n_c, n_r)."""
        i = bisect.bisect_right(self._first_rows, row) - 1
        if i >= 0:
            shard = self._shard(i)
            j = bisect.bisect_left(shard.row_index, row)
            if j < len(shard.row_index) and shard.row_index[j] == row:
                a, b = shard.offsets[j], shard.offsets[j + 1]
                out = {name: shard.handle.get_slice(name)[a:b] for name in token_tensors(self.contents)}
                out[TOKENS] = shard.tokens[j]
                return out
        raise CacheError(f"{self.dir}: split {self.split!r} has no entry for dataset row {row}")


def open_shard(
    cache_dir: str, info: dict, contents: dict, check_values: bool = False, check_sum: bool = True
) -> _Shard:
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
        expect["topk_logp"] = ([n, k], DTYPES[contents["topk_dtype"]])
    m = contents["tail_samples"]
    if m:
        expect["tail_ids"] = ([n, m], torch.int32)
        expect["tail_logp"] = ([n, m], DTYPES[contents["topk_dtype"]])
    if contents["store_hidden"]:
        expect["hidden"] = ([n, hsize], DTYPES[contents["hidden_dtype"]])
    if contents["mapo_masks"]:
        expect["mapo_mask"] = ([n], torch.float32)
    names = set(handle.keys())
    if names != set(expect):
        raise CacheError(f"{path}: tensors {sorted(names)}, expected {sorted(expect)}")
    for name, (shape, dtype) in expect.items():
        sl = handle.get_slice(name)
        if list(sl.get_shape()) != shape or SAFETENSORS_DTYPES.get(sl.get_dtype()) != dtype:
            raise CacheError(
                f"{path}: {name} has shape {sl.get_shape()} / {sl.get_dtype()}, expected {shape} / {dtype}"
            )
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
            raise CacheError(
                f"{path}: {payload} payload bytes for {n} tokens and {e} pairs; the contents say "
                f"{n * token_bytes(contents) + e * 24}"
            )
        _check_values(path, handle, contents, row_index, offsets, tokens)
    return _Shard(path, handle, row_index, offsets, tokens)


def _check_values(
    path: str, handle, contents: dict, row_index: List[int], offsets: List[int], tokens: torch.Tensor
) -> None:
    """Raise :class:`CacheError` at the first impossible value, naming the file, the tensor and where
    it first occurs: the dataset row, the response (chosen or rejected) and the token within it.
    ``row_index``: the E dataset rows of the shard; ``offsets``: E + 1 token offsets of their pairs;
    ``tokens``: [E, 2] int64, each pair's chosen and rejected token counts."""

    def check(bad_tokens: torch.Tensor, msg: str) -> None:
        """``bad_tokens``: [n] bool, the tokens (rows of the shard's per-token tensors) that break the rule."""
        if not bad_tokens.any():
            return
        t = int(bad_tokens.nonzero()[0])
        j = bisect.bisect_right(offsets, t) - 1
        at, chosen = t - offsets[j], int(tokens[j, 0])
        side, pos = ("chosen", at) if at < chosen else ("rejected", at - chosen)
        count = int(bad_tokens.sum())
        raise CacheError(
            f"{path}: {msg} (first at dataset row {row_index[j]}, {side} response token {pos}; "
            f"{count} token{'s' if count > 1 else ''} in all)"
        )

    label = handle.get_tensor("label_logp")
    check(~torch.isfinite(label) | (label > 1e-4), "label_logp has non-finite or positive values")  # float32: no slack
    check(label < LOGP_FLOOR, f"label_logp below {LOGP_FLOOR:g}, which no float32 log-softmax of real logits gives")
    if contents["top_k"]:
        ids, lp = handle.get_tensor("topk_ids"), handle.get_tensor("topk_logp").float()
        check(((ids < 0) | (ids >= contents["vocab_size"])).any(1), f"topk_ids outside [0, {contents['vocab_size']})")
        check((torch.isnan(lp) | (lp > LOGP_SLACK)).any(1), "topk_logp has NaN or positive values")
        check((lp[:, 1:] > lp[:, :-1]).any(1), "topk_logp is not sorted (descending) per token")
        check(torch.logsumexp(lp, dim=1) > TOPK_LOG_MASS_SLACK, "topk_logp holds more than probability 1 per token")
        check((ids.sort(dim=1).values.diff(dim=1) == 0).any(1), "topk_ids repeat within a token")
        top = lp[:, 0]
        check(
            top < -math.log(contents["vocab_size"]) - 1e-2,
            "topk_logp: a token's most likely entry has probability below 1/V (rows of -inf or shifted values)",
        )
        # the label is one of the V tokens, so no more likely than the top one (up to 16-bit rounding)
        check(
            label > top + 0.02 + top.abs() * 2**-7,
            "label_logp exceeds its token's top-1 log-prob (misaligned rows or another cache's values)",
        )
        if contents["tail_samples"]:
            tids, tlp = handle.get_tensor("tail_ids").long(), handle.get_tensor("tail_logp").float()
            check(
                ((tids < 0) | (tids >= contents["vocab_size"])).any(1),
                f"tail_ids outside [0, {contents['vocab_size']})",
            )
            srt = ids.long().sort(dim=1).values
            pos = torch.searchsorted(srt, tids).clamp_max(srt.shape[1] - 1)
            check(
                (srt.gather(1, pos) == tids).any(1),
                "tail_ids include a token of the same row's top-k (they must be tail samples)",
            )
            check((~torch.isfinite(tlp) | (tlp > LOGP_SLACK)).any(1), "tail_logp has non-finite or positive values")
            # A draw's stored log-prob is log(q(v) / r * r_hat) <= log r_hat, r_hat the tail mass the
            # stored top-k leave (precompute.reference_token_stats); 16-bit rounding allowed for.
            r_hat = (1.0 - lp.double().exp().sum(1, keepdim=True)).clamp_min(0.0)
            live = (r_hat > 1e-6).expand_as(tlp)
            check(
                (live & (tlp.double() > r_hat.clamp_min(1e-300).log() + 0.05)).any(1),
                "tail_logp exceeds the tail mass its row's top-k leave (misaligned rows or another cache's values)",
            )
    if contents["store_hidden"]:
        check(~torch.isfinite(handle.get_tensor("hidden")).all(1), "hidden has non-finite values")
    if contents["mapo_masks"]:
        m = handle.get_tensor("mapo_mask")
        check(~torch.isfinite(m) | (m < 0) | (m > 1 + 1e-6), "mapo_mask outside [0, 1]")


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
                raise CacheError(
                    f"{self.dir}: no {name!r} split in the cache (it has {sorted(self.manifest['splits'])})"
                )
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
            raise CacheError(
                f"{cache_dir}: split {split!r} holds a different number of examples than its manifest says"
            )
    return totals


def storage_per_token(cache: "RefCache", totals: Dict[str, int]) -> tuple:
    """(bytes per response token of the whole cache, the formula it follows as text)."""
    c = cache.contents
    lp = DTYPES[c["topk_dtype"]].itemsize
    text = f"4 + {4 + lp} x {c['top_k']} top-k + {4 + lp} x {c['tail_samples']} tail samples"
    if c["store_hidden"]:
        text += f" + {c['hidden_size']} x {DTYPES[c['hidden_dtype']].itemsize} hidden"
    if c["mapo_masks"]:
        text += " + 4 MaPO"
    text += f" = {token_bytes(c)} payload bytes"
    return totals["bytes"] / max(totals["tokens"], 1), text
