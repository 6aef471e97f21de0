from __future__ import annotations

import time

import pytest
import torch

from starmerge.memory import PeakMemory, rss_anon_bytes


@pytest.mark.skipif(rss_anon_bytes() is None, reason="needs /proc/self/status (Linux)")
def test_peak_sees_a_short_lived_allocation():
    before = rss_anon_bytes()
    with PeakMemory(interval=0.005) as mem:
        x = torch.ones(50 * 2**20 // 4)  # 50 MiB, touched
        time.sleep(0.05)
        del x
    assert mem.peak - before > 40 * 2**20
    assert rss_anon_bytes() < mem.peak
