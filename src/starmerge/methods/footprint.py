"""A method's declared memory: what its kernel and fit step allocate for one parameter.

A method's registry entry may declare ``memory(case) -> Footprint`` (``Method.memory``): the bytes
its kernel allocates at its peak (the result included) and the bytes its fit step allocates
while it observes the parameter, both *beyond* the task deltas it is handed. The engine's model
(:mod:`starmerge.peak_model`) adds the inputs, what reading and writing cost, and takes the
maximum over parameters; ``starmerge validate`` prints the result and the manifest records it
next to the measured peak. Without a declaration a method is taken to hold two float32 copies of
the parameter (its result and one temporary): the former "(T + 2) x the largest tensor" bound.

Formulas are in bytes, written with the helpers of :class:`MemoryCase`: ``copies(x)`` (x float32
copies of the parameter), ``square(side)`` (a Gram matrix), ``factors(x)`` (the T tasks' LoRA
factors side by side) and ``svd()`` (LAPACK's thin SVD of the matrix with its workspace). Each
declaration sits next to its kernel, with one line naming the buffers it counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

F32 = 4  # bytes per float32 entry
F64 = 8


@dataclass(frozen=True)
class MemoryCase:
    """One parameter's merge as the memory model sees it.

    Args:
        n_tasks: Number of tasks T.
        shape: The parameter's shape (what the kernel sees: a core's ``(p, q)`` in a merge
            space).
        rank: Total rank R = sum_t r_t of the tasks' LoRA factors when the kernel gets them as
            ``LowRank``; 0 when it gets dense deltas.
        params: The method's resolved parameters.

    Example:
        >>> MemoryCase(4, (1024, 1024)).copies(2) / 2**20
        8.0
    """

    n_tasks: int
    shape: tuple[int, ...]
    rank: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Entries of the parameter."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def lowrank(self) -> bool:
        """The kernel gets ``LowRank`` deltas (factors), not dense ones."""
        return self.rank > 0

    @property
    def matrix(self) -> bool:
        """The parameter is a 2-D matrix (spectral kernels average everything else)."""
        return len(self.shape) == 2

    @property
    def dims(self) -> tuple[int, int]:
        """``(m, n)`` of a matrix; ``(numel, 1)`` otherwise."""
        return (self.shape[0], self.shape[1]) if self.matrix else (self.numel, 1)

    def copies(self, count: float) -> float:
        """``count`` float32 copies of the parameter, in bytes."""
        return count * self.numel * F32

    def square(self, side: int, count: float = 1.0, itemsize: int = F32) -> float:
        """``count`` square ``(side, side)`` matrices (Gram matrices), in bytes."""
        return count * side * side * itemsize

    def factors(self, count: float = 1.0, itemsize: int = F32) -> float:
        """``count`` copies of the T tasks' factors side by side, ``(m + n) x R``, in bytes."""
        m, n = self.dims
        return count * (m + n) * self.rank * itemsize

    def svd(self, itemsize: int = F32, batch: int = 1) -> float:
        """LAPACK's thin SVD (``gesdd``) of ``batch`` matrices shaped like the parameter, in bytes.

        Per matrix its input copy, U (m x k), S and V^T (k x n), k = min(m, n); one workspace of
        3 k^2 entries, 4 k^2 on LAPACK's QR-first path for tall matrices (m >= 11 n / 6).
        """
        m, n = self.dims
        k = min(m, n)
        work = (4 if 6 * m >= 11 * n else 3) * k * k
        return itemsize * (batch * (m * n + m * k + k + k * n) + work)


@dataclass(frozen=True)
class Footprint:
    """Bytes a method allocates for one parameter, beyond the task deltas it is given.

    Args:
        kernel: At the kernel's peak, its result included.
        fit: At the fit step's peak while it observes the parameter (0 without a fit step).
    """

    kernel: float
    fit: float = 0.0


MemoryModel = Callable[[MemoryCase], Footprint]


def default_footprint(case: MemoryCase) -> Footprint:
    """Two float32 copies (the result and one temporary): the model of an undeclared method."""
    return Footprint(kernel=case.copies(2), fit=case.copies(1))


def summed(case: MemoryCase) -> Footprint:
    """A weighted sum: the float32 total and one task's scaled copy; LoRA: the factors joined."""
    return Footprint(case.factors(1) if case.lowrank else case.copies(2))
