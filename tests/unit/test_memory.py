from __future__ import annotations

import mmap
import time

import pytest

from starmerge.memory import PeakMemory, rss_anon_bytes


@pytest.mark.skipif(rss_anon_bytes() is None, reason="needs /proc/self/status (Linux)")
def test_peak_sees_a_short_lived_allocation():
    before = rss_anon_bytes()
    with PeakMemory(interval=0.005) as mem:
        # 50 MiB of fresh private anonymous pages, all written: a malloc'ed buffer may reuse heap
        # pages that are already resident and add nothing to RssAnon.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        block = mmap.mmap(-1, 50 * 2**20, flags=flags)
        block.write(b"x" * len(block))
        time.sleep(0.05)
        block.close()
    assert mem.peak - before > 40 * 2**20
    assert rss_anon_bytes() < mem.peak
