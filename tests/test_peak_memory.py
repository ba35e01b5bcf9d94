"""PeakMemory measures what a block allocates, not what was live before it."""

import torch

from sparsepo_lite.peak_memory import PeakMemory


def test_sees_a_large_temporary_and_ignores_earlier_allocations():
    before = torch.ones(25_000_000)  # 100 MB live at entry: not counted
    with PeakMemory() as pm:
        tmp = torch.ones(50_000_000)  # 200 MB
        del tmp
    assert 190e6 <= pm.peak_bytes <= 260e6
    with PeakMemory() as pm2:
        small = torch.ones(1000)
    assert pm2.peak_bytes < 20e6
    del before, small
