"""Staging directories next to an output: short owned names, stale ones cleaned, no-replace moves.

A merge writes into ``.{stem}.tmp-{host}-{pid}-{random}`` next to ``OUT_DIR`` and renames it into
place at the end; ``--overwrite`` first moves the old output aside to ``.{stem}.old-...``. The
name says which process owns the directory, so a later run can delete what a killed run left
behind: only names of this pattern, for the same ``OUT_DIR``, made on this host by a process that
no longer exists. ``stem`` is the output's name, or a prefix plus a hash of it when the name is
long, so any name the file system accepts still leaves room for the suffix.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import re
import secrets
import shutil
import sys
from pathlib import Path

_MAX_STEM_BYTES = 64  # the suffix adds at most 40 bytes; file names may have 255
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def _stem(out_dir: Path) -> str:
    name = out_dir.name
    if len(name.encode()) <= _MAX_STEM_BYTES:
        return name
    return f"{name[:12]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _host() -> str:
    return hashlib.sha256(platform.node().encode()).hexdigest()[:6]


def staging_dir(out_dir: Path, kind: str) -> Path:
    """A fresh name ``.{stem}.{kind}-{host}-{pid}-{random}`` next to ``out_dir`` (not created).

    Example:
        >>> staging_dir(Path("/x/out"), "tmp").name  # doctest: +SKIP
        '.out.tmp-3f2a1c-4242-9b1e0c7d'
    """
    suffix = f"{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return out_dir.parent / f".{_stem(out_dir)}.{suffix}"


def make_staging_dir(out_dir: Path) -> Path:
    """Create and return a fresh temporary directory next to ``out_dir``."""
    while True:  # mkdir (not mkdtemp) so the directory gets the usual umask permissions
        path = staging_dir(out_dir, "tmp")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def owner_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one owned by another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Delete what killed earlier runs left next to ``out_dir``; return what was deleted.

    Only ``.{stem}.tmp-*`` directories (and ``.old-*`` ones once ``out_dir`` exists again) named
    on this host by a process that no longer runs; anything else is left alone.
    """
    pattern = re.compile(
        rf"\.{re.escape(_stem(out_dir))}\.(tmp|old)-([0-9a-f]{{6}})-(\d+)-[0-9a-f]{{8}}"
    )
    removed = []
    for entry in os.scandir(out_dir.parent):
        m = pattern.fullmatch(entry.name)
        if m is None or m[2] != _host() or owner_alive(int(m[3])):
            continue
        if m[1] == "old" and not os.path.lexists(out_dir):
            continue  # a run killed mid-swap: this is the only copy of the old output
        remove_tree(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def remove_tree(path: Path) -> None:
    """Delete a directory tree, or just the link when ``path`` is a symlink."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Atomic on Linux (``renameat2(RENAME_NOREPLACE)``); elsewhere, or where the file system does
    not support the flag, a check just before ``os.rename``.
    """
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if _linux() else None
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _linux() -> bool:
    return sys.platform.startswith("linux")
