"""Turn a config's ``path-or-hub-id`` into a local directory.

A path that exists is used (a relative one starts at the config file's directory, see
``docs/paths.md``). A string shaped like a Hugging Face Hub id (``org/name``) is
downloaded with ``huggingface_hub.snapshot_download`` (imported only then, so a merge of local
inputs never touches the network or needs ``huggingface_hub``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from starmerge.errors import InputError, short_repr

#: What ``resolve`` downloads of a Hub id: a PEFT adapter, or a model (weights, configs, tokenizer).
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin"]

# Hub repo ids: "org/name", letters, digits, "-", "_", "."; no leading "." or "-", no "..".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub repo id ``org/name``.

    Example:
        >>> looks_like_hub_id("meta-llama/Llama-3.2-3B"), looks_like_hub_id("./adapters/a")
        (True, False)
    """
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith(".")


def local_path(path_or_id: str, base_dir: Path | None = None) -> Path | None:
    """The absolute local path that ``path_or_id`` names, or None when nothing is there.

    A relative path starts at ``base_dir`` (the config file's directory) when given, else at
    the working directory; ``~`` is expanded.

    Example:
        >>> local_path("adapters/a", Path("/work/configs"))  # doctest: +SKIP
        PosixPath('/work/configs/adapters/a')
    """
    path = Path(path_or_id).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    try:
        if not path.exists():
            return None
    except OSError as exc:  # ENAMETOOLONG and kin: Path.exists() raises them
        raise InputError(
            f"cannot use the path {short_repr(path_or_id)}: {exc.strerror}; give a shorter path"
        ) from None
    path = path.absolute()
    norm = Path(os.path.normpath(path))  # drop "..": only where symlinks do not change its target
    return norm if norm.exists() and os.path.samefile(norm, path) else path


def resolve(
    path_or_id: str,
    *,
    what: str,
    allow_patterns: list[str] | None = None,
    base_dir: Path | None = None,
) -> Path:
    """Return a local directory (or file) for ``path_or_id``, downloading a Hub id if needed.

    Args:
        path_or_id: A local path, or a Hub repo id ``org/name``.
        what: What the input is, for messages (e.g. ``"adapter"``, ``"base_model"``).
        allow_patterns: Glob patterns of the files to download (all files when ``None``).
        base_dir: Where a relative path starts (the config file's directory); the working
            directory when ``None``.

    Returns:
        The absolute local path (for a Hub id: the snapshot directory in the Hugging Face
        cache).

    Raises:
        InputError: The path does not exist and is not a Hub id, or the download failed.

    Example:
        >>> resolve("/tmp", what="adapter")
        PosixPath('/tmp')
    """
    path = local_path(path_or_id, base_dir)
    if path is not None:
        return path
    if not looks_like_hub_id(path_or_id):
        raise InputError(
            f"{what} '{path_or_id}' does not exist{_looked_in(path_or_id, base_dir)} and is "
            "not a Hugging Face Hub id (org/name); give an existing local path or a Hub id"
        )
    return _download(path_or_id, what=what, allow_patterns=allow_patterns)


def _looked_in(path_or_id: str, base_dir: Path | None) -> str:
    if base_dir is None or Path(path_or_id).expanduser().is_absolute():
        return ""
    return (
        f" (looked in {Path(base_dir).absolute()}: relative paths start at the config file's "
        "directory)"
    )


def _download(repo_id: str, *, what: str, allow_patterns: list[str] | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"{what} '{repo_id}' is not a local path and huggingface_hub is not installed; "
            "give a local directory or `pip install 'starmerge[hf]'`"
        ) from None
    try:
        local = snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns)
    except Exception as e:  # offline, not found, gated, HTTP errors: all user-facing here
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise InputError(
            f"{what} '{repo_id}' is not a local path and could not be downloaded from the "
            f"Hugging Face Hub ({reason}); give a local directory or check the id and your network"
        ) from None
    return Path(local)
