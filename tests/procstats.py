"""Process figures the reliability tests assert on (Linux /proc): resident memory, threads,
open file descriptors. Not a test module."""

from __future__ import annotations

import os
import time
from typing import Dict, List


def stats(pid: int) -> Dict[str, int]:
    """{"rss_kb": VmRSS, "threads": Threads, "fds": entries in /proc/PID/fd}."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def settled(pid: int, samples: int = 3, interval: float = 0.2) -> Dict[str, int]:
    """Median of a few samples, so one transient allocation does not decide a test."""
    got: List[Dict[str, int]] = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        got.append(stats(pid))
    return {k: sorted(g[k] for g in got)[len(got) // 2] for k in got[0]}


def growth(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, float]:
    """Relative growth per figure (0.05 = 5 %)."""
    return {k: (after[k] - before[k]) / max(1, before[k]) for k in before}
