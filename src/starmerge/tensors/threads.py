"""Torch's thread count for small operations: one thread, chosen deliberately.

Torch parallelises a reduction or a GEMM over its intra-op threads whenever the tensor passes a
small grain size. On a machine whose cores are busy with other work, every such parallel region
waits for a thread that is not scheduled: measured on this project's 2-core VM with one busy
neighbour, summing a 12 x 4096 x 16 float32 tensor took 30 us on one thread and 11 ms on two,
and a STAR merge of 12 rank-16 adapters took 1.3 s on one thread and 7-37 s on two. Work on
LoRA factors (O((m + n) r^2) per parameter, r x r cores) and the finiteness reductions gain
nothing measurable from a second thread on a quiet machine, so they run on one thread; dense
work on full matrices keeps torch's own count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Run the block with one torch intra-op thread (when ``active``); restore the count after.

    Switching costs well under a microsecond, so it wraps individual small operations.

    Example:
        >>> with one_thread():
        ...     torch.get_num_threads()
        1
    """
    if not active:
        yield
        return
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_POOL: list[ThreadPoolExecutor] = []  # one helper thread, started on first use
if hasattr(os, "register_at_fork"):  # a forked child has no helper thread: start its own
    os.register_at_fork(after_in_child=_POOL.clear)


# Entries of work below which a split does not pay: handing half to the helper and waiting for
# it costs some 20-50 us, a float64 Gram of a 4096 x 16 factor (65,536 entries) about 75 us.
SPLIT_MIN_ENTRIES = 1 << 19


def split_over_cores(fn: Callable[[Sequence[int]], None], n: int, entries: int) -> None:
    """Run ``fn`` on the even indices of ``range(n)`` in a helper thread and the odd ones here.

    For independent small operations on separate outputs (a group's factor Grams, each task's
    factor products): each operation runs on one torch thread and releases the GIL, so two cores
    do two at once, and nothing waits on a barrier per operation: on a busy machine the two
    halves share whatever core is free and the call takes what one thread would. Runs ``fn``
    on all of them here when this process has one core, ``n < 2``, or the work touches fewer
    than :data:`SPLIT_MIN_ENTRIES` tensor ``entries`` in all. Call it inside
    :func:`one_thread`: the helper runs one torch thread, and setting it sets MKL's count for
    the process.

    Example:
        >>> done = []
        >>> split_over_cores(done.extend, 5, entries=SPLIT_MIN_ENTRIES)
        >>> sorted(done)
        [0, 1, 2, 3, 4]
    """
    if n < 2 or entries < SPLIT_MIN_ENTRIES or _cores() < 2:
        fn(range(n))
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(1, "starmerge-split"))
    other = _POOL[0].submit(_on_one_thread, fn, range(0, n, 2))  # the larger half
    try:
        fn(range(1, n, 2))
    finally:
        other.result()


def _on_one_thread(fn: Callable[[Sequence[int]], None], items: Sequence[int]) -> None:
    """``fn(items)`` in the helper, which keeps one torch thread for good.

    Torch gives a new thread the process-wide count at its first parallel operation, so the
    count is set here, after that, and not restored (restoring would reset MKL's count for the
    caller, still inside its :func:`one_thread`).
    """
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    fn(items)


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
