"""split_over_cores: every index once, two threads only where the work is large enough."""

import os
import threading
import time

import pytest
import torch

from starmerge.tensors import threads
from starmerge.tensors.threads import SPLIT_MIN_ENTRIES, one_thread, split_over_cores


def _record(n, entries, cores, monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: cores)
    seen: dict[int, tuple[int, int]] = {}
    lock = threading.Lock()

    def fn(items):
        for i in items:
            with lock:
                assert i not in seen, f"index {i} run twice"
                seen[i] = (threading.get_ident(), torch.get_num_threads())

    with one_thread():
        split_over_cores(fn, n, entries)
    return seen


@pytest.mark.parametrize("n", [2, 3, 7])
def test_large_work_runs_every_index_once_on_two_threads(n, monkeypatch):
    seen = _record(n, SPLIT_MIN_ENTRIES, 2, monkeypatch)
    assert sorted(seen) == list(range(n))
    idents = {ident for ident, _ in seen.values()}
    assert threading.get_ident() in idents and len(idents) == 2
    assert {count for _, count in seen.values()} == {1}  # the helper runs one torch thread too


@pytest.mark.parametrize(
    ("n", "entries", "cores"),
    [(5, SPLIT_MIN_ENTRIES - 1, 2), (1, SPLIT_MIN_ENTRIES, 2), (5, SPLIT_MIN_ENTRIES, 1)],
)
def test_small_work_one_task_or_one_core_stays_on_this_thread(n, entries, cores, monkeypatch):
    seen = _record(n, entries, cores, monkeypatch)
    assert sorted(seen) == list(range(n))
    assert {ident for ident, _ in seen.values()} == {threading.get_ident()}


def test_an_error_in_the_helper_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: 2)

    def fn(items):
        if 1 in items:
            raise ValueError("odd half failed")

    with pytest.raises(ValueError, match="odd half failed"):
        split_over_cores(fn, 4, SPLIT_MIN_ENTRIES)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_helper(monkeypatch):
    """The parent's helper thread does not exist in a child: the child must not wait on it."""
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    split_over_cores(lambda items: None, 2, SPLIT_MIN_ENTRIES)  # the parent's helper exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when both halves ran
        done = []
        split_over_cores(done.extend, 4, SPLIT_MIN_ENTRIES)
        os._exit(0 if sorted(done) == [0, 1, 2, 3] else 1)
    for _ in range(200):  # up to 20 s
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the forked child hung waiting for the parent's helper thread")
