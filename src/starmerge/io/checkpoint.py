"""A read-only lazy index over the tensors of one checkpoint.

``TensorIndex.open(path)`` reads only the safetensors headers; ``get`` reads one tensor when
asked, with positioned reads into a new buffer (:mod:`starmerge.io.safetensors_reader`), not
through a memory map: the file's pages stay in the page cache and out of the process's resident
memory. The open files are kept, so repeated ``get`` calls are cheap. Layouts:

- a directory with ``model.safetensors.index.json`` and its shards, or ``model.safetensors``;
- a directory with ``pytorch_model.bin.index.json`` and its shards, or ``pytorch_model.bin``;
- a directory holding exactly one ``*.safetensors`` file, or that file itself;
- a single ``.bin``/``.pt``/``.pth`` file or a ``*.index.json`` file.

Pickled ``.bin`` checkpoints are loaded with ``torch.load(weights_only=True, mmap=True)``: the
zip archive is memory-mapped, but its whole pickle is read at open, so prefer safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from starmerge.errors import InputError
from starmerge.io.safetensors_reader import DTYPES, CorruptFile, SafetensorsFile
from starmerge.io.shard_index import check_weight_map, shard_files

_DIR_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_FIX = "re-download or re-save it"
_Meta = tuple[tuple[int, ...], torch.dtype, Path]  # shape, dtype, file


class TensorIndex:
    """Lazy, read-only access to the tensors of a checkpoint (headers only at open).

    Use :meth:`open`; the constructor is internal.

    Example:
        >>> idx = TensorIndex.open("path/to/model")  # doctest: +SKIP
        >>> idx.shape("lm_head.weight")  # doctest: +SKIP
        (128, 32)
    """

    def __init__(
        self,
        path: Path,
        files: list[Path],
        meta: dict[str, _Meta],
        handles: dict[Path, SafetensorsFile],
        loaded: dict[str, Tensor],
    ):
        self.path = path
        self._files = files
        self._meta = meta  # key -> (shape, dtype, file)
        self._handles = handles  # safetensors file -> its open reader
        self._loaded = loaded  # key -> tensor, for pickled checkpoints (read at open)

    @classmethod
    def open(cls, path: Path | str) -> TensorIndex:
        """Index the checkpoint at ``path`` (a directory or a weights file).

        Args:
            path: A local directory or file (see the module docstring for layouts).

        Returns:
            The index; nothing but headers has been read (except for pickled ``.bin`` files).

        Raises:
            InputError: The path holds no weights, a shard is missing, or a file is truncated
                or corrupt.
        """
        path = Path(path)
        files, index = _weight_files(path)
        meta: dict[str, _Meta] = {}
        handles: dict[Path, SafetensorsFile] = {}
        loaded: dict[str, Tensor] = {}
        for file in files:
            if file.suffix == ".safetensors":
                handles[file] = _open_safetensors(file)
                for key, entry in handles[file].entries.items():
                    meta[key] = (entry.shape, _dtype(entry.dtype, key, file), file)
            else:
                for key, tensor in _load_pickle(file).items():
                    meta[key] = (tuple(tensor.shape), tensor.dtype, file)
                    loaded[key] = tensor
        if index is not None:
            check_weight_map(index, meta)
        return cls(path, files, meta, handles, loaded)

    @property
    def files(self) -> list[Path]:
        """The weight files this index reads, in order."""
        return list(self._files)

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._meta)

    def __contains__(self, key: object) -> bool:
        return key in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key`` (from the header)."""
        return self._entry(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of tensor ``key`` (from the header)."""
        return self._entry(key)[1]

    def nbytes(self, key: str) -> int:
        """The stored size of tensor ``key`` in bytes."""
        shape, dtype, _ = self._entry(key)
        numel = 1
        for n in shape:
            numel *= n
        return numel * dtype.itemsize

    def get(self, key: str) -> Tensor:
        """Read tensor ``key`` (one tensor; a CPU tensor in its stored dtype).

        Raises:
            KeyError: ``key`` is not in the checkpoint.
            InputError: The file cannot be read (truncated or corrupt).
        """
        _, _, file = self._entry(key)
        if key in self._loaded:
            return self._loaded[key]
        try:
            return self._handles[file].read(key)
        except (CorruptFile, OSError) as e:
            raise InputError(
                f"cannot read tensor '{key}' from {file}: the file is truncated or corrupt "
                f"({e}); {_FIX}"
            ) from None

    def close(self) -> None:
        """Close the open files and drop the loaded tensors."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._loaded.clear()

    def __enter__(self) -> TensorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorIndex({str(self.path)!r}, {len(self._meta)} tensors)"

    def _entry(self, key: str) -> _Meta:
        try:
            return self._meta[key]
        except KeyError:
            raise KeyError(f"tensor '{key}' is not in the checkpoint {self.path}") from None


def _weight_files(path: Path) -> tuple[list[Path], Path | None]:
    """The weight files of the checkpoint at ``path`` (checked to exist), and its shard index."""
    if path.is_dir():
        for name in _DIR_LAYOUTS:
            if (path / name).is_file():
                return _weight_files(path / name)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found, None
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise InputError(
            f"no model weights in directory {path} (found: {listing}); expected "
            "model.safetensors, model.safetensors.index.json with shards, or pytorch_model.bin"
        )
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; give a directory or a weights file")
    if path.name.endswith(".index.json"):
        return shard_files(path), path
    if path.suffix == ".safetensors" or path.suffix in _PICKLE_SUFFIXES:
        return [path], None
    raise InputError(
        f"cannot read weights file {path} (suffix '{path.suffix}'); give a .safetensors file, "
        "a pytorch .bin file, a *.index.json shard index or a model directory"
    )


def safe_open(file: Path) -> SafetensorsFile:
    """Open a safetensors file for positioned reads: every weight file is opened here.

    Named after the ``safetensors`` function it replaced (a memory map), so that one hook sees
    every open (the path checks' tests assert that nothing outside a model is opened).
    """
    return SafetensorsFile(file)


def _open_safetensors(file: Path) -> SafetensorsFile:
    try:
        return safe_open(file)
    except (CorruptFile, OSError) as e:
        raise InputError(
            f"cannot read {file}: the safetensors file is truncated or corrupt ({e}); {_FIX}"
        ) from None


def _dtype(tag: str, key: str, file: Path) -> torch.dtype:
    if tag not in DTYPES:
        raise InputError(
            f"tensor '{key}' in {file} has dtype {tag}, which starmerge cannot read; re-save the "
            f"checkpoint in one of {', '.join(DTYPES)}"
        )
    return DTYPES[tag]


def _load_pickle(file: Path) -> dict[str, Tensor]:
    """Load a pickled state dict safely (``weights_only``), memory-mapped when possible."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"cannot read {file}: the file is truncated, corrupt or not a plain state dict "
            f"({reason}); {_FIX} (safetensors preferred)"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(
            f"{file} does not hold a flat state dict of tensors (got {type(obj).__name__}); "
            "re-save it with torch.save(model.state_dict()) or as safetensors"
        )
    return obj
