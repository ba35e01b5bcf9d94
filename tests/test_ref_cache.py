"""The reference cache format: round trip, fingerprints, corruption and missing files, no pickle."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest
import torch
import transformers

from sparsepo_lite.data import IGNORE_INDEX, PreferenceCollator, tokenize_dataset
from sparsepo_lite.models import ModelConfig, load_policy
from sparsepo_lite.refcache import (
    CachedExample,
    CachedReferenceCollator,
    CacheError,
    RefCache,
    run_fingerprint,
    verify_cache,
)
from sparsepo_lite.refcache.writer import precompute_reference
from sparsepo_lite.reference import reference_pass

from conftest import review_rows


@pytest.fixture(scope="module")
def setup(tiny_dir):
    transformers.set_seed(0)
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4, gradient_checkpointing=False))
    examples, _ = tokenize_dataset(review_rows(11), tok, max_length=32, max_prompt_length=16)
    fp = run_fingerprint(model, tok, {"train": examples}, model_name="tiny", max_length=32, max_prompt_length=16)
    return model, tok, examples, fp


def build(setup, out, **kw):
    model, tok, examples, fp = setup
    opts = dict(fingerprint=fp, top_k=8, batch_size=3, shard_size=4, progress=False)
    return precompute_reference(model, tok, {"train": examples}, str(out), **{**opts, **kw})


def test_round_trip_holds_the_online_reference_per_token(setup, tmp_path):
    model, tok, examples, fp = setup
    manifest = build(setup, tmp_path, store_hidden=True)
    assert [s["examples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 3]
    totals = verify_cache(str(tmp_path))
    n_tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    assert totals["tokens"] == n_tokens and totals["examples"] == 11
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] + [f"train-0000{i}.safetensors" for i in range(3)]

    cache = RefCache(str(tmp_path))
    cache.check_run(fp)
    part = examples[3:8]  # crosses a shard boundary
    batch = CachedReferenceCollator(tok.pad_token_id, cache)([CachedExample(e, "train") for e in part])
    plain = PreferenceCollator(tok.pad_token_id)(part)
    target = plain["labels"][:, 1:]
    response = target != IGNORE_INDEX
    seq_ids, pos = response.nonzero(as_tuple=True)
    rp = reference_pass(model, plain["input_ids"], plain["attention_mask"], response, seq_ids, pos)
    logq = torch.log_softmax(rp.hidden.double() @ rp.weight.double().T, dim=-1)
    torch.testing.assert_close(
        batch["ref_label_logp"].double(), logq.gather(1, target[seq_ids, pos][:, None])[:, 0], rtol=1e-5, atol=1e-5
    )
    top = logq.topk(8, dim=-1)
    assert torch.equal(batch["ref_topk_ids"].long(), top.indices)
    torch.testing.assert_close(batch["ref_topk_logp"].double(), top.values, rtol=2e-3, atol=2e-3)  # float16
    torch.testing.assert_close(batch["ref_hidden"], rp.hidden, rtol=1e-5, atol=1e-6)
    assert batch["ref_tokens_per_row"].tolist() == response.sum(1).tolist()


def test_fingerprint_mismatch_names_the_field(setup, tmp_path):
    model, tok, examples, fp = setup
    build(setup, tmp_path)
    cache = RefCache(str(tmp_path))
    with pytest.raises(CacheError, match="max_length is 32 in the cache but 64 now"):
        cache.check_run({**fp, "max_length": 64})
    other = run_fingerprint(
        model, tok, {"train": examples[:-1]}, model_name="tiny", max_length=32, max_prompt_length=16
    )
    with pytest.raises(CacheError, match="data_sha256/train"):
        cache.check_run(other)
    with pytest.raises(CacheError, match="no 'data_sha256/eval'"):
        cache.check_run({**fp, "data_sha256/eval": "x"})
    # the same weights spelled another way (./model, its absolute path) are the same model; other
    # weights under the same name are not
    cache.check_run({**fp, "model": "/elsewhere/tiny"})
    with pytest.raises(CacheError, match="weights_sha256 is '[0-9a-f]+' in the cache but '0' now"):
        cache.check_run({**fp, "weights_sha256": "0"})
    # precompute refuses to mix runs in one directory, too
    with pytest.raises(CacheError, match="tokenizer_sha256"):
        build(setup, tmp_path, fingerprint={**fp, "tokenizer_sha256": "0"})
    with pytest.raises(CacheError, match="other contents"):
        build(setup, tmp_path, top_k=4)
    # a cache without tail draws, resumed with them: named by what differs
    build(setup, tmp_path / "bucket", tail_samples=0)
    with pytest.raises(CacheError, match=r"other contents \(\['tail_samples'\]\)"):
        build(setup, tmp_path / "bucket")


def _corrupt_and_expect(tmp_path, match):
    with pytest.raises(CacheError, match=match):
        verify_cache(str(tmp_path))
    cache = RefCache(str(tmp_path)) if (tmp_path / "manifest.json").exists() else None
    if cache is not None:  # training reads fail the same way when they reach the shard
        with pytest.raises(CacheError, match=match):
            for row in range(11):
                cache.split("train").lookup(row)


def test_truncated_shard_is_named(setup, tmp_path):
    build(setup, tmp_path)
    shard = tmp_path / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    _corrupt_and_expect(tmp_path, r"train-00001.safetensors: \d+ bytes, the manifest says")


def test_flipped_byte_is_named(setup, tmp_path):
    build(setup, tmp_path)
    shard = tmp_path / "train-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    _corrupt_and_expect(tmp_path, "train-00002.safetensors: checksum mismatch")


def test_missing_shard_and_missing_manifest(setup, tmp_path):
    build(setup, tmp_path)
    (tmp_path / "train-00000.safetensors").unlink()
    _corrupt_and_expect(tmp_path, "train-00000.safetensors: shard missing")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="manifest.json is missing"):
        RefCache(str(tmp_path))
    with pytest.raises(CacheError, match="not a directory"):
        RefCache(str(tmp_path / "nope"))


def _in_top_k(t):
    t["tail_ids"][0, 0] = t["topk_ids"][0, 0]


def _label_above_zero(t):
    t["label_logp"][0] = 0.5


def _tail_above_its_mass(t):
    lp = t["topk_logp"][0].double()
    r = 1 - lp.exp().sum()
    t["topk_logp"][0, 0] = torch.log(lp[0].exp() + r / 2).to(t["topk_logp"].dtype)  # the top id takes half the tail
    t["tail_logp"][0, 0] = torch.log(r).to(t["tail_logp"].dtype)  # a draw still holding the whole former tail


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_label_above_zero, "label_logp has non-finite or positive"),
        (_in_top_k, "tail_ids include a token of the same row's top-k"),
        (_tail_above_its_mass, "tail_logp exceeds the tail mass its row's top-k leave"),
    ],
)
def test_bad_values_behind_a_valid_checksum_are_caught(setup, tmp_path, mutate, message):
    """A shard rewritten with a consistent checksum but impossible values (a buggy writer)."""
    from safetensors.torch import load_file, save_file

    from sparsepo_lite.refcache.format import sha256_file

    manifest = build(setup, tmp_path)
    assert manifest["contents"]["tail_samples"] > 0  # the default cache holds tail draws
    path = tmp_path / "train-00000.safetensors"
    tensors = load_file(str(path))
    verify_cache(str(tmp_path))
    mutate(tensors)
    save_file(tensors, str(path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0].update(sha256=sha256_file(str(path)), bytes=path.stat().st_size)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="train-00000.safetensors: " + message):
        verify_cache(str(tmp_path))


@pytest.mark.parametrize("at", ["first", "last"])
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_a_bad_value_is_located_by_dataset_row_response_and_token(setup, tmp_path, side, at):
    """The error names where the first bad value sits, so the row can be found in the data file."""
    from safetensors.torch import load_file, save_file

    from sparsepo_lite.refcache.format import sha256_file

    _, _, examples, _ = setup
    build(setup, tmp_path)
    path = tmp_path / "train-00001.safetensors"  # rows 4-7
    tensors = load_file(str(path))
    counts = tensors["tokens"].tolist()
    j = 2  # dataset row 6
    pos = 0 if at == "first" else counts[j][0 if side == "chosen" else 1] - 1  # the edges of the response
    t = sum(c + r for c, r in counts[:j]) + (pos if side == "chosen" else counts[j][0] + pos)
    tensors["label_logp"][t] = float("nan")
    tensors["label_logp"][t + 2 :] = 0.5  # later damage does not move the first location, only the count
    save_file(tensors, str(path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1].update(sha256=sha256_file(str(path)), bytes=path.stat().st_size)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    n = tensors["label_logp"].numel()
    assert tensors["row_index"].tolist() == [4, 5, 6, 7] and len(examples[6].chosen_ids) == counts[j][0]
    expect = (
        f"train-00001.safetensors: label_logp has non-finite or positive values (first at dataset row 6, "
        f"{side} response token {pos}; {1 + n - (t + 2)} tokens in all)"
    )
    with pytest.raises(CacheError) as info:
        verify_cache(str(tmp_path))
    assert str(info.value).endswith(expect)


def test_incomplete_cache_is_refused(setup, tmp_path):
    class Stop(Exception):
        pass

    def stop(split, i):
        raise Stop

    with pytest.raises(Stop):
        build(setup, tmp_path, on_shard=stop)
    with pytest.raises(CacheError, match=r"incomplete \(1 of 3 shards\)"):
        RefCache(str(tmp_path)).split("train")


def test_precompute_writes_only_into_a_new_or_empty_folder_or_a_cache(setup, tmp_path):
    theirs = tmp_path / "model"  # a model's own folder, say
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    with pytest.raises(CacheError, match=re.escape(f"{theirs} holds ['config.json'] but no manifest.json")):
        build(setup, theirs)
    (theirs / "manifest.json").write_text('{"files": []}')  # another tool's manifest
    with pytest.raises(CacheError, match="manifest.json: not a sparsepo-lite-ref-cache manifest"):
        build(setup, theirs)
    assert sorted(os.listdir(theirs)) == ["config.json", "manifest.json"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CacheError, match="a_file is not a directory"):
        build(setup, tmp_path / "a_file")
    cache_files = ["manifest.json"] + [f"train-0000{i}.safetensors" for i in range(3)]
    empty = tmp_path / "empty"
    empty.mkdir()
    build(setup, empty)
    assert sorted(os.listdir(empty)) == cache_files
    build(setup, empty)  # a finished cache is resumed: nothing to do, nothing refused
    mount = tmp_path / "mount"  # a fresh file system's root holds lost+found
    (mount / "lost+found").mkdir(parents=True)
    build(setup, mount)
    assert sorted(os.listdir(mount)) == sorted(cache_files + ["lost+found"])
    killed = tmp_path / "killed"  # a precompute killed before its first shard was committed
    killed.mkdir()
    (killed / "train-00000.safetensors.tmp-4242").write_text("half a shard")
    build(setup, killed)
    assert sorted(os.listdir(killed)) == cache_files


def test_no_pickle_in_the_package():
    root = pathlib.Path(__file__).parent.parent / "sparsepo_lite"
    for path in root.rglob("*.py"):
        text = path.read_text()
        # catching pickle.UnpicklingError (a hostile file that torch or transformers refused) is fine
        for bad in ("torch.load(", "pickle.load", "from pickle import", "Unpickler(", "weights_only=False"):
            assert bad not in text, f"{path}: {bad}"


def test_the_fingerprint_is_the_same_on_any_thread_count_and_sees_weights_changed_in_place(setup):
    # SmolLM2's head shape: torch's float64 sum of it differs between 1 and 2 threads
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tok = setup[1]

    def fingerprint(lm):
        return run_fingerprint(lm, tok, {}, model_name="m", max_length=32, max_prompt_length=16)

    threads = torch.get_num_threads()
    try:
        prints = []
        for n in (1, 2):
            torch.set_num_threads(n)
            prints.append(fingerprint(model))
    finally:
        torch.set_num_threads(threads)
    assert prints[0] == prints[1]
    with torch.no_grad():  # an edit of the backbone under the same name and config (a merged SFT)
        model.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    changed = fingerprint(model)
    assert [k for k in changed if changed[k] != prints[0][k]] == ["weights_sha256"]
    # the 4-bit policy: its packed codes count, its LoRA adapter does not
    policy = setup[0]
    before = fingerprint(policy)
    codes = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    lora = policy.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    with torch.no_grad():
        lora.add_(1.0)
        assert fingerprint(policy) == before
        codes.data[0] ^= 1
        try:
            assert fingerprint(policy)["weights_sha256"] != before["weights_sha256"]
        finally:
            codes.data[0] ^= 1
            lora.sub_(1.0)
    assert fingerprint(policy) == before


def test_a_base_model_record_names_what_changed_and_compares_weights_loaded_as_in_training(caplog):
    from sparsepo_lite.refcache.fingerprint import IDENTITY_FIELDS, check_base_model

    recorded = {"model": "m", **{k: k for k in IDENTITY_FIELDS}, "quantization": "4bit", "device": "cuda"}
    recorded["compute_dtype"] = "bfloat16"
    live = {**recorded, "model": "elsewhere/m"}  # the name is how a run spelled it
    check_base_model(recorded, live, "run/base_model.json")
    for key in ("model_config_sha256", "weights_sha256"):
        with pytest.raises(ValueError, match=f"run/base_model.json: the base model 'm' has changed .*{key} is"):
            check_base_model(recorded, {**live, key: "other"}, "run/base_model.json")
    # loaded otherwise than in training (a GPU run read on the CPU with dtype auto, another device's 4-bit
    # kernels, an edited quantization): the weights' bits differ by construction, so only the config counts
    for other in ({"device": "cpu"}, {"compute_dtype": "float32"}, {"quantization": "none"}):
        caplog.clear()
        with caplog.at_level("WARNING"):
            check_base_model(recorded, {**live, **other, "weights_sha256": "other"}, "run/base_model.json")
        assert "its weights cannot be compared" in caplog.text, other
        with pytest.raises(ValueError, match="model_config_sha256 is"):
            check_base_model(recorded, {**live, **other, "model_config_sha256": "x"}, "run/base_model.json")
    unquantised = {**recorded, "quantization": "none"}
    with pytest.raises(ValueError, match="weights_sha256 is"):  # the same bits on every device
        check_base_model(unquantised, {**unquantised, "device": "cpu", "weights_sha256": "x"}, "f")
    with pytest.raises(ValueError, match="f: not a base model record"):
        check_base_model({"model": "m"}, live, "f")
