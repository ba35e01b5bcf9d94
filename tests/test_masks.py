"""SparsePO mask network and MaPO activation masks."""

from __future__ import annotations

import pytest
import torch

from sparsepo_lite.masks import SparsePOMaskNet, SparsePOMasks, mapo_masks, minmax_over_response


def test_mask_net_formula_and_init(seed):
    net = SparsePOMaskNet(num_layers=3, hidden_size=16, eps=1e-6, init="official").double()
    assert net.layer_bias.abs().max() == 0 and (net.norm.weight == 1).all() and (net.norm.bias == 0).all()
    assert 0.01 < net.layer_weight.std().item() < 0.03 and net.mixer.abs().max() < 0.2
    states = [torch.randn(7, 16, dtype=torch.float64) * (l + 1) for l in range(3)]
    got = net(states)
    want = 0
    for l, h in enumerate(states):
        g = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
        want = want + net.mixer[l] * torch.relu(g @ net.layer_weight[l] + net.layer_bias[l])
    torch.testing.assert_close(got, torch.relu(want))
    assert (got >= 0).all()


def test_ones_init_starts_every_token_near_one(seed):
    """SparsePO with mask_init 'ones' starts as TDPO1: biases 1, mixer 1/L, small weights."""
    net = SparsePOMaskNet(num_layers=4, hidden_size=64, init="ones")
    assert (net.layer_bias == 1).all() and torch.allclose(net.mixer, torch.full((4,), 0.25))
    states = [torch.randn(200, 64) * 3 for _ in range(4)]
    m = net(states)
    assert (m > 0).all() and (m - 1).abs().max() < 0.35 and abs(m.mean().item() - 1) < 0.05
    with pytest.raises(ValueError, match="mask init must be one of"):
        SparsePOMaskNet(2, 8, init="zeros")


def test_common_and_independent_masks():
    common = SparsePOMasks(2, 8)
    states = [torch.randn(5, 8) for _ in range(2)]
    m_u, m_d = common(states)
    assert m_u is m_d
    indep = SparsePOMasks(2, 8, independent=True)
    m_u, m_d = indep(states)
    assert not torch.equal(indep.reward_net.layer_weight, indep.kl_net.layer_weight)
    with pytest.raises(ValueError, match="expects 2 layer states"):
        common(states[:1])


def test_zn_rescale_equals_minmax_of_the_zscore(seed):
    v = torch.randn(4, 9) * 3 + 1
    r = torch.rand(4, 9) < 0.7
    r[:, 0] = True
    r[:, 1] = True
    got = minmax_over_response(v, r)
    for i in range(4):
        a = v[i][r[i]]
        z = (a - a.mean()) / a.std()  # the official zn step: z-score, then min-max
        mm = (z - z.min()) / (z.max() - z.min())
        torch.testing.assert_close(got[i][r[i]], mm, rtol=1e-5, atol=1e-6)
    assert (got[~r] == 0).all()  # nothing outside the response


def test_minmax_guards_single_token_and_constant_rows():
    v = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 9.0, 0.0]])
    r = torch.tensor([[True, True, True], [True, True, False], [False, True, False]])
    got = minmax_over_response(v, r)
    assert torch.isfinite(got).all()
    assert got[1].tolist() == [1.0, 1.0, 0.0]  # constant: uniform weight on the response
    assert got[2].tolist() == [0.0, 1.0, 0.0]  # one response token
    torch.testing.assert_close(got[0], torch.tensor([0.0, 0.5, 1.0]))


def test_mapo_masks_average_within_then_across_types(seed):
    r = torch.ones(2, 4, dtype=torch.bool)
    r[1, 3] = False
    a1, a2, b1 = (torch.randn(2, 5) for _ in range(3))
    m = mapo_masks({"attn": [a1, a2], "resid": [b1]}, r)
    mm = lambda a: minmax_over_response(a[:, :4], r)
    torch.testing.assert_close(m, ((mm(a1) + mm(a2)) / 2 + mm(b1)) / 2 * r)
    assert (m[~r] == 0).all() and not m.requires_grad
    assert torch.equal(mapo_masks({}, r, mapping="uniform"), r.float())
    with pytest.raises(ValueError, match="unknown MaPO mapping"):
        mapo_masks({}, r, mapping="layernorm")


def test_masks_refuse_a_model_whose_last_hidden_state_is_narrower_than_its_layers():
    """OPT-350m projects its last state from 1024 to 512 features: one [L, hidden] layer table cannot
    weigh it (it used to fail at the first step inside torch's layer norm)."""
    import transformers

    small = dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2)
    projected = transformers.OPTForCausalLM(transformers.OPTConfig(word_embed_proj_dim=16, **small))
    with pytest.raises(ValueError, match="OPTForCausalLM: .* projects its last one from 32 to 16 features"):
        SparsePOMasks.for_model(projected)
    masks = SparsePOMasks.for_model(
        transformers.OPTForCausalLM(transformers.OPTConfig(word_embed_proj_dim=32, **small))
    )
    assert masks.common_net.layer_weight.shape == (2, 32)
