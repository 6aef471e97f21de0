"""Writing model outputs: an all-or-nothing output directory and a streaming shard writer.

``atomic_output_dir`` gives the caller a fresh temporary directory next to the output and moves it
into place only when the block succeeds, so on any failure the output directory is left exactly as
it was (DESIGN.md, "Set-up and commands"). Shards: ``stream_writer.StreamingShardWriter``.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from starmerge.errors import InputError, OutputError

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """Parse a size such as ``"5GB"`` (10**9 bytes) or ``"500MiB"`` (2**20 bytes) into bytes.

    Raises:
        InputError: Not a positive number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB.

    Example:
        >>> parse_size("5GB"), parse_size("1KiB")
        (5000000000, 1024)
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = (m[2] or "B").upper() if m else ""
    if m is None or unit not in _UNITS or float(m[1]) <= 0:
        raise InputError(
            f"size must be a positive number with a unit (B, KB, MB, GB, KiB, MiB, GiB), "
            f"got {size!r}; write e.g. 5GB"
        )
    return int(float(m[1]) * _UNITS[unit])


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Check that ``out_dir`` can be written as asked, without touching anything.

    Raises:
        OutputError: It is a file, a non-empty directory without ``overwrite``, or its nearest
            existing parent is not a writable directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} is a file; choose a directory")
    if out_dir.is_dir():
        entries = len(os.listdir(out_dir))
        if entries and not overwrite:
            raise OutputError(
                f"output directory {out_dir} is not empty ({entries} entries); "
                "pass --overwrite or choose another directory"
            )
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot create output directory {out_dir}: {parent} is not a writable directory; "
            "choose another directory"
        )


@contextmanager
def atomic_output_dir(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds.

    The temporary directory ``.{name}.tmp-<random>`` is created next to ``out_dir`` (same file
    system, so the final move is a rename). On an exception it is deleted and ``out_dir`` is
    left as it was; missing parent directories created for it are removed too.

    Args:
        out_dir: The output directory.
        overwrite: Replace a non-empty ``out_dir`` (its old content is deleted on success).

    Raises:
        OutputError: As :func:`check_output_dir`, before anything is created.

    Example:
        >>> with atomic_output_dir(Path("out"), overwrite=False) as tmp:  # doctest: +SKIP
        ...     (tmp / "model.safetensors").write_bytes(data)
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite=overwrite)
    created = _first_missing(out_dir.parent)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    except OSError as e:
        _remove(created)
        raise OutputError(
            f"cannot create a directory next to {out_dir} ({e}); choose another directory"
        ) from None
    try:
        yield tmp
        _move_into_place(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        _remove(created)
        raise


def _first_missing(path: Path) -> Path | None:
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _fresh_dir(parent: Path, prefix: str) -> Path:
    while True:  # mkdir (not mkdtemp) so the directory gets the usual umask permissions
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _remove(path: Path | None) -> None:
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def write_guard(file: Path) -> Iterator[None]:
    """Turn write failures of ``file`` into ``OutputError``, removing a partial file."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        file.unlink(missing_ok=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or any(
            s in str(e) for s in ("No space left", "StorageFull", "code: 28")
        )
        if full:
            raise OutputError(
                f"disk full while writing {file.name} to {file.parent}; free space or choose "
                "another output directory"
            ) from None
        raise OutputError(f"cannot write {file} ({e}); choose another output directory") from None


def copy_model_files(base_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the base model's config and tokenizer files (those present) into ``out_dir``.

    Returns:
        The files written, in :data:`MODEL_FILES` order.

    Raises:
        OutputError: The disk is full or a file cannot be written.
    """
    written = []
    for name in MODEL_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            dst = Path(out_dir) / name
            with write_guard(dst):
                shutil.copyfile(src, dst)
            written.append(dst)
    return written
