"""Peak memory of this process, as the merge's memory bound counts it, and the allocator.

``ru_maxrss`` includes the page cache of memory-mapped checkpoints (safetensors are mmap'ed), so
on Linux a sampler thread reads ``RssAnon`` (anonymous memory: tensors, buffers) from
``/proc/self/status`` instead and keeps its maximum. :func:`bounded_allocator` makes glibc give
freed tensors back to the system, and :func:`trim_heap` its heap's free pages, so that the
merge's memory is what its tensors need; :func:`prefer_huge_pages` makes those fresh mappings
cheaper to fault in.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt (malloc.h)
# Blocks from 1 MiB up are mapped; the heap's free top beyond 2 MiB is given back (glibc pairs
# the two thresholds the same way when it raises them). 128 KiB (glibc's starting value) fits
# the prediction a little closer but costs 1.8x CPU on TIES (its 512 KiB histograms).
MMAP_THRESHOLD_BYTES = 2**20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's switch for huge-page-aligned CPU tensors
_bounded: list[bool] = []  # the outcome of the first call (the setting holds for the process)


def bounded_allocator() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (trim: 2 MiB) for this process, once; True when set.

    Why: glibc maps a block (and unmaps it when freed, giving its pages back at once) only
    above its mmap threshold. The threshold starts at 128 KiB but, by default, grows to the size
    of every mapped block that is freed, up to 32 MiB (and the heap's trim threshold to twice
    that), so after the first large tensors of a merge most tensors below 32 MiB come from the
    heap, whose freed pages stay resident: the process then holds 1.3-2.3 times what its live
    tensors need (``bench_memory.py``), and the predicted peak (:mod:`starmerge.peak_model`)
    no longer describes it. Setting the thresholds with ``mallopt`` also turns that growth off.

    Cost: every tensor of 1 MiB or more is a fresh mapping, so its pages are faulted in and
    zeroed by the kernel each time it is allocated: CPU time up to about 1.1 times on the
    merges of ``bench_memory.py --quick``, whose tensors are all below 32 MiB
    (``docs/benchmarks.md``). Blocks that the heap already holds free (allocations made before
    this call) are still reused: call it before a long-running process allocates much.

    One heap for every thread (``M_ARENA_MAX`` 1): the merge reads and computes on two threads
    (:func:`starmerge.tensors.threads.split_over_cores`), and a second thread's own arena
    shrank and grew again at every parameter under the 2 MiB trim threshold, in system calls
    and page faults (0.05 s of the 0.65 s STAR benchmark merge); in one heap the blocks one
    thread frees are the next ones the other allocates. A user's ``MALLOC_ARENA_MAX`` stays.

    A no-op (False) where the C library is not glibc, or when the user set the mmap threshold
    (``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``):
    their settings stay. Idempotent: later calls return the first call's outcome.

    Example:
        >>> bounded_allocator()  # on glibc, without MALLOC_MMAP_THRESHOLD_ set
        True
    """
    if not _bounded:
        _bounded.append(_set_thresholds())
    return _bounded[0]


def prefer_huge_pages() -> bool:
    """Ask torch to place tensors of 2 MiB and more on transparent huge pages; True when asked.

    Why: with :func:`bounded_allocator` every tensor of 1 MiB or more is a fresh mapping whose
    pages the kernel faults in and zeroes on first touch, 4 KiB at a time; torch's
    ``THP_MEM_ALLOC_ENABLE=1`` aligns such tensors to 2 MiB and advises huge pages for them, so
    a 16 MiB tensor takes 8 faults instead of 4096. On ``bench_memory.py``'s inputs TIES then
    merged faster than with glibc's own allocator and small pages (``docs/benchmarks.md``).

    Torch reads the variable once, at its first CPU allocation, so this only takes effect before
    ``torch`` is imported: the CLI calls it first. A no-op (False) once ``torch`` is imported or
    when the user set the variable (``THP_MEM_ALLOC_ENABLE=0`` turns it off). Where the kernel
    has transparent huge pages off (``never``), torch's advice is ignored and nothing changes.
    """
    if "torch" in sys.modules or THP_ENV in os.environ:
        return False
    os.environ[THP_ENV] = "1"
    return True


def trim_heap() -> None:
    """Give the heap's free pages back to the system, where :func:`bounded_allocator` is set.

    Blocks below the mmap threshold (LoRA factors, small tensors, Python objects) still come
    from the heap; their freed pages stay resident, scattered between live blocks, and add up
    over a merge's parameters. The engine calls this (glibc's ``malloc_trim``, about 1 ms)
    after each parameter it writes. A no-op where the thresholds were not set.
    """
    if _bounded and _bounded[0]:
        ctypes.CDLL(None).malloc_trim(0)


def _set_thresholds() -> bool:
    """``mallopt`` both thresholds on glibc unless the user set the mmap one; True when set."""
    if _user_set("mmap_threshold") or not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:  # glibc returns 1 on success
        return False
    if not _user_set("trim_threshold"):  # a user's trim threshold stays too
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    if not _user_set("arena_max", env="MALLOC_ARENA_MAX"):
        mallopt(M_ARENA_MAX, 1)
    return True


def _user_set(name: str, env: str | None = None) -> bool:
    """The user set glibc's ``name``: its variable or the ``glibc.malloc.<name>`` tunable.

    The variable is ``MALLOC_<NAME>_`` for the thresholds; ``env`` names one spelled otherwise
    (``MALLOC_ARENA_MAX`` has no trailing underscore).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    variable = env or f"MALLOC_{name.upper()}_"
    return variable in os.environ or f"glibc.malloc.{name}" in tunables


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


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
