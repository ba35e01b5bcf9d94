"""Peak memory of a block of code, above what was live when it started.

CPU: the process's resident-set high-water mark (``VmHWM``), reset on entry through
``/proc/self/clear_refs`` (Linux). Large tensors are mmap-backed and returned on free, so
this tracks live tensor memory closely; it counts touched pages only. Run one measurement
per process where other allocations could interfere.
CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry.
"""

from __future__ import annotations

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_rss_peak() -> None:
    """Reset the process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Context manager: ``peak_bytes`` = peak memory inside the block minus memory at entry.

    >>> with PeakMemory() as pm:
    ...     x = torch.ones(1 << 20)
    >>> pm.peak_bytes >= 4 << 20
    True
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            reset_rss_peak()
            self._start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kb("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self._start)
