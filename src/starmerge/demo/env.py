"""The demo's runtime environment: offline hub mode, torch threads, the cache directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def quiet_transformers() -> None:
    """Offline mode and no hub or weight-loading chatter: the demo never downloads."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def cpu_threads() -> Iterator[int]:
    """Set torch's CPU threads for the demo; restore the previous count on exit.

    ``$STARMERGE_THREADS`` wins. Otherwise torch's default, or fewer when other work keeps the
    cores busy (1-minute load average near the core count; the set-up that ran just before, such
    as ``pip install``, must not count): threads that share a core wait for each other at every
    op, and on a busy 2-core VM two threads ran 2-5x slower than one.
    """
    previous = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    busy = load >= cores - 0.5
    free = max(1, min(previous, round(cores - load))) if busy else previous
    wanted = int(os.environ.get("STARMERGE_THREADS") or 0) or free
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


#: Threads for everything whose result is cached and compared bit for bit (adapter training,
#: statistics, mask training): the float reduction order, hence the trained weights' bits, depends
#: on torch's thread count, and Localize-and-Stitch's top-k masks turn a last-bit change into a
#: different test item or two. One thread gives the same adapters, hence the same table, on every
#: machine and under any load (evaluation keeps :func:`cpu_threads`).
TRAIN_THREADS = 1


@contextlib.contextmanager
def training_threads() -> Iterator[int]:
    """Run the block with :data:`TRAIN_THREADS` torch threads; restore the count on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield TRAIN_THREADS
    finally:
        torch.set_num_threads(previous)


def default_cache_dir() -> Path:
    """``$STARMERGE_CACHE``, else ``~/.cache/starmerge``."""
    env = os.environ.get("STARMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "starmerge"
