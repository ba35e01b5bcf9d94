"""Run the reference once over tokenised preference data and write the cache (see ref_cache.py).

Shards are independent: each holds ``shard_size`` consecutive examples, batched only within the
shard, so its bytes do not depend on what ran before it. A shard is written to a temporary file
and renamed, then the manifest (also replaced atomically) lists it: a killed run resumes from the
last listed shard and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from .data import PreferenceCollator, PreferenceExample
from .objective import IGNORE_INDEX, LossConfig, reference_pass
from .ref_cache import (FORMAT, FORMAT_VERSION, MANIFEST, CacheError, compare_fingerprints, dtype_name, read_manifest,
                        sha256_file, shard_name, write_json_atomic)

#: Rows of [rows, V] fp32 logits formed at once for the top-k (64 MiB at V = 64k).
TOPK_ROWS = 256
#: The temporary files this module writes (``_save_atomic``, ``write_json_atomic``): the only files a
#: resumed precompute deletes from the cache directory.
_OWN_TEMP = re.compile(r"(manifest\.json|[A-Za-z0-9_]+-\d{5}\.safetensors)\.tmp-\d+")


def reference_token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, top_k: int,
                          topk_dtype: torch.dtype, rows: int = TOPK_ROWS):
    """Exact label log-probs [N] fp32 and top-k (ids [N, k] int32, log-probs [N, k] topk_dtype).

    hidden [N, H], weight [V, H]: the reference's final states and head; logits in fp32, ``rows``
    tokens at a time, so [N, V] is never held.
    """
    n = hidden.shape[0]
    label = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=hidden.device)
    vals = torch.empty(n, top_k, dtype=topk_dtype, device=hidden.device)
    w = weight.float()
    for a in range(0, n, rows):
        logp = torch.log_softmax(hidden[a:a + rows].float() @ w.T, dim=-1)
        label[a:a + rows] = logp.gather(1, labels[a:a + rows, None]).squeeze(1)
        if top_k:
            v, i = logp.topk(top_k, dim=-1, sorted=True)
            ids[a:a + rows], vals[a:a + rows] = i.to(torch.int32), v.to(topk_dtype)
    return label, ids, vals


def _shard_tensors(model, config: LossConfig, examples: Sequence[PreferenceExample], collate, batch_size: int,
                   top_k: int, topk_dtype: torch.dtype, store_hidden: bool, mapo: bool, device) -> Dict[str, torch.Tensor]:
    per_example = []  # (chosen dict, rejected dict) per example, in order
    for a in range(0, len(examples), batch_size):
        part = examples[a:a + batch_size]
        batch = collate(part)
        ids, att, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        target = labels[:, 1:]
        response = target != IGNORE_INDEX
        seq_ids, pos = response.nonzero(as_tuple=True)
        y = target[seq_ids, pos]
        rp = reference_pass(model, config, ids, att, response, seq_ids, pos, need_mapo=mapo)
        with torch.no_grad():
            label, tk_ids, tk_vals = reference_token_stats(rp.hidden, rp.weight, y, top_k, topk_dtype)
        cols = {"label_logp": label}
        if top_k:
            cols.update(topk_ids=tk_ids, topk_logp=tk_vals)
        if store_hidden:
            cols["hidden"] = rp.hidden
        if mapo:
            cols["mapo_mask"] = rp.mapo_mask.float()
        counts = response.sum(dim=1).tolist()  # tokens are row-major: one split per row
        parts = {k: v.cpu().split(counts) for k, v in cols.items()}
        rows = [{k: parts[k][r] for k in cols} for r in range(len(counts))]
        b = len(part)
        per_example += list(zip(rows[:b], rows[b:]))
    out = {"row_index": torch.tensor([e.index for e in examples], dtype=torch.int64),
           "tokens": torch.tensor([[len(e.chosen_ids), len(e.rejected_ids)] for e in examples], dtype=torch.int64)}
    for name in per_example[0][0]:
        out[name] = torch.cat([part[name] for pair in per_example for part in pair]).contiguous()
    return out


def precompute_reference(model, tokenizer, splits: Dict[str, Sequence[PreferenceExample]], out_dir: str, *,
                         fingerprint: Dict[str, object], config: Optional[LossConfig] = None, top_k: int = 32,
                         topk_dtype: torch.dtype = torch.float16, store_hidden: bool = False,
                         batch_size: int = 8, shard_size: int = 256, progress: bool = True,
                         on_shard: Optional[Callable[[str, int], None]] = None) -> dict:
    """Write (or finish) the cache for ``splits`` under ``out_dir``; returns the manifest.

    model: the peft policy (the reference is its adapter-off base) or, with ``config.ref_model``,
    any causal LM. ``config.loss_type == "mapo"`` also stores MaPO's token masks. ``on_shard``
    is called after each shard is committed (split, shard number).
    """
    from tqdm.auto import tqdm

    from .masks import _unwrap

    config = config or LossConfig(loss_type="dpo")
    if top_k < 0 or batch_size < 1 or shard_size < 1:
        raise ValueError(f"need top_k >= 0, batch_size >= 1, shard_size >= 1 (got {top_k}, {batch_size}, {shard_size})")
    if dtype_name(topk_dtype) not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"topk_dtype must be float16, bfloat16 or float32, got {topk_dtype}")
    lm = _unwrap(config.ref_model if config.ref_model is not None else model)
    head = lm.get_output_embeddings().weight
    vocab, hsize = head.shape
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({vocab})")
    if store_hidden and config.ref_model is not None:
        raise ValueError("store_hidden needs the reference to share the policy's head (the adapter-off base), "
                         "not a separate ref_model")
    mapo = config.loss_type == "mapo" and config.mapo_mapping != "uniform"
    contents = {"top_k": top_k, "topk_dtype": dtype_name(topk_dtype), "store_hidden": store_hidden,
                "hidden_dtype": dtype_name(head.dtype) if store_hidden else None, "hidden_size": hsize,
                "vocab_size": vocab, "mapo_masks": mapo,
                "mapo": {"mapping": config.mapo_mapping, "hooks": list(config.mapo_hooks)} if mapo else None,
                "label_dtype": "float32", "shard_size": shard_size, "batch_size": batch_size}
    os.makedirs(out_dir, exist_ok=True)
    for leftover in os.listdir(out_dir):  # a shard or manifest a killed run never committed
        if _OWN_TEMP.fullmatch(leftover) and os.path.isfile(os.path.join(out_dir, leftover)):
            os.remove(os.path.join(out_dir, leftover))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                "contents": contents, "splits": {}}
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):  # resume
        old = read_manifest(out_dir)
        compare_fingerprints(old["fingerprint"], fingerprint, out_dir)
        if old["contents"] != contents:
            diff = sorted(k for k in contents if old["contents"].get(k) != contents[k])
            raise CacheError(f"{out_dir} holds a cache with other contents ({diff}); use another --out or delete it")
        manifest["splits"] = old["splits"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PreferenceCollator(pad)
    device = head.device
    was_training = model.training
    model.eval()
    try:
        for split, examples in splits.items():
            examples = list(examples)
            num_shards = (len(examples) + shard_size - 1) // shard_size
            info = manifest["splits"].setdefault(split, {"examples": len(examples), "num_shards": num_shards,
                                                          "shards": []})
            if info["examples"] != len(examples) or info["num_shards"] != num_shards:
                raise CacheError(f"{out_dir}: split {split!r} was started with {info['examples']} examples, "
                                 f"now {len(examples)}")
            done = len(info["shards"])
            total_tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
            bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"reference {split}",
                       disable=not progress)
            bar.update(sum(s["tokens"] for s in info["shards"]))
            for i in range(done, num_shards):
                part = examples[i * shard_size:(i + 1) * shard_size]
                t0 = time.perf_counter()
                tensors = _shard_tensors(model, config, part, collate, batch_size, top_k, topk_dtype, store_hidden,
                                         mapo, device)
                name = shard_name(split, i)
                path = os.path.join(out_dir, name)
                _save_atomic(tensors, path)
                n_tok = int(tensors["tokens"].sum())
                info["shards"].append({"file": name, "sha256": sha256_file(path), "bytes": os.path.getsize(path),
                                       "examples": len(part), "tokens": n_tok, "first_row": part[0].index})
                write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
                bar.update(n_tok)
                bar.set_postfix(tok_per_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
                if on_shard is not None:
                    on_shard(split, i)
            bar.close()
    finally:
        model.train(was_training)
    return manifest


def _save_atomic(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)

