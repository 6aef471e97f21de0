"""One run's merge-space bases, computed in the first pass over a parameter and reused after.

In ``core`` or ``knots`` space every pass over a parameter (each of a fit step's passes, then
the merge) needs its basis: two Gram products of the stacked factors and their eigenvectors,
O((m + n) R^2) for ``R = sum_t r_t``. :class:`SpaceCache` keeps each parameter's
:class:`~starmerge.tensors.spaces.SpaceBasis` from the first pass, so the later ones only
compute coordinates from it. It keeps a basis only when it holds nothing but R x R float64
matrices (the stacked factors well conditioned, the usual case): 4 R^2 x 8 bytes per parameter
in ``core`` space, 2 R^2 x 8 in ``knots`` (Mistral-7B's 96 attention modules with 12 rank-16
adapters: 113 MB and 57 MB). A basis is reused for the same key's deltas from the same reader
(checked: shape, ranks and scales), so reuse gives the very coordinates a recomputation would.

``fit_state`` returns its state wrapped with its cache (:class:`SpaceState`, still a ``State``);
``merge_params`` takes each parameter's basis out of it as it merges it, so the cache is empty
once the merge is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from starmerge.methods.contract import State
from starmerge.space_form import coordinates, to_space
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.spaces import Projection, SpaceBasis
from starmerge.tensors.threads import one_thread


@dataclass
class SpaceCache:
    """Per parameter key, the basis of ``space`` computed by an earlier pass.

    Args:
        space: ``core`` or ``knots``.
    """

    space: str
    bases: dict[str, SpaceBasis] = field(default_factory=dict)
    buffers: list[Tensor] = field(default_factory=list)  # every pass's dense coordinates

    def inputs(
        self,
        key: str,
        read: Callable[[], Sequence[Delta | None]],
        *,
        keep: bool,
        factored: bool = False,
    ) -> tuple[Projection, list[Delta | None]]:
        """``key``'s projection (from the stored basis when it fits) and every coordinate.

        A later fit pass over a stored core basis reads no delta: the cores come from the
        basis alone (``SpaceBasis.needs_factors``).

        Args:
            key: The parameter.
            read: Its task deltas (None: the task lacks it), read only when needed.
            keep: Store a computed basis for a later pass (the fit); False hands a stored one
                over and forgets it (the merge, the last pass, which reads the deltas to lift).
                Either way the coordinates are in :attr:`buffers`, which the next parameter's
                overwrite: the merge passes its result through :meth:`release`.
            factored: In ``knots`` space and the merge (``keep`` False), the coordinates as
                their exact factors (``SpaceBasis.factored_coordinates``), for a method that
                takes ``LowRank`` deltas; else ``Dense``.

        Returns:
            The projection, and per task its coordinates (None: lacks ``key``).

        Raises:
            InputError: A task gives a dense delta or a non-matrix parameter.
        """
        held = self.bases.pop(key, None) if not keep else self.bases.get(key)
        with one_thread():  # factor work: one thread (tensors/threads.py)
            if keep and held is not None and not held.needs_factors:
                projection = Projection(held, None)
                return projection, coordinates(projection, self._buffers(projection.basis))
            deltas = read()
            fits = held is not None and held.fits(deltas)  # type: ignore[arg-type]
            projection = to_space(key, deltas, self.space, held if fits else None)
            if keep and not fits and projection.basis.reusable:
                self.bases[key] = projection.basis
            if factored and not keep and self.space == "knots":
                return projection, projection.basis.factored_coordinates(deltas)  # type: ignore[arg-type]
            return projection, coordinates(projection, self._buffers(projection.basis))

    def release(self, delta: Delta) -> Delta:
        """``delta`` with every tensor that is one of :attr:`buffers` copied out.

        A method may return one of its inputs (a single task's coordinates, say) and a lift
        may keep it as a factor; the next parameter's coordinates would overwrite it.
        """
        held = {b.untyped_storage().data_ptr() for b in self.buffers}

        def own(t: Tensor) -> Tensor:
            return t.clone() if t.untyped_storage().data_ptr() in held else t

        if isinstance(delta, LowRank):
            return LowRank(own(delta.b), own(delta.a), delta.scale)
        return Dense(own(delta.tensor)) if isinstance(delta, Dense) else delta

    def _buffers(self, basis: SpaceBasis) -> list[Tensor]:
        """One coordinate buffer per task, reused from the previous parameter when they fit.

        A fit pass computes every parameter's coordinates only for the fitter to reduce them
        (``Fitter.observe`` keeps statistics, not deltas), the merge pass for the method, whose
        result :meth:`release` separates from them; fresh buffers of 1 MiB or more are fresh
        mappings the kernel zeroes (KnOTS: 12 blocks of 3 MB per parameter and pass, 0.4 ms
        each).
        """
        shape, dtype = basis.core_shape, basis.data
        n = len(basis.tasks)
        fits = len(self.buffers) == n and all(
            b.shape == shape and b.dtype == dtype and b.device == basis.coef.device
            for b in self.buffers
        )
        if not fits:
            self.buffers.clear()  # the old ones go before the new ones exist
            device = basis.coef.device
            self.buffers.extend(torch.empty(shape, dtype=dtype, device=device) for _ in range(n))
        return list(self.buffers)


@dataclass(frozen=True)
class SpaceState:
    """A fitted ``State`` and the bases its passes computed, for the merge pass.

    Args:
        state: The fitter's state.
        cache: The bases (emptied by the merge as it goes).
    """

    state: State
    cache: SpaceCache

    def at(self, key: str) -> Any:
        """The fitted state's part for ``key``."""
        return self.state.at(key)

    def summary(self) -> dict[str, Any]:
        """The fitted state's summary (the bases are not statistics)."""
        return self.state.summary()


def space_cache(state: Any, space: str) -> SpaceCache | None:
    """The bases a :class:`SpaceState` carries for ``space``, a new cache, or None (``full``)."""
    if isinstance(state, SpaceState) and state.cache.space == space:
        return state.cache
    return None if space == "full" else SpaceCache(space)
