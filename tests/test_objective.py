"""compute_loss on a tiny float64 Llama with a peft LoRA adapter, against a full-logits float64
implementation written here from the method definitions (its masks from the mask net's parameters by hand)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from sparsepo_lite import LossConfig, SparsePOMasks, compute_loss
from sparsepo_lite.objective import online_reference

VOCAB, PAD = 61, 0
METHODS = ["dpo", "tdpo1", "tdpo2", "sparsepo", "sparsepo_indp", "mapo"]


def tiny_llama(seed=0, lora_scale=0.3):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).double()
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(model, lora)
    if lora_scale:
        with torch.no_grad():  # move the policy away from the reference
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, lora_scale)
    return model


def make_batch(prompts, chosen, rejected, pad_to=None):
    """Rows: chosen responses first, then rejected; right padding; labels -100 on prompt/pad."""
    rows = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    t = pad_to or max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), t), PAD)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a)
        ids[i, : len(seq)] = seq
        att[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def random_batch(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()
    lens = lambda: int(torch.randint(1, 6, (1,), generator=g))
    prompts = [rnd(lens() + 1) for _ in range(b)]
    return make_batch(prompts, [rnd(lens()) for _ in range(b)], [rnd(lens()) for _ in range(b)])


def config_for(method, model, **kw):
    if method.startswith("sparsepo"):
        torch.manual_seed(5)
        masks = SparsePOMasks.for_model(model, independent=method.endswith("indp"), init_std=0.5).double()
        return LossConfig(loss_type="sparsepo", masks=masks, **kw)
    return LossConfig(loss_type=method, **kw)


def _net_mask(net, hs):
    """Mask from hidden states [2B, T, d] of layers 1..L, by hand: shared LN, ReLU units, ReLU mixer."""
    out = 0
    for l, h in enumerate(hs):
        g = F.layer_norm(h, h.shape[-1:], net.norm.weight, net.norm.bias, net.norm.eps)
        out = out + net.mixer[l] * torch.relu(g @ net.layer_weight[l] + net.layer_bias[l])
    return torch.relu(out)


def oracle(model, batch, cfg, mapo_mask=None):
    """Full-logits float64 loss, independent of the package's loss code."""
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    lq = torch.log_softmax(ref.logits[:, :-1].double(), -1)
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    r = (tgt != -100).double()
    y = tgt.clamp_min(0)[..., None]
    delta = (lp.gather(-1, y) - lq.gather(-1, y)).squeeze(-1)
    K = (lq.exp() * (lq - lp)).sum(-1)
    b = ids.shape[0] // 2
    one = torch.ones_like(r)
    l1 = 0
    if cfg.loss_type == "sparsepo":
        hs = [h[:, :-1] for h in ref.hidden_states[1:]]
        if cfg.masks.independent:
            mu, md = _net_mask(cfg.masks.reward_net, hs), _net_mask(cfg.masks.kl_net, hs)
        else:
            mu = md = _net_mask(cfg.masks.common_net, hs)
        if cfg.mask_normalize:  # each response's masks divided by their mean over its tokens
            mu = mu * r.sum(-1, keepdim=True) / ((r * mu).sum(-1, keepdim=True) + 1e-6)
            md = md * r.sum(-1, keepdim=True) / ((r * md).sum(-1, keepdim=True) + 1e-6)
        u = mu if cfg.mask_on_reward else one
        d = md if cfg.mask_on_kl else one
        half = 0.5 if (not cfg.masks.independent and cfg.mask_on_reward and cfg.mask_on_kl) else 1.0
        l1_seq = half * (
            cfg.l1_reward * (r * mu).sum(-1) * cfg.mask_on_reward + cfg.l1_kl * (r * md).sum(-1) * cfg.mask_on_kl
        )
        l1 = l1_seq[:b] + l1_seq[b:]
    elif cfg.loss_type == "mapo":
        u = d = mapo_mask
    else:
        u, d = one, one
    if "token_weights" in batch:
        tw = batch["token_weights"][:, 1:].double()
        u, d = u * tw, d * tw
    S = (r * u * delta).sum(-1)
    KL = (r * d * K).sum(-1)
    if cfg.loss_type == "dpo":
        z = S[:b] - S[b:]
    elif cfg.loss_type == "tdpo2":
        KLu = (r * K).sum(-1)
        z = S[:b] - S[b:] - cfg.alpha * (KLu[b:] - KLu[:b].detach())
    else:
        z = (S[:b] + KL[:b]) - (S[b:] + KL[b:])
    return (-F.logsigmoid(cfg.beta * z) + l1).mean()


def _params(model, cfg):
    ps = [p for n, p in model.named_parameters() if "lora_" in n]
    if cfg.masks is not None:
        ps += list(cfg.masks.parameters())
    return ps


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def check_against_oracle(model, batch, cfg, rtol=1e-6, grad_rtol=1e-5):
    """compute_loss vs the oracle: loss, then the gradients of LoRA (and mask) parameters."""
    loss, metrics, det = compute_loss(model, batch, cfg, return_details=True)
    mapo_mask = None
    if cfg.loss_type == "mapo":  # checked independently in test_mapo_mask_matches_hand_recorded_activations
        mapo_mask = torch.zeros(batch["labels"][:, 1:].shape, dtype=torch.float64)
        mapo_mask[det["seq_ids"], det["positions"]] = det["fixed_mask"].double()
    want = oracle(model, batch, cfg, mapo_mask)
    torch.testing.assert_close(loss, want, rtol=rtol, atol=1e-10)
    params = _params(model, cfg)
    grads, wants = _grads(loss, params), _grads(want, params)
    # Absolute slack relative to the largest gradient (the bar: gradients to 1e-5). Seen:
    # <= 3e-14 of the scale everywhere, except up to 6e-8 for independent SparsePO nets on
    # SmolLM2 in some LoRA inits (not understood yet; far inside the bar).
    scale = max(w.abs().max().item() for w in wants)
    for g, w in zip(grads, wants):
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=grad_rtol, atol=1e-6 * scale)
    return metrics


@pytest.mark.parametrize("method", METHODS)
def test_loss_and_gradients_match_full_logits_float64(method):
    model = tiny_llama()
    batch = random_batch(b=3)
    cfg = (
        config_for(method, model, l1_reward=0.01, l1_kl=0.02)
        if method.startswith("sparsepo")
        else config_for(method, model)
    )
    metrics = check_against_oracle(model, batch, cfg)
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["rewards/accuracies"] <= 1


@pytest.mark.parametrize("method", ["sparsepo", "sparsepo_indp"])
@pytest.mark.parametrize("init", ["ones", "official"])
def test_normalized_masks_match_full_logits_float64(method, init):
    """mask_normalize: each response's masks over their mean (the oracle's own terms above); with
    either init (the 'ones' init starts the masks at 1)."""
    model = tiny_llama()
    batch = random_batch(b=3)
    cfg = config_for(method, model, l1_reward=0.01, mask_normalize=True)
    torch.manual_seed(7)
    for net in [cfg.masks.reward_net, cfg.masks.kl_net] if cfg.masks.independent else [cfg.masks.common_net]:
        net.init = init
        net.reset_parameters()
    check_against_oracle(model, batch, cfg)
    _, _, det = compute_loss(model, batch, cfg, return_details=True)
    seqs = det["seq_ids"]
    means = [det["reward_mask"][seqs == i].double().mean().item() for i in range(6)]
    # every response's reward mask now averages 1 over its tokens (0 if it was 0 on all of them)
    assert all(m == pytest.approx(1.0, abs=1e-5) or m == 0 for m in means), means
    assert init == "official" or all(m == pytest.approx(1.0, abs=1e-5) for m in means)


@pytest.mark.parametrize("method", METHODS)
def test_loss_is_log2_at_init(method):
    model = tiny_llama(lora_scale=0)  # LoRA B = 0: policy == reference
    cfg = config_for(method, model, l1_reward=0.01) if method.startswith("sparsepo") else config_for(method, model)
    loss, metrics, det = compute_loss(model, random_batch(), cfg, return_details=True)
    l1 = 0.0
    if method.startswith("sparsepo"):
        half = 1.0 if cfg.masks.independent else 0.5
        l1 = half * 0.01 * det["reward_mask"].sum().item() / 2  # mean over the 2 pairs
    assert loss.item() == pytest.approx(math.log(2) + l1, abs=1e-10)
    assert abs(metrics["kl/chosen"]) < 1e-10


def test_reductions_to_tdpo1():
    model = tiny_llama()
    batch = random_batch(b=3)
    tdpo1, _ = compute_loss(model, batch, LossConfig(loss_type="tdpo1"))
    unmasked = config_for("sparsepo", model, mask_on_reward=False, mask_on_kl=False)
    torch.testing.assert_close(compute_loss(model, batch, unmasked)[0], tdpo1)
    uniform = LossConfig(loss_type="mapo", mapo_mapping="uniform")
    torch.testing.assert_close(compute_loss(model, batch, uniform)[0], tdpo1)


@pytest.mark.parametrize("method", METHODS)
def test_extra_right_padding_changes_nothing(method):
    model = tiny_llama()
    batch = random_batch(b=2)
    t = batch["input_ids"].shape[1]
    padded = {k: F.pad(v, (0, 5), value=-100 if k == "labels" else 0) for k, v in batch.items()}
    assert padded["input_ids"].shape[1] == t + 5
    cfg = config_for(method, model)
    a, _ = compute_loss(model, batch, cfg)
    b, _ = compute_loss(model, padded, cfg)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    params = _params(model, cfg)
    for ga, gb in zip(_grads(a, params), _grads(b, params)):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["sparsepo", "mapo"])
def test_masks_only_touch_response_positions(method):
    model = tiny_llama()
    batch = random_batch(b=2)
    _, _, det = compute_loss(model, batch, config_for(method, model), return_details=True)
    resp = batch["labels"][:, 1:] != -100
    assert resp[det["seq_ids"], det["positions"]].all()
    assert det["seq_ids"].numel() == int(resp.sum())
    mask = det["reward_mask"] if method == "sparsepo" else det["fixed_mask"]
    assert mask.shape == det["seq_ids"].shape


def test_data_token_weights_act_as_a_fixed_mask():
    model = tiny_llama()
    batch = random_batch(b=2)
    batch["token_weights"] = torch.rand(batch["labels"].shape, dtype=torch.float64)
    cfg = LossConfig(loss_type="dpo")
    loss, _ = compute_loss(model, batch, cfg)
    torch.testing.assert_close(loss, oracle(model, batch, cfg), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="token_weights are not supported with loss_type='tdpo2'"):
        compute_loss(model, batch, LossConfig(loss_type="tdpo2"))
    batch["token_weights"] = torch.ones_like(batch["token_weights"])
    unweighted = {k: v for k, v in batch.items() if k != "token_weights"}
    torch.testing.assert_close(compute_loss(model, batch, cfg)[0], compute_loss(model, unweighted, cfg)[0])


def test_mask_parameters_train_with_a_peft_policy():
    # The official LoRA runs left the mask net frozen at its init: ours must move.
    model = tiny_llama()
    cfg = config_for("sparsepo", model)
    before = [p.detach().clone() for p in cfg.masks.parameters()]
    opt = torch.optim.AdamW(list(cfg.masks.parameters()) + [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = compute_loss(model, random_batch(b=3), cfg)
    loss.backward()
    assert all(p.grad is not None for p in cfg.masks.parameters())
    assert any(p.grad.abs().sum() > 0 for p in cfg.masks.parameters())
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, cfg.masks.parameters()))


def test_separate_reference_model():
    policy = tiny_llama()
    ref = tiny_llama(lora_scale=0).get_base_model()  # a plain model as the reference
    batch = random_batch()
    a, _ = compute_loss(policy, batch, LossConfig(loss_type="tdpo1", ref_model=ref))
    b, _ = compute_loss(policy, batch, LossConfig(loss_type="tdpo1"))  # adapter-disabled base
    torch.testing.assert_close(a, b)  # same base weights (seed 0)


def test_bad_batches_and_configs_raise_clear_errors():
    model = tiny_llama()
    batch = random_batch(b=2)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        compute_loss(model, {k: v[:3] for k, v in batch.items()}, LossConfig(loss_type="dpo"))
    with pytest.raises(KeyError, match="labels"):
        compute_loss(model, {k: v for k, v in batch.items() if k != "labels"}, LossConfig(loss_type="dpo"))
    empty = {k: v.clone() for k, v in batch.items()}
    empty["labels"][1] = -100
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        compute_loss(model, empty, LossConfig(loss_type="dpo"))
    vocab = model.get_base_model().get_input_embeddings().num_embeddings

    def edited(key, make):
        out = {k: v.clone() for k, v in batch.items()}
        out[key] = make(out)
        return out

    def past_vocab(b):
        ids = b["input_ids"].clone()
        ids[3, 1] = vocab  # one id past the embedding's rows, in the last row
        return ids

    def pre_shifted(b):  # a collator that shifted the labels itself: the loss would score the next token
        labels = torch.full_like(b["labels"], -100)
        labels[:, :-1] = b["labels"][:, 1:]
        return labels

    def on_padding(b):  # a response label where the row is padded
        att = b["attention_mask"].clone()
        row = int((att == 0).any(dim=1).nonzero()[0])
        col = int((att[row] == 0).nonzero()[0])
        b["labels"][row, col] = b["input_ids"][row, col]
        return att

    bad_batches = [
        (
            edited("labels", pre_shifted),
            ValueError,
            r"each label must be -100 or the input id .* batch row 0, position \d+",
        ),
        (
            edited("attention_mask", on_padding),
            ValueError,
            r"each label must be -100 or the input id .* attention_mask 0",
        ),
        (edited("input_ids", lambda b: b["input_ids"].float()), TypeError, "input_ids must hold token ids as int64"),
        (edited("labels", lambda b: b["labels"].double()), TypeError, "labels must hold token ids as int64"),
        (edited("input_ids", lambda b: b["input_ids"].short()), TypeError, "got torch.int16"),  # not the embedding's
        (edited("labels", lambda b: b["labels"].numpy()), TypeError, r"batch\['labels'\] must be a torch.Tensor"),
        (
            edited("ref_tokens_per_row", lambda b: torch.tensor([3])),
            ValueError,
            r"'ref_tokens_per_row' must hold one count per batch row, \[4\]; got \[1\]",
        ),
        (edited("input_ids", past_vocab), ValueError, rf"input_ids must lie in \[0, {vocab}\).* first in batch row 3"),
        (edited("token_weights", lambda b: torch.ones(4, 3)), ValueError, "token_weights \\[4, 3\\] must be shaped"),
        (
            edited("token_weights", lambda b: torch.ones(b["labels"].shape, dtype=torch.long)),
            TypeError,
            "token_weights must be floating point",
        ),
        (
            edited(
                "token_weights", lambda b: torch.ones(b["labels"].shape).index_fill_(0, torch.tensor([2]), math.nan)
            ),
            ValueError,
            r"token_weights hold a non-finite value \(batch row 2\)",
        ),
    ]
    for bad, error, message in bad_batches:
        for loss_type in ("dpo", "tdpo1"):  # the online reference's forward runs first for tdpo1
            with pytest.raises(error, match=message):
                compute_loss(model, bad, LossConfig(loss_type=loss_type))
    with pytest.raises(ValueError, match="needs masks"):
        LossConfig(loss_type="sparsepo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        LossConfig(loss_type="ipo")
    with pytest.raises(ValueError, match="no reference model"):
        compute_loss(model.get_base_model(), batch, LossConfig(loss_type="dpo"))


def _minmax(a, r):
    out = torch.zeros_like(a)
    for i in range(a.shape[0]):
        v = a[i][r[i]]
        out[i][r[i]] = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else torch.ones_like(v)
    return out


def test_mapo_mask_matches_hand_recorded_activations():
    model = tiny_llama()
    batch = random_batch(b=2, seed=7)
    _, _, det = compute_loss(model, batch, LossConfig(loss_type="mapo"), return_details=True)
    # Record full activations with our own hooks on the reference (adapter disabled).
    acts = {"mlp": [], "attn": [], "resid": []}
    lm = model.get_base_model()
    handles = []
    for layer in lm.model.layers:
        pre = lambda kind: lambda m, args: acts[kind].append(args[0].detach())
        post = lambda kind: lambda m, args, out: acts[kind].append((out[0] if isinstance(out, tuple) else out).detach())
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(pre("mlp")))
        for proj in ("q_proj", "k_proj", "v_proj"):
            handles.append(getattr(layer.self_attn, proj).register_forward_hook(post("attn")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre("attn")))
        for mod in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, layer):
            handles.append(mod.register_forward_hook(post("resid")))
    handles.append(lm.model.embed_tokens.register_forward_hook(post("resid")))
    handles.append(lm.model.norm.register_forward_hook(post("resid")))
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for h in handles:
        h.remove()
    r = batch["labels"][:, 1:] != -100
    t1 = r.shape[1]
    per_type = [torch.stack([_minmax(a.mean(-1)[:, :t1], r) for a in maps]).mean(0) for maps in acts.values()]
    per_type.append(_minmax(logits.mean(-1)[:, :t1], r))
    want = torch.stack(per_type).mean(0)[det["seq_ids"], det["positions"]]
    assert len(acts["resid"]) == 4 * 2 + 2 and len(acts["attn"]) == 4 * 2
    torch.testing.assert_close(det["fixed_mask"].double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["tdpo1", "sparsepo_indp"])
def test_metrics_follow_their_formulas(method):
    model = tiny_llama()
    batch = random_batch(b=3, seed=3)
    cfg = config_for(method, model)
    _, metrics, det = compute_loss(model, batch, cfg, return_details=True)
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1], -1)
        with model.disable_adapter():
            lq = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1], -1)
    tgt = labels[:, 1:]
    r = tgt != -100
    y = tgt.clamp_min(0)[..., None]
    logp = (lp.gather(-1, y).squeeze(-1) * r).sum(-1)
    delta = (lp - lq).gather(-1, y).squeeze(-1)
    kl = ((lq.exp() * (lq - lp)).sum(-1) * r).sum(-1)
    u = torch.zeros_like(delta)
    u[det["seq_ids"], det["positions"]] = det["u"]
    rew = 0.1 * (u * delta * r).sum(-1)
    b = 3
    assert metrics["rewards/chosen"] == pytest.approx(rew[:b].mean().item(), rel=1e-9)
    assert metrics["rewards/rejected"] == pytest.approx(rew[b:].mean().item(), rel=1e-9)
    assert metrics["rewards/margins"] == pytest.approx((rew[:b] - rew[b:]).mean().item(), rel=1e-9, abs=1e-12)
    assert metrics["rewards/accuracies"] == pytest.approx((rew[:b] > rew[b:]).double().mean().item())
    assert metrics["logps/chosen"] == pytest.approx(logp[:b].mean().item(), rel=1e-9)
    assert metrics["kl/rejected"] == pytest.approx(kl[b:].mean().item(), rel=1e-9)
    if method == "sparsepo_indp":
        assert metrics["mask/dead"] == pytest.approx((det["reward_mask"] == 0).double().mean().item())
        assert metrics["mask/kl_mean"] == pytest.approx(det["kl_mask"].mean().item())
        assert metrics["mask/kl_dead"] == pytest.approx((det["kl_mask"] == 0).double().mean().item())
        for key, mask in (("mask/dead_pairs", det["reward_mask"]), ("mask/kl_dead_pairs", det["kl_mask"])):
            seqs = det["seq_ids"]
            dead = [bool((mask[(seqs == i) | (seqs == i + b)] == 0).all()) for i in range(b)]
            assert metrics[key] == pytest.approx(sum(dead) / b)


def test_dead_pairs_count_pairs_whose_masks_are_zero_everywhere():
    model = tiny_llama()
    batch = random_batch(b=3, seed=3)
    cfg = config_for("sparsepo", model)
    with torch.no_grad():
        cfg.masks.common_net.mixer[:] = -1.0  # ReLU(negative) = 0 on every token: a collapsed mask
    _, metrics, _ = compute_loss(model, batch, cfg, return_details=True)
    assert metrics["mask/dead"] == 1.0 and metrics["mask/dead_pairs"] == 1.0 and metrics["mask/mean"] == 0.0
    with torch.no_grad():
        cfg.masks.common_net.mixer[:] = 1.0
        cfg.masks.common_net.layer_bias[:] = 10.0  # every unit on
    _, metrics, _ = compute_loss(model, batch, cfg, return_details=True)
    assert metrics["mask/dead"] == 0.0 and metrics["mask/dead_pairs"] == 0.0


def _tiny(family):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if family == "gpt2":
        # dropout off, as the official trainers do (disable_dropout)
        cfg = transformers.GPT2Config(
            n_embd=16,
            n_layer=2,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        targets = ["c_attn", "c_proj", "c_fc"]
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, **common
        )
        targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    else:
        cls = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[family]
        cfg = cls(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            **common,
        )
        targets = ["q_proj", "v_proj", "up_proj"]
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).double()
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=family == "gpt2"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2", "gpt_neox"])
def test_other_model_families(family):
    model = _tiny(family)
    batch = random_batch(b=2)
    for method in ("tdpo2", "sparsepo"):
        check_against_oracle(model, batch, config_for(method, model))
    if family in ("gpt2", "gpt_neox"):
        with pytest.raises(ValueError, match="MaPO activation masks need Llama-family decoder layers"):
            compute_loss(model, batch, LossConfig(loss_type="mapo"))
    else:
        check_against_oracle(model, batch, LossConfig(loss_type="mapo"))


def left_padded(batch):
    """``batch`` (right-padded) with each row's padding moved to its front."""
    out = {k: v.clone() for k, v in batch.items()}
    for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][i] = batch[key][i].roll(batch[key].shape[1] - n)
    assert (out["attention_mask"][:, 0] == 0).any()
    return out


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("method", ["tdpo2", "sparsepo"])
def test_left_padding_gives_the_right_padded_loss_and_gradients(family, method):
    """GPT-2 reads its learned positions from 0..T-1 unless told otherwise: left-padded rows were
    scored at shifted positions (a chosen log-prob of -43 instead of -33). Rotary positions (Qwen2)
    only differ by their offset. (Not eager attention: transformers' eager Llama gives NaN logits on
    left-padded rows.)"""
    model = _tiny(family)
    if family == "qwen2":
        model.base_model.model.set_attn_implementation("sdpa")
    batch = random_batch(b=3, seed=4)
    cfg = config_for(method, model)
    right, right_metrics = compute_loss(model, batch, cfg)
    left, left_metrics = compute_loss(model, left_padded(batch), cfg)
    torch.testing.assert_close(left, right, rtol=1e-6, atol=1e-10)
    assert left_metrics["logps/chosen"] == pytest.approx(right_metrics["logps/chosen"], rel=1e-6)
    params = _params(model, cfg)
    for g, w in zip(_grads(left, params), _grads(right, params)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    # the online reference a caller runs first takes the same positions
    ref_left = online_reference(model, left_padded(batch), cfg)
    ref_right = online_reference(model, batch, cfg)
    torch.testing.assert_close(ref_left.hidden, ref_right.hidden, rtol=1e-6, atol=1e-8)
