"""``memory.bounded_allocator``: glibc's mmap threshold fixed at 1 MiB, the user's setting kept.

Each check that changes the allocator runs in a child process (the setting holds for the whole
process). The child reads glibc's ``mallinfo2().hblkhd`` (bytes in mapped blocks) around a
``malloc``: a block is mapped exactly when it is at or above the threshold in effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from starmerge import memory

CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    from starmerge.memory import bounded_allocator

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                    .split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mapped(nbytes):
        before = libc.mallinfo2().hblkhd
        p = libc.malloc(nbytes)
        grew = libc.mallinfo2().hblkhd - before
        libc.free(p)
        return grew >= nbytes

    libc.free(libc.malloc(8 << 20))  # a freed mapped block raises glibc's dynamic threshold
    out = {"set": [bounded_allocator(), bounded_allocator()] if sys.argv[1] == "call" else None}
    out["mapped"] = {"2MiB": mapped(2 << 20), "512KiB": mapped(512 << 10)}
    print(json.dumps(out))
    """
)


def _glibc_with_mallinfo2() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return False
    major, minor = (int(x) for x in version.split()[1].split(".")[:2])
    return (major, minor) >= (2, 33)


needs_glibc = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33")


def _child(call: bool = True, **env: str) -> dict:
    drop = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    argv = [sys.executable, "-c", CHILD, "call" if call else "no-call"]
    run = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@needs_glibc
def test_glibc_default_threshold_grows():
    """The control: without the call, the threshold grew to 8 MiB and 2 MiB is heap memory."""
    assert _child(call=False)["mapped"] == {"2MiB": False, "512KiB": False}


@needs_glibc
def test_threshold_fixed_at_1_mib_once_set():
    out = _child()
    assert out["set"] == [True, True]  # idempotent
    # 2 MiB is mapped (its pages go back when freed), 512 KiB stays below the threshold.
    assert out["mapped"] == {"2MiB": True, "512KiB": False}


@needs_glibc
def test_user_threshold_in_the_environment_is_kept():
    out = _child(MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    assert out["set"] == [False, False]
    assert out["mapped"] == {"2MiB": True, "512KiB": True}  # the user's 64 KiB, not 1 MiB


@needs_glibc
def test_user_threshold_in_glibc_tunables_is_kept():
    out = _child(GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={16 * 2**20}")
    assert out["set"] == [False, False]
    assert out["mapped"] == {"2MiB": False, "512KiB": False}  # 16 MiB: neither is mapped


def test_not_glibc_is_a_no_op(monkeypatch):
    def no_gnu_libc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(memory.os, "confstr", no_gnu_libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory._set_thresholds() is False


def test_libc_without_mallopt_is_a_no_op(monkeypatch):
    monkeypatch.setattr(memory, "_is_glibc", lambda: True)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: object())  # no mallopt symbol
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert memory._set_thresholds() is False


TRIM_CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    from starmerge.memory import bounded_allocator, rss_anon_bytes, trim_heap

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    bounded_allocator()
    blocks = [libc.malloc(64 << 10) for _ in range(1024)]  # 64 MiB of heap blocks
    for p in blocks:
        ctypes.memset(p, 1, 64 << 10)
    for p in blocks[:-1:2]:  # every other one freed: holes between live blocks stay resident
        libc.free(p)
    before = rss_anon_bytes()
    trim_heap()
    print(json.dumps({"released": before - rss_anon_bytes()}))
    """
)


@needs_glibc
@pytest.mark.parametrize("user_threshold", [None, "1048576"])
def test_trim_heap_releases_freed_heap_pages_only_when_bounded(user_threshold):
    env = {} if user_threshold is None else {"MALLOC_MMAP_THRESHOLD_": user_threshold}
    drop = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    argv = [sys.executable, "-c", TRIM_CHILD]
    run = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    released = json.loads(run.stdout)["released"]
    if user_threshold is None:
        assert released > 24 * 2**20  # most of the 32 MiB of holes
    else:  # the user's own allocator settings: their heap is left alone
        assert released < 4 * 2**20


HUGE_CHILD = textwrap.dedent(
    """
    import json, os, sys
    if sys.argv[1] == "torch-first":
        import torch
    from starmerge.memory import prefer_huge_pages
    asked = prefer_huge_pages()
    print(json.dumps({"asked": asked, "env": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
    """
)


@pytest.mark.parametrize(
    ("order", "user", "want"),
    [
        ("starmerge-first", None, {"asked": True, "env": "1"}),
        ("starmerge-first", "0", {"asked": False, "env": "0"}),  # the user's choice stays
        ("torch-first", None, {"asked": False, "env": None}),  # too late: torch read it already
    ],
)
def test_prefer_huge_pages_only_before_torch_and_never_over_the_user(order, user, want):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user
    run = subprocess.run(
        [sys.executable, "-c", HUGE_CHILD, order], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == want


def test_the_cli_asks_for_huge_pages_before_torch(monkeypatch):
    """``starmerge.cli.main`` calls it on every run, before a command can import torch."""
    calls = []
    monkeypatch.setattr("starmerge.cli.prefer_huge_pages", lambda: calls.append(1) or True)
    from starmerge.cli import main

    assert main(["--help"]) == 0
    assert calls == [1]


ARENA_CHILD = textwrap.dedent(
    """
    import ctypes, sys, threading
    from starmerge.memory import bounded_allocator

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    if sys.argv[1] == "call":
        bounded_allocator()
    held = []
    worker = threading.Thread(target=lambda: held.append(libc.malloc(256 << 10)))
    worker.start()
    worker.join()
    libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
    """
)


def _arenas(call: bool, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    argv = [sys.executable, "-c", ARENA_CHILD, "call" if call else "no-call"]
    run = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return sum(line.startswith("Arena ") for line in run.stderr.splitlines())


@needs_glibc
def test_one_heap_for_every_thread_once_set():
    """A second thread allocates from its own arena (the control) unless the call set one."""
    assert _arenas(call=False) == 2
    assert _arenas(call=True) == 1


@needs_glibc
def test_user_arena_max_is_kept():
    assert _arenas(call=True, MALLOC_ARENA_MAX="2") == 2
