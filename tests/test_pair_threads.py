"""A batch run as shards of its pairs on threads (training/pair_threads.py) against the same batch run
whole: loss, metrics and gradients on a tiny float64 peft Llama, online and with cached references;
the pair selection; the thread counts; errors naming the batch's rows."""

from __future__ import annotations

import time

import pytest
import torch
from test_objective import METHODS, VOCAB, config_for, random_batch, tiny_llama

from sparsepo_lite import LossConfig, compute_loss
from sparsepo_lite.objective import merge_metrics, runs_in_shards
from sparsepo_lite.refcache import keys, select_pairs
from sparsepo_lite.training.pair_threads import PairThreads, add_gradients, pair_ranges, sharded_loss


@pytest.fixture
def pool():
    threads = PairThreads(2)
    yield threads
    threads.close()


def trained(model, cfg):
    """The LoRA weights and the mask nets' parameters."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    return params + (list(cfg.masks.parameters()) if cfg.masks is not None else [])


def whole(model, batch, cfg, params):
    loss, metrics = compute_loss(model, batch, cfg)
    return loss.detach(), metrics, torch.autograd.grad(loss, params, allow_unused=True)


def sharded(pool, model, batch, cfg, params, scale=1.0):
    for p in params:
        p.grad = None
    result = sharded_loss(pool, model, batch, cfg)
    add_gradients(pool, result, params, scale)
    return result.loss, result.metrics, [p.grad for p in params]


def assert_same(got, want, rtol):
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = got, want
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=0)
    assert metrics.keys() == want_metrics.keys()
    for k in want_metrics:
        # shares and mask health are fp32 means in compute_loss
        assert metrics[k] == pytest.approx(want_metrics[k], rel=max(rtol, 1e-6), abs=1e-12), k
    scale = max(w.abs().max().item() for w in want_grads if w is not None)
    for g, w in zip(grads, want_grads):
        if w is None:
            assert g is None
        else:
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


#: Loss settings beyond each method's defaults: label smoothing, L1 penalties, normalised masks.
VARIANTS = {
    "dpo_smoothed": ("dpo", dict(label_smoothing=0.2)),
    "sparsepo_l1_normalized": ("sparsepo", dict(l1_reward=0.05, l1_kl=0.02, mask_normalize=True)),
    "mapo_uniform": ("mapo", dict(mapo_mapping="uniform")),
}


def loss_config(name, model):
    method, kw = VARIANTS.get(name, (name, {}))
    return config_for(method, model, **kw)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "mapo"] + list(VARIANTS))
@pytest.mark.parametrize("pairs, threads", [(3, 2), (5, 3), (2, 4)])
def test_shards_give_the_whole_batch_loss_metrics_and_gradients_float64(method, pairs, threads, seed):
    model = tiny_llama(seed=seed % 1000)
    cfg = loss_config(method, model)
    batch = random_batch(b=pairs, seed=seed)
    params = trained(model, cfg)
    want = whole(model, batch, cfg, params)
    with PairThreads(threads) as pool:
        assert_same(sharded(pool, model, batch, cfg, params), want, rtol=1e-10)


def test_padding_and_token_weights_float32(pool, seed):
    model = tiny_llama(seed=seed % 1000).float()
    batch = random_batch(b=4, seed=seed)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    batch = {k: torch.nn.functional.pad(v, (0, 5), value=fill[k]) for k, v in batch.items()}  # extra right padding
    batch["token_weights"] = torch.rand(batch["labels"].shape)
    cfg = LossConfig(loss_type="tdpo1")
    params = trained(model, cfg)
    assert_same(sharded(pool, model, batch, cfg, params), whole(model, batch, cfg, params), rtol=2e-5)


def test_gradients_add_to_existing_ones_and_repeat_bit_for_bit(pool, seed):
    model = tiny_llama(seed=seed % 1000)
    cfg = config_for("sparsepo", model)
    batch = random_batch(b=3, seed=seed)
    params = trained(model, cfg)
    _, _, first = sharded(pool, model, batch, cfg, params, scale=0.5)
    first = [g.clone() for g in first]
    _, _, again = sharded(pool, model, batch, cfg, params, scale=0.5)
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # shard order, not thread timing, fixes the sums
    add_gradients(pool, sharded_loss(pool, model, batch, cfg), params, 0.5)
    for g, p in zip(first, params):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)


def cached_batch(batch, hidden_size, seed, vocab=61, k=5, m=3):
    """``batch`` with cached reference tensors as the collator lays them out (tokens row by row),
    their values random but well formed: the shards must pick each row's own. Holds label log-probs,
    hidden states, top-k lists with tail samples and MaPO weights."""
    labels = batch["labels"][:, 1:]
    per_row = (labels != -100).sum(1)
    n = int(per_row.sum())
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[: k + m] for _ in range(n)])
    out = dict(batch)
    out[keys.TOKENS_PER_ROW] = per_row
    out[keys.batch_key(keys.LABEL_LOGP)] = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    out[keys.batch_key(keys.HIDDEN)] = torch.randn(n, hidden_size, generator=g, dtype=torch.float64)
    out[keys.batch_key(keys.TOPK_IDS)] = ids[:, :k].int()
    # k probabilities of one distribution, with mass left over for the tail
    spread = torch.log_softmax(torch.randn(n, k + 1, generator=g) * 2, dim=1)[:, :k]
    out[keys.batch_key(keys.TOPK_LOGP)] = spread.sort(1, descending=True).values
    out[keys.batch_key(keys.TAIL_IDS)] = ids[:, k:].int()
    out[keys.batch_key(keys.TAIL_LOGP)] = -torch.rand(n, m, generator=g) * 3 - 6
    out[keys.batch_key(keys.MAPO_MASK)] = torch.rand(n, generator=g)
    return out


def without(batch, *names):
    return {k: v for k, v in batch.items() if k not in {keys.batch_key(n) for n in names}}


@pytest.mark.parametrize("method", ["dpo", "tdpo1", "tdpo2", "sparsepo", "mapo"] + list(VARIANTS))
@pytest.mark.parametrize("reference", ["hidden", "topk"])
def test_shards_of_a_cached_batch_match_the_whole(pool, method, reference, seed):
    model = tiny_llama(seed=seed % 1000)
    cfg = loss_config(method, model)
    batch = cached_batch(random_batch(b=5, seed=seed), model.config.hidden_size, seed)
    # the loss reads hidden states when the cache has them, else the top-k lists with their tail
    batch = without(batch, keys.HIDDEN) if reference == "topk" else batch
    params = trained(model, cfg)
    assert_same(sharded(pool, model, batch, cfg, params), whole(model, batch, cfg, params), rtol=1e-10)


def test_select_pairs_keeps_each_rows_own_tokens(seed):
    batch = cached_batch(random_batch(b=4, seed=seed), 3, seed)
    per_row = batch[keys.TOKENS_PER_ROW]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), per_row.cumsum(0)])
    label = keys.batch_key(keys.LABEL_LOGP)
    part = select_pairs(batch, 1, 3)
    rows = [1, 2, 5, 6]
    assert torch.equal(part["input_ids"], batch["input_ids"][rows])
    assert torch.equal(part[keys.TOKENS_PER_ROW], per_row[rows])
    want = torch.cat([batch[label][starts[r] : starts[r + 1]] for r in rows])
    assert torch.equal(part[label], want)
    for name in (keys.HIDDEN, keys.TOPK_IDS, keys.TAIL_LOGP):
        whole_rows = [batch[keys.batch_key(name)][starts[r] : starts[r + 1]] for r in rows]
        assert torch.equal(part[keys.batch_key(name)], torch.cat(whole_rows))
    with pytest.raises(ValueError, match="pairs 2:2"):
        select_pairs(batch, 2, 2)
    with pytest.raises(ValueError, match="pairs 0:5"):
        select_pairs(batch, 0, 5)
    with pytest.raises(ValueError, match="'odd'"):
        select_pairs({**batch, "odd": torch.zeros(3)}, 0, 1)


def test_pair_ranges_cover_every_pair_once():
    for pairs in range(1, 9):
        for shards in range(1, 6):
            ranges = pair_ranges(pairs, shards)
            assert len(ranges) == min(pairs, shards)
            assert [i for a, b in ranges for i in range(a, b)] == list(range(pairs))
            sizes = [b - a for a, b in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_each_shard_runs_on_its_share_of_the_threads_and_the_count_comes_back():
    before = torch.get_num_threads()
    with PairThreads(4) as pool:
        assert pool.map(lambda _: torch.get_num_threads(), [0, 1]) == [2, 2]
        assert pool.map(lambda _: torch.get_num_threads(), [0, 1, 2]) == [1, 1, 1]
        assert torch.get_num_threads() == before
        torch.set_num_threads(1)  # a load guard's choice: the shards take no more than the caller has
        try:
            assert pool.map(lambda _: torch.get_num_threads(), [0, 1]) == [1, 1]
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)

        def fail(i):
            if i == 1:
                raise RuntimeError("shard 1 broke")
            return i

        with pytest.raises(RuntimeError, match="shard 1 broke"):
            pool.map(fail, [0, 1])
        assert torch.get_num_threads() == before

        finished = []

        def slow_or_fail(i):
            if i == 0:
                raise RuntimeError("shard 0 broke")
            time.sleep(0.2)
            finished.append(i)

        with pytest.raises(RuntimeError, match="shard 0 broke"):
            pool.map(slow_or_fail, [0, 1])
        assert finished == [1]  # the error waits for every shard: none still runs the model
    with pytest.raises(ValueError, match="at least 2"):
        PairThreads(1)


def test_errors_name_the_batchs_rows_not_a_shards(pool):
    model = tiny_llama()
    batch = random_batch(b=4)
    empty = {k: v.clone() for k, v in batch.items()}
    empty["labels"][6] = -100
    with pytest.raises(ValueError, match=r"rows \[6\] have no response tokens"):
        sharded_loss(pool, model, empty, LossConfig(loss_type="dpo"))
    cached = cached_batch(batch, model.config.hidden_size, 0)
    cached[keys.TOKENS_PER_ROW] = cached[keys.TOKENS_PER_ROW].clone()
    cached[keys.TOKENS_PER_ROW][5] += 1
    with pytest.raises(ValueError, match=r"rows \[5\]"):
        sharded_loss(pool, model, cached, LossConfig(loss_type="dpo"))


def test_mapo_activation_weights_from_an_online_reference_do_not_run_in_shards():
    batch = random_batch(b=2)
    assert not runs_in_shards(batch, LossConfig(loss_type="mapo"))  # forward hooks: module state
    assert runs_in_shards(batch, LossConfig(loss_type="mapo", mapo_mapping="uniform"))
    cached = cached_batch(batch, 16, 0)
    assert runs_in_shards(cached, LossConfig(loss_type="mapo"))  # the weights come from the cache


def test_merged_metrics_weigh_pairs_or_tokens():
    parts = [
        ({"loss": 1.0, "mask/mean": 0.5, "mask/dead_pairs": 0.0}, 1, 10),
        ({"loss": 4.0, "mask/mean": 1.0, "mask/dead_pairs": 1.0}, 3, 10),
    ]
    m = merge_metrics(parts)
    assert m["loss"] == pytest.approx((1 + 12) / 4)
    assert m["mask/mean"] == pytest.approx((5 + 10) / 20)
    assert m["mask/dead_pairs"] == pytest.approx(3 / 4)


def test_the_shards_share_the_ops_chunk_budget(pool, monkeypatch):
    import sparsepo_lite.training.pair_threads as pair_threads
    from sparsepo_lite.ops import DEFAULT_CHUNK_BYTES, default_chunk_size

    model = tiny_llama()
    batch = random_batch(b=4)
    seen = []
    real = pair_threads.compute_loss
    monkeypatch.setattr(
        pair_threads, "compute_loss", lambda m, b, c, **k: seen.append(c.chunk_size) or real(m, b, c, **k)
    )
    sharded_loss(pool, model, batch, LossConfig(loss_type="tdpo1"))
    tokens = max(
        int((s["labels"][:, 1:] != -100).sum()) for s in (select_pairs(batch, 0, 2), select_pairs(batch, 2, 4))
    )
    want = default_chunk_size(tokens, VOCAB, torch.float64, exact=True, budget_bytes=DEFAULT_CHUNK_BYTES // 2)
    assert seen == [want, want]
    seen.clear()
    sharded_loss(pool, model, batch, LossConfig(loss_type="tdpo1", chunk_size=3))  # a chunk size set is kept
    assert seen == [3, 3]


def test_uses_dropout_sees_modules_attention_rates_and_the_config():
    from sparsepo_lite.models import disable_dropout, uses_dropout

    model = tiny_llama()
    assert not uses_dropout(model)
    model.config.attention_dropout = 0.1
    assert uses_dropout(model)
    model.config.attention_dropout = 0.0
    layer = next(m for m in model.modules() if hasattr(m, "lora_dropout"))
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    assert uses_dropout(model)
    disable_dropout(model)
    assert not uses_dropout(model)


def test_dropout_sites_see_class_rates_and_rates_changed_later():
    from sparsepo_lite.models import any_dropout, disable_dropout, dropout_sites, uses_dropout

    class ClassRate(torch.nn.Module):
        dropout = 0.1  # a rate set on the class, not the instance

    class PropertyRate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rate = 0.1

        @property
        def attn_pdrop(self):  # a rate read through a property
            return self.rate

        @attn_pdrop.setter
        def attn_pdrop(self, value):
            self.rate = value

    model = tiny_llama()
    model.extra = ClassRate()
    assert uses_dropout(model)
    model.extra.dropout = 0.0
    model.prop = PropertyRate()
    assert uses_dropout(model)
    disable_dropout(model)
    assert not uses_dropout(model) and ClassRate.dropout == 0.1  # the instance's rate is zeroed
    assert model.prop.rate == 0.0
    sites = dropout_sites(model)
    assert not any_dropout(sites)
    model.config.attention_dropout = 0.2  # a rate changed after the sites were found is seen
    assert any_dropout(sites)
