"""The output directory: created all or nothing, checked, guarded; sizes; the base's files.

``atomic_output_dir`` gives the caller a fresh temporary directory next to the output and moves it
into place only when the block succeeds, so on any failure the output directory is left exactly as
it was (DESIGN.md, "Set-up and commands"). Also here: the output checks (``check_output_dir``,
``check_outside_inputs``), ``write_guard`` (write errors as ``OutputError``), ``parse_size``
(``5GB``) and ``copy_model_files`` (config and tokenizer files from the base). The shards
themselves: :mod:`starmerge.io.shards`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from starmerge.errors import InputError, OutputError
from starmerge.io import staging

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
        OutputError: It is a file, a non-empty directory without ``overwrite``, its nearest
            existing parent is not a writable directory, or the system refuses the path itself
            (a name too long, a permission denied on the way).
    """
    try:
        _check_output_dir(Path(out_dir), overwrite)
    except OSError as e:
        raise OutputError(
            f"cannot use {out_dir} as the output directory ({e.strerror}); choose another directory"
        ) from None


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
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


def check_outside_inputs(out_dir: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output directory that is an input, contains one or lies inside one.

    Paths are compared after resolving symlinks, so a link to an input is caught too.

    Args:
        out_dir: The output directory (need not exist).
        inputs: ``(label, path)`` of every input directory and weight file, e.g.
            ``("adapter models[0]", Path("a"))``.

    Raises:
        OutputError: Naming the input and how the output directory overlaps it.

    Example:
        >>> check_outside_inputs(Path("out"), [("adapter models[0]", Path("a"))])
    """
    out = _real(out_dir)
    for label, path in inputs:
        real = _real(path)
        if out == real:
            relation = "is"
        elif out in real.parents:
            relation = "contains"
        elif real in out.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputError(
            f"output directory {out_dir} {relation} the input {label} ({real}); choose an "
            "output directory outside every input"
        )


def _real(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as written
        return Path(path).absolute()


@contextmanager
def atomic_output_dir(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds.

    The temporary directory (see :mod:`starmerge.io.staging`) is created next to ``out_dir``
    (same file system, so the final move is a rename), after deleting what killed earlier runs
    left there. On an exception it is deleted and ``out_dir`` is left as it was; missing parent
    directories created for it are removed too. An ``out_dir`` that another process filled
    while the block ran is never replaced without ``overwrite``.

    Args:
        out_dir: The output directory.
        overwrite: Replace a non-empty ``out_dir`` (its old content is deleted on success).

    Raises:
        OutputError: As :func:`check_output_dir`, before anything is created; or ``out_dir``
            appeared (not empty) while the block ran.

    Example:
        >>> with atomic_output_dir(Path("out"), overwrite=False) as tmp:  # doctest: +SKIP
        ...     (tmp / "model.safetensors").write_bytes(data)
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite=overwrite)
    created = _first_missing(out_dir.parent)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.clean_stale(out_dir)
        tmp = staging.make_staging_dir(out_dir)
    except OSError as e:
        _remove_empty_parents(out_dir.parent, created)
        raise OutputError(
            f"cannot create a directory next to {out_dir} ({e}); choose another directory"
        ) from None
    try:
        yield tmp
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        staging.remove_tree(tmp)
        _remove_empty_parents(out_dir.parent, created)
        raise


def _first_missing(path: Path) -> Path | None:
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_empty_parents(path: Path, created: Path | None) -> None:
    """Remove the parents this run created, up to ``created``, while they are empty."""
    if created is None:
        return
    while True:
        try:
            path.rmdir()
        except OSError:
            return  # not empty (something else wrote there) or already gone
        if path == created:
            return
        path = path.parent


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if overwrite and os.path.lexists(out_dir):
        _swap(tmp, out_dir)
        return
    try:
        _clear_empty(out_dir)
        staging.rename_noreplace(tmp, out_dir)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise OutputError(
                f"output directory {out_dir} appeared while the merge ran and is not empty "
                "(another merge into it?); it was left as it is: pass --overwrite to replace "
                "it or choose another directory"
            ) from None
        raise OutputError(f"cannot move the output into {out_dir} ({e})") from None


def _clear_empty(out_dir: Path) -> None:
    """Remove an empty ``out_dir`` (or a link to an empty directory) so the rename can land."""
    if out_dir.is_symlink():
        if out_dir.is_dir() and not os.listdir(out_dir):
            out_dir.unlink()
    elif out_dir.is_dir():
        out_dir.rmdir()  # ENOTEMPTY when something was written into it meanwhile


def _swap(tmp: Path, out_dir: Path) -> None:
    old = staging.staging_dir(out_dir, "old")
    try:
        os.rename(out_dir, old)
        try:
            staging.rename_noreplace(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
    except OSError as e:
        raise OutputError(f"cannot replace {out_dir} ({e}); choose another directory") from None
    staging.remove_tree(old)


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
