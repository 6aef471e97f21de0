"""Checkpoint I/O: the only package that reads or writes model files.

Nothing here imports ``transformers`` or ``peft``; ``huggingface_hub`` is imported only when a
Hub id has to be downloaded.
"""

from starmerge.io.adapter import LoraAdapter, load_adapter
from starmerge.io.adapter_writer import write_adapter
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.full import FullFineTune
from starmerge.io.hashing import hash_files, sha256_file
from starmerge.io.hub import resolve
from starmerge.io.output_dir import (
    atomic_output_dir,
    check_output_dir,
    copy_model_files,
    parse_size,
)

__all__ = [
    "FullFineTune",
    "LoraAdapter",
    "TensorIndex",
    "atomic_output_dir",
    "check_output_dir",
    "copy_model_files",
    "hash_files",
    "load_adapter",
    "parse_size",
    "resolve",
    "sha256_file",
    "write_adapter",
]
