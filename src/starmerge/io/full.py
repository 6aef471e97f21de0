"""The task vector of a full fine-tuned checkpoint: ``Dense(fine_tuned - base)``, read lazily."""

from __future__ import annotations

from pathlib import Path

import torch

from starmerge.errors import InputError
from starmerge.io.checkpoint import TensorIndex
from starmerge.tensors.delta import Dense
from starmerge.tensors.finite import all_finite


class FullFineTune:
    """The task vector ``ft - base`` of every floating-point parameter of a fine-tune.

    Keys are the names stored in the fine-tuned checkpoint (tied weights keep the name they
    were saved under). Integer and boolean buffers are not task-vector entries and are left out.
    The keys and shapes are checked against the base once, here (headers only).

    Args:
        base: Index of the base checkpoint.
        ft: Index of the fine-tuned checkpoint.
        name: The task's name, for messages.

    Raises:
        InputError: A fine-tuned parameter is missing from the base, or their shapes differ.

    Example:
        >>> base, ft = TensorIndex.open("base"), TensorIndex.open("ft")  # doctest: +SKIP
        >>> task = FullFineTune(base, ft, "news")  # doctest: +SKIP
        >>> task.get("lm_head.weight").shape  # doctest: +SKIP
        (128, 32)
    """

    def __init__(self, base: TensorIndex, ft: TensorIndex, name: str):
        self.base = base
        self.ft = ft
        self.name = name
        self._shapes = self._check()

    @property
    def files(self) -> list[Path]:
        """The fine-tuned checkpoint's weight files."""
        return self.ft.files

    def keys(self) -> list[str]:
        """The floating-point parameter keys, in the fine-tuned checkpoint's order."""
        return list(self._shapes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter key -> shape, for every floating-point parameter."""
        return dict(self._shapes)

    def get(self, key: str) -> Dense:
        """Read parameter ``key`` from both checkpoints and return their difference in float32.

        Raises:
            KeyError: ``key`` is not a floating-point parameter of the fine-tune.
            InputError: Either tensor holds NaN or Inf.
        """
        if key not in self._shapes:
            raise KeyError(f"'{key}' is not a floating-point parameter of model {self.name}")
        ft = _finite(self.ft.get(key), f"model {self.name} ({self.ft.path})", key)
        base = _finite(self.base.get(key), f"base model {self.base.path}", key)
        return Dense(ft.to(torch.float32) - base.to(torch.float32))

    def __repr__(self) -> str:
        return f"FullFineTune({self.name!r}, {len(self._shapes)} parameters)"

    def _check(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for key in self.ft.keys():
            if not self.ft.dtype(key).is_floating_point:
                continue
            if key not in self.base:
                raise InputError(
                    f"model {self.name} ({self.ft.path}) has parameter '{key}', which the base "
                    f"model ({self.base.path}) lacks; give the base model it was fine-tuned from"
                )
            ft_shape, base_shape = self.ft.shape(key), self.base.shape(key)
            if ft_shape != base_shape:
                raise InputError(
                    f"model {self.name}: parameter '{key}' has shape {ft_shape} but {base_shape} "
                    "in the base model; give the base model it was fine-tuned from (a resized "
                    "vocabulary is not supported)"
                )
            shapes[key] = ft_shape
        return shapes


def _finite(tensor: torch.Tensor, what: str, key: str) -> torch.Tensor:
    """``tensor``, checked finite (one reduction); ``what`` names its checkpoint in the error."""
    if not all_finite(tensor):
        raise InputError(
            f"{what}: tensor '{key}' contains NaN or Inf values; give a checkpoint with finite "
            "weights (re-export or re-train it)"
        )
    return tensor
