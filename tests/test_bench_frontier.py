"""bench/frontier.py's arithmetic: seed aggregation and the equal-KL comparison with TDPO1."""

from __future__ import annotations

import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def frontier():
    return bench_module("frontier")


def _row(method, beta, seed, reward, kl, lift=None):
    r = {
        "method": method,
        "beta": beta,
        "seed": seed,
        "reward_policy": reward,
        "reward_gain": reward - 0.1,
        "kl": kl,
        "win_rate": 0.6,
        "reward_reference": 0.1,
    }
    if lift is not None:
        r["mask_lift"] = {"lift": lift, "chosen": {"lift": lift + 0.1}, "rejected": {"lift": lift - 0.1}}
        r["mask"] = {"drift": 0.5}
    return r


def test_seed_mean_and_spread(frontier):
    rows = [_row("sparsepo", 0.1, s, 0.3 + 0.1 * s, 1.0 + s, lift=1.0 + 0.2 * s) for s in range(3)]
    (agg,) = frontier.aggregate(rows, ["sparsepo"], [0.1])
    assert agg["reward_policy"] == pytest.approx(0.4) and agg["reward_policy_sd"] == pytest.approx(0.1)
    assert agg["kl"] == pytest.approx(2.0) and agg["kl_sd"] == pytest.approx(1.0)
    assert agg["lift"] == pytest.approx(1.2) and agg["lift_chosen"] == pytest.approx(1.3)
    assert agg["seeds"] == [0, 1, 2] and agg["mask_drift"] == pytest.approx(0.5)


def test_reward_at_equal_kl_interpolates_between_betas(frontier):
    tdpo1 = [{"kl": 1.0, "reward_policy": 0.2}, {"kl": 3.0, "reward_policy": 0.6}]
    assert frontier.at_equal_kl(tdpo1, 2.0) == pytest.approx(0.4)
    assert frontier.at_equal_kl(tdpo1, 1.0) == pytest.approx(0.2)
    assert frontier.at_equal_kl(tdpo1, 0.5) is None and frontier.at_equal_kl(tdpo1, 3.5) is None
