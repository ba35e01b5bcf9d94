"""Run the reference once over tokenised preference data and write the cache (format: ``format.py``).

Shards are independent: each holds ``shard_size`` consecutive examples, batched only within the
shard, so its bytes do not depend on what ran before it. A shard is written to a temporary file
and renamed, then the manifest (also replaced atomically) lists it: a killed run resumes from the
last listed shard and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import re
import time
import zlib
from typing import Callable, Dict, Optional, Sequence

import torch

from .. import waits
from ..data import PreferenceCollator, PreferenceExample, pad_id, response_positions
from ..masks import MAPO_HOOK_TYPES, mapo_hook_points
from ..models import unwrap
from ..reference import reference_pass
from ..validation import check_number
from . import keys
from .fingerprint import compare_fingerprints
from .format import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    dtype_name,
    read_manifest,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from .reader import open_shard

#: Rows of [rows, V] fp32 logits formed at once for the top-k (64 MiB at V = 64k).
TOPK_ROWS = 256

#: The temporary files this module writes (``_save_atomic``, ``write_json_atomic``): the only files a
#: resumed precompute deletes from the cache directory.
_OWN_TEMP = re.compile(r"(manifest\.json|[A-Za-z0-9_]+-\d{5}\.safetensors)\.tmp-\d+")
_SHARD_FILE = re.compile(r"[A-Za-z0-9_]+-\d{5}\.safetensors")


def reference_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    top_k: int,
    topk_dtype: torch.dtype,
    rows: int = TOPK_ROWS,
    tail_samples: int = 0,
    generator: Optional[torch.Generator] = None,
):
    """Exact label log-probs [N] fp32, top-k (ids [N, k] int32, log-probs [N, k] topk_dtype) and
    ``tail_samples`` ids per token drawn with replacement from the reference restricted to the
    tokens outside its top-k (ids [N, m] int32 and their log-probs [N, m] topk_dtype, see below).

    hidden [N, H], weight [V, H]: the reference's final states and head; logits in fp32, ``rows``
    tokens at a time, so [N, V] is never held. ``generator`` (on hidden's device) makes the draws
    reproducible.

    The tail log-probs are log(q(v) / r * r_hat): the draw's probability within the reference's
    tail (r its exact mass) times r_hat = 1 - sum(exp(stored top-k log-probs)), the tail mass the
    op recomputes from the rounded top-k. The op's ratio (p(v) / s) / (q(v) / r) is then exact
    whatever the top-k's rounding: with log q(v) itself, a 16-bit top-k that puts r_hat at 200 r
    would multiply every ratio by 200 and add a large positive bias. With top-k log-probs in fp32
    (or 16-bit values that happen to round exactly) r_hat = r and the values are log q(v).
    """
    n, dev = hidden.shape[0], hidden.device
    label = torch.empty(n, dtype=torch.float32, device=dev)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=dev)
    vals = torch.empty(n, top_k, dtype=topk_dtype, device=dev)
    tail_ids = torch.empty(n, tail_samples, dtype=torch.int32, device=dev)
    tail_vals = torch.empty(n, tail_samples, dtype=topk_dtype, device=dev)
    w = weight.float()
    for a in range(0, n, rows):
        logp = torch.log_softmax(hidden[a : a + rows].float() @ w.T, dim=-1)
        label[a : a + rows] = logp.gather(1, labels[a : a + rows, None]).squeeze(1)
        if top_k:
            v, i = logp.topk(top_k, dim=-1, sorted=True)
            ids[a : a + rows], vals[a : a + rows] = i.to(torch.int32), v.to(topk_dtype)
            if tail_samples:
                tail_vals[a : a + rows] = _tail_draws(
                    logp, i, vals[a : a + rows], tail_samples, generator, tail_ids[a : a + rows]
                )
    return label, ids, vals, tail_ids, tail_vals


def _tail_draws(
    logp: torch.Tensor,
    top_ids: torch.Tensor,
    top_vals: torch.Tensor,
    m: int,
    generator: Optional[torch.Generator],
    out_ids: torch.Tensor,
) -> torch.Tensor:
    """Draw ``m`` tail ids per row of ``logp`` [n, V] fp32 into ``out_ids`` [n, m]; return their
    stored log-probs log(q(v) / r * r_hat) [n, m] (see reference_token_stats)."""
    vocab = logp.shape[1]
    logp64 = logp.double()
    tail = logp64.exp().scatter_(1, top_ids, 0.0)
    r = tail.sum(1, keepdim=True)
    # A token whose tail has no mass in fp32 (r = 0) still gets valid draws, uniform over its tail;
    # they then stand for a uniform tail, weighted by r_hat (itself only rounding error).
    empty = r <= 0
    tail = torch.where(empty, torch.ones_like(tail).scatter_(1, top_ids, 0.0), tail)
    t = torch.multinomial(tail.float(), m, replacement=True, generator=generator)
    out_ids.copy_(t.to(torch.int32))
    within = torch.where(
        empty, torch.full_like(r, -math.log(vocab - top_ids.shape[1])), logp64.gather(1, t) - r.clamp_min(1e-300).log()
    )
    # r_hat as the op computes it, in float64 from the stored (rounded) top-k; where it is 0 the op
    # skips the correction and any finite value will do.
    r_hat = (1.0 - top_vals.double().exp().sum(1, keepdim=True)).clamp_min(0.0)
    stored = torch.where(r_hat > 0, within + r_hat.clamp_min(1e-300).log(), within)
    return stored.clamp_min(torch.finfo(top_vals.dtype).min).to(top_vals.dtype)  # finite in 16 bits


def _shard_tensors(
    model,
    ref_model,
    mapo_hooks,
    mapo_mapping: Optional[str],
    examples: Sequence[PreferenceExample],
    collate,
    batch_size: int,
    top_k: int,
    topk_dtype: torch.dtype,
    store_hidden: bool,
    mapo: bool,
    device,
    tail_samples: int = 0,
    generator: Optional[torch.Generator] = None,
    guard: Optional[waits.LoadGuard] = None,
    where: str = "",
) -> Dict[str, torch.Tensor]:
    per_example = []  # (chosen dict, rejected dict) per example, in order
    for a in range(0, len(examples), batch_size):
        if guard is not None:
            guard.apply(f"{where} batch {a // batch_size}")
        part = examples[a : a + batch_size]
        batch = collate(part)
        ids, att, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        response, seq_ids, pos, y = response_positions(labels)
        rp = reference_pass(
            model,
            ids,
            att,
            response,
            seq_ids,
            pos,
            ref_model=ref_model,
            mapo_mapping=mapo_mapping if mapo else None,
            mapo_hooks=mapo_hooks,
        )
        with torch.no_grad():
            label, tk_ids, tk_vals, tl_ids, tl_vals = reference_token_stats(
                rp.hidden, rp.weight, y, top_k, topk_dtype, tail_samples=tail_samples, generator=generator
            )
        cols = {keys.LABEL_LOGP: label}
        if top_k:
            cols.update({keys.TOPK_IDS: tk_ids, keys.TOPK_LOGP: tk_vals})
        if tail_samples:
            cols.update({keys.TAIL_IDS: tl_ids, keys.TAIL_LOGP: tl_vals})
        if store_hidden:
            cols[keys.HIDDEN] = rp.hidden
        if mapo:
            cols[keys.MAPO_MASK] = rp.mapo_mask.float()
        counts = response.sum(dim=1).tolist()  # tokens are row-major: one split per row
        parts = {k: v.cpu().split(counts) for k, v in cols.items()}
        rows = [{k: parts[k][r] for k in cols} for r in range(len(counts))]
        b = len(part)
        per_example += list(zip(rows[:b], rows[b:]))
    out = {
        keys.ROW_INDEX: torch.tensor([e.index for e in examples], dtype=torch.int64),
        keys.TOKENS: torch.tensor([[len(e.chosen_ids), len(e.rejected_ids)] for e in examples], dtype=torch.int64),
    }
    for name in per_example[0][0]:
        out[name] = torch.cat([part[name] for pair in per_example for part in pair]).contiguous()
    return out


def check_out_dir(out_dir: str) -> None:
    """Refuse ``out_dir`` as a cache's home unless it is new, empty, or a reference cache of this
    package (with its manifest, or the temporary files of a precompute killed before its first
    shard), which precompute resumes: shards and a manifest written into a model's or anyone's folder
    would mix with its files."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise CacheError(f"{out_dir} is not a directory: the cache needs a folder of its own")
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        read_manifest(out_dir)  # a manifest.json of another kind is refused here, naming its field
        return
    names = [f for f in os.listdir(out_dir) if f not in ("lost+found", ".DS_Store")]  # a fresh mount, a Mac
    ours = [f for f in names if _OWN_TEMP.fullmatch(f)]
    others = sorted(set(names) - set(ours))
    # Shard files no manifest lists are never overwritten. Otherwise a precompute killed before its
    # first shard was committed leaves only its temporary files: their names mark a cache in
    # progress, resumed, and whatever else is there is left alone.
    refused = [f for f in others if _SHARD_FILE.fullmatch(f)] or ([] if ours else others)
    if refused:
        raise CacheError(
            f"{out_dir} holds {refused[:3]}{' ...' if len(refused) > 3 else ''} but no {MANIFEST}: not a cache in "
            "progress this command can resume; use a new or empty folder for --out"
        )


#: The least value of each of :func:`precompute_reference`'s counts (all integers, at most 2^63 - 1).
SETTING_LOWS = {"top_k": 0, "tail_samples": 0, "tail_seed": 0, "batch_size": 1, "shard_size": 1}


def check_settings(values: Dict[str, object], label: Callable[[str], str] = str) -> None:
    """Raise ``ValueError`` naming ``label(name)`` for the first of ``values`` (names of
    :data:`SETTING_LOWS`; None: the default) out of its range."""
    for name, value in values.items():
        check_number(label(name), value, low=SETTING_LOWS[name], high=2**63 - 1, integer=True, optional=True)


def precompute_reference(
    model,
    tokenizer,
    splits: Dict[str, Sequence[PreferenceExample]],
    out_dir: str,
    *,
    fingerprint: Dict[str, object],
    ref_model=None,
    mapo_mapping: Optional[str] = None,
    mapo_hooks: Sequence[str] = MAPO_HOOK_TYPES,
    top_k: int = DEFAULT_TOP_K,
    tail_samples: Optional[int] = None,
    tail_seed: int = 0,
    topk_dtype: torch.dtype = torch.float16,
    store_hidden: bool = False,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
    on_shard: Optional[Callable[[str, int], None]] = None,
    cpu_load_guard: bool = True,
) -> dict:
    """Write (or finish) the cache for ``splits`` under ``out_dir``; returns the manifest. ``out_dir``
    must be new, empty or a cache to resume (:func:`check_out_dir`).

    model: the peft policy (the reference is its adapter-off base), or any causal LM with ``ref_model``
    (then the reference). ``top_k`` reference ids per token, plus ``tail_samples`` ids drawn from the rest
    of the reference (default: DEFAULT_TAIL_SAMPLES with a top-k, 0 without; seeded by ``tail_seed``, which joins the fingerprint; each shard draws from
    its own generator, so a resumed precompute writes the same bytes). ``mapo_mapping``
    (``"zn_rescale"``, from ``mapo_hooks``) also stores MaPO's token masks. ``on_shard`` is called after each shard is committed
    (split, shard number). ``cpu_load_guard``: on the CPU, where this process's OpenMP threads spin
    long (torch imported before the package), run torch on one thread while other processes
    oversubscribe the cores, checked before each batch (:class:`~sparsepo_lite.waits.LoadGuard`);
    the threads are restored at the end.
    """
    from tqdm.auto import tqdm

    lm = unwrap(ref_model if ref_model is not None else model)
    head = lm.get_output_embeddings().weight
    vocab, hsize = head.shape
    if tail_samples is None:  # the default has tail draws whenever there is a tail to draw from
        tail_samples = DEFAULT_TAIL_SAMPLES if 0 < top_k < vocab else 0
    check_settings(
        dict(top_k=top_k, tail_samples=tail_samples, tail_seed=tail_seed, batch_size=batch_size, shard_size=shard_size)
    )
    if tail_samples and not top_k:
        raise ValueError("tail_samples need a top-k (the tail is what lies outside it): set top_k > 0")
    if dtype_name(topk_dtype) not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"topk_dtype must be float16, bfloat16 or float32, got {topk_dtype}")
    if top_k > vocab or (tail_samples and top_k == vocab):
        raise ValueError(
            f"top_k={top_k} must be below the vocabulary ({vocab}) to leave a tail to sample"
            if top_k <= vocab
            else f"top_k={top_k} exceeds the vocabulary ({vocab})"
        )
    if store_hidden and ref_model is not None:
        raise ValueError(
            "store_hidden needs the reference to share the policy's head (the adapter-off base), "
            "not a separate ref_model"
        )
    mapo = mapo_mapping is not None and mapo_mapping != "uniform"
    if mapo:  # now, not at the first batch
        mapo_hook_points(ref_model if ref_model is not None else model, mapo_hooks)
    if tail_samples:
        fingerprint = {**fingerprint, "tail_seed": tail_seed}
    contents = {
        "top_k": top_k,
        "tail_samples": tail_samples,
        "topk_dtype": dtype_name(topk_dtype),
        "store_hidden": store_hidden,
        "hidden_dtype": dtype_name(head.dtype) if store_hidden else None,
        "hidden_size": hsize,
        "vocab_size": vocab,
        "mapo_masks": mapo,
        "mapo": {"mapping": mapo_mapping, "hooks": list(mapo_hooks)} if mapo else None,
        "label_dtype": "float32",
        "shard_size": shard_size,
        "batch_size": batch_size,
    }
    check_out_dir(out_dir)  # before anything in it is deleted
    os.makedirs(out_dir, exist_ok=True)
    for leftover in os.listdir(out_dir):  # a shard or manifest a killed run never committed
        if _OWN_TEMP.fullmatch(leftover) and os.path.isfile(os.path.join(out_dir, leftover)):
            os.remove(os.path.join(out_dir, leftover))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "contents": contents,
        "splits": {},
    }
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):  # resume
        old = read_manifest(out_dir)
        # contents first: a cache made with other settings (say without tail samples) is named as
        # such, not by the fingerprint key those settings add
        if old["contents"] != contents:
            diff = sorted(k for k in contents if old["contents"].get(k) != contents[k])
            raise CacheError(f"{out_dir} holds a cache with other contents ({diff}); use another --out or delete it")
        compare_fingerprints(old["fingerprint"], fingerprint, out_dir)
        # a split this call does not compute keeps its data hash: the cache still describes it
        manifest["fingerprint"] = {**old["fingerprint"], **fingerprint}
        manifest["splits"] = old["splits"]
        for info in old["splits"].values():  # the shards already listed must be intact to build on
            for shard in info["shards"]:
                open_shard(out_dir, shard, old["contents"])
    pad = pad_id(tokenizer)
    collate = PreferenceCollator(pad)
    device = head.device
    guard = waits.cpu_load_guard() if cpu_load_guard and device.type == "cpu" else None
    was_training = model.training
    model.eval()
    try:
        for split, examples in splits.items():
            examples = list(examples)
            num_shards = (len(examples) + shard_size - 1) // shard_size
            info = manifest["splits"].setdefault(
                split, {"examples": len(examples), "num_shards": num_shards, "shards": []}
            )
            if info["examples"] != len(examples) or info["num_shards"] != num_shards:
                raise CacheError(
                    f"{out_dir}: split {split!r} was started with {info['examples']} examples, now {len(examples)}"
                )
            done = len(info["shards"])
            total_tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
            bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"reference {split}", disable=not progress)
            bar.update(sum(s["tokens"] for s in info["shards"]))
            for i in range(done, num_shards):
                part = examples[i * shard_size : (i + 1) * shard_size]
                t0 = time.perf_counter()
                gen = None
                if tail_samples:  # one generator per shard: resuming redraws nothing
                    gen = torch.Generator(device=device).manual_seed(
                        (tail_seed * 1_000_003 + zlib.crc32(split.encode()) * 7919 + i) % 2**63
                    )
                tensors = _shard_tensors(
                    model,
                    ref_model,
                    mapo_hooks,
                    mapo_mapping,
                    part,
                    collate,
                    batch_size,
                    top_k,
                    topk_dtype,
                    store_hidden,
                    mapo,
                    device,
                    tail_samples,
                    gen,
                    guard=guard,
                    where=f"reference {split} shard {i}",
                )
                name = shard_name(split, i)
                path = os.path.join(out_dir, name)
                _save_atomic(tensors, path)
                n_tok = int(tensors["tokens"].sum())
                info["shards"].append(
                    {
                        "file": name,
                        "sha256": sha256_file(path),
                        "bytes": os.path.getsize(path),
                        "examples": len(part),
                        "tokens": n_tok,
                        "first_row": part[0].index,
                    }
                )
                write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
                bar.update(n_tok)
                bar.set_postfix(tok_per_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
                if on_shard is not None:
                    on_shard(split, i)
            bar.close()
    finally:
        model.train(was_training)
        if guard is not None:
            guard.restore()
    return manifest


def _save_atomic(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
