"""Peak memory of this process, as the merge's memory bound counts it.

``ru_maxrss`` includes the page cache of memory-mapped checkpoints (safetensors are mmap'ed), so
on Linux a sampler thread reads ``RssAnon`` (anonymous memory: tensors, buffers) from
``/proc/self/status`` instead and keeps its maximum.
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")


def rss_anon_bytes() -> int | None:
    """Current anonymous resident memory in bytes, or None where /proc is not available."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def max_rss_bytes() -> int:
    """Peak resident set size of this process (page cache of mapped files included)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class PeakMemory:
    """Context manager sampling ``RssAnon`` every ``interval`` seconds; ``.peak`` in bytes.

    Example:
        >>> with PeakMemory() as mem:
        ...     x = bytearray(10**7)
        >>> mem.peak > 0
        True
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            now = rss_anon_bytes()
            if now is not None:
                self.peak = max(self.peak, now)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        now = rss_anon_bytes()
        if now is None:  # no /proc: fall back to the (larger) max RSS
            self.peak = max_rss_bytes()
        else:
            self.peak = max(self.peak, now)
