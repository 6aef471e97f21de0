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
from collections.abc import Iterator

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
