"""Helpers for the integration tests: configs, CLI calls and independent references."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import yaml

from starmerge.cli import main


def write_config(path: Path, **cfg) -> Path:
    """Write a merge config (keyword arguments are the YAML keys)."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``starmerge ARGV`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what fixtures printed before the command
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def peft_dense_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Task vector of an adapter computed by PEFT itself: merge_and_unload() minus base."""
    import transformers as tf
    from peft import PeftModel

    config = tf.AutoConfig.from_pretrained(base_dir)
    cls = tf.T5ForConditionalGeneration if config.model_type == "t5" else tf.AutoModelForCausalLM
    base = cls.from_pretrained(base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    after = merged.state_dict()
    return {
        k: (after[k].double() - before[k].double())
        for k in before
        if k in after and not torch.equal(after[k], before[k])
    }


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved HF model directory (single file or shards)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def star_dense(delta: torch.Tensor, eta: float) -> torch.Tensor:
    """STAR on one dense matrix in float64, written independently of the library."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if s.sum() == 0:
        return torch.zeros_like(delta, dtype=torch.float64)
    tol = max(delta.shape) * torch.finfo(torch.float32).eps * s[0]
    rank = int((s > tol).sum())
    target = eta / 100 * s.sum()
    k = 1
    while k < rank and s[:k].sum() < target:
        k += 1
    scaled = s[:k] * s.sum() / s[:k].sum()
    return u[:, :k] @ torch.diag(scaled) @ vh[:k]


def tree_hash(path: Path) -> str:
    """Hash of a file or directory tree: relative paths, link targets and bytes.

    ``path`` itself is resolved (a symlinked input is hashed through its link). Inside the
    tree a symlink is hashed by its target string, plus the bytes of the file it points to;
    a symlinked directory is not descended into, so a cycle or a link out of the tree cannot
    make the hash loop. A missing path hashes to ``"absent"``.
    """
    root = Path(path).resolve()
    if not root.exists():
        return "absent"
    digest = hashlib.sha256()
    entries = sorted(root.rglob("*")) if root.is_dir() else [root]
    for entry in entries:
        rel = entry.relative_to(root).as_posix() if entry != root else "."
        if entry.is_symlink():
            digest.update(f"L {rel} -> {os.readlink(entry)}\0".encode())
        elif entry.is_dir():
            digest.update(f"D {rel}\0".encode())
            continue
        if entry.is_file():
            digest.update(f"F {rel} {entry.stat().st_size}\0".encode())
            digest.update(entry.read_bytes())
    return digest.hexdigest()


def assert_one_error(code: int, err: str, *needles: str) -> str:
    """The refusal contract on one CLI run: exit 2, one ``error:`` line with ``needles``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return lines[0]


def refused(capsys, argv, watched, *needles: str) -> str:
    """Run ``starmerge ARGV``; assert one error line and every watched path unchanged."""
    before = {str(p): tree_hash(p) for p in watched}
    code, _, err = run_cli(capsys, *argv)
    line = assert_one_error(code, err, *needles)
    assert {str(p): tree_hash(p) for p in watched} == before
    return line
