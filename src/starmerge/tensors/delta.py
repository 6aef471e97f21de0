"""Task deltas: ``Dense(delta)`` or ``LowRank(b, a, scale)``.

A task delta is the change a fine-tune made to one parameter. Low rank is a type, not a flag:
a LoRA module gives ``LowRank`` (delta = scale * b @ a) and stays factored until a method asks
for entries; a full fine-tune gives ``Dense``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dense:
    """A dense task delta of any shape.

    Example:
        >>> d = Dense(torch.ones(2, 3))
        >>> d.shape
        (2, 3)
    """

    tensor: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape."""
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype."""
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        """Where the tensor lives."""
        return self.tensor.device

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The delta as a tensor (a view when no cast is needed)."""
        return self.tensor if dtype is None else self.tensor.to(dtype)

    def numel(self) -> int:
        """Number of entries of the parameter."""
        return self.tensor.numel()


@dataclass(frozen=True)
class LowRank:
    """A low-rank matrix delta ``scale * b @ a``.

    Args:
        b: ``(out, r)`` left factor (PEFT's ``lora_B``).
        a: ``(r, in)`` right factor (PEFT's ``lora_A``).
        scale: The LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA).

    Example:
        >>> lr = LowRank(torch.ones(4, 2), torch.ones(2, 3), 0.5)
        >>> lr.to_dense()[0, 0].item()
        1.0
    """

    b: Tensor
    a: Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.b.ndim != 2 or self.a.ndim != 2 or self.b.shape[1] != self.a.shape[0]:
            raise ValueError(
                f"LowRank needs b (out, r) and a (r, in); got b {tuple(self.b.shape)} "
                f"and a {tuple(self.a.shape)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape ``(out, in)``."""
        return (self.b.shape[0], self.a.shape[1])

    @property
    def rank(self) -> int:
        """The factor rank r (an upper bound on the matrix rank)."""
        return self.b.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the factors."""
        return self.b.dtype

    @property
    def device(self) -> torch.device:
        """Where the factors live."""
        return self.b.device

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """``scale * b @ a``, computed in float32 (or ``dtype``) and returned in it."""
        compute = dtype or (self.b.dtype if self.b.dtype == torch.float64 else torch.float32)
        if self.rank == 0:
            return torch.zeros(self.shape, dtype=compute, device=self.b.device)
        return (self.b.to(compute) @ self.a.to(compute)).mul_(self.scale)

    def numel(self) -> int:
        """Number of entries of the (dense) parameter."""
        return self.shape[0] * self.shape[1]


Delta = Dense | LowRank


def densify(delta: Delta, dtype: torch.dtype = torch.float32) -> Dense:
    """Return ``delta`` as ``Dense`` in ``dtype`` (no copy when it already is)."""
    if isinstance(delta, Dense):
        return delta if delta.tensor.dtype == dtype else Dense(delta.tensor.to(dtype))
    return Dense(delta.to_dense(dtype))


def zeros_like_delta(shape: tuple[int, ...], lowrank: bool, dtype: torch.dtype) -> Delta:
    """A zero delta: rank-0 ``LowRank`` for matrices when ``lowrank``, else dense zeros.

    Used for a module that one task's adapter lacks: that task's delta there is zero.
    """
    if lowrank and len(shape) == 2:
        out, inp = shape
        return LowRank(torch.zeros(out, 0, dtype=dtype), torch.zeros(0, inp, dtype=dtype), 1.0)
    return Dense(torch.zeros(shape, dtype=dtype))
