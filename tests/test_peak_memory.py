"""PeakMemory measures what a block allocates, not what was live before it.

RSS-based: meant for one measurement in a fresh process (benchmarks run each variant in its own
process); a long-lived process whose allocators keep freed memory resident would under-report.
So the check runs in a subprocess, as the benchmarks do.
"""

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, torch
    from sparsepo_lite.peak_memory import PeakMemory
    before = torch.ones(25_000_000)  # 100 MB live at entry: not counted
    with PeakMemory() as pm:
        tmp = torch.ones(50_000_000)  # 200 MB
        del tmp
    with PeakMemory() as pm2:
        small = torch.ones(1000)
    print(json.dumps([pm.peak_bytes, pm2.peak_bytes]))
""")


def test_sees_a_large_temporary_and_ignores_earlier_allocations():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    big, small = json.loads(out.strip().splitlines()[-1])
    assert 190e6 <= big <= 260e6
    assert small < 20e6
