from __future__ import annotations

import time

import pytest

from starmerge.memory import PeakMemory, rss_anon_bytes


@pytest.mark.skipif(rss_anon_bytes() is None, reason="needs /proc/self/status (Linux)")
def test_peak_sees_a_short_lived_allocation():
    before = rss_anon_bytes()
    with PeakMemory(interval=0.005) as mem:
        # 50 MiB of fresh private pages, all written (a torch tensor might reuse freed heap).
        block = b"x" * (50 * 2**20)
        time.sleep(0.05)
        del block
    assert mem.peak - before > 40 * 2**20
    assert rss_anon_bytes() < mem.peak
