"""One parameter's task deltas in a merge space: the checks, and the coordinates a method sees.

``full`` hands a method the deltas as they are. ``core`` and ``knots`` (see
:mod:`starmerge.tensors.spaces`) need a LoRA delta (or nothing) from every task for the
parameter, and a method that runs there (``Method.spaces``); :func:`space_problem` says why
not, in the words ``starmerge validate``, the merge and ``merge_deltas`` all use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from starmerge.errors import ConfigError, InputError, did_you_mean, short_repr
from starmerge.methods.base import Method
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.spaces import SPACES, Projection, SpaceBasis, space_basis


def space_problem(method: Method, space: Any) -> str | None:
    """Why ``method`` cannot merge in ``space`` (an unknown space included), or None.

    Example:
        >>> space_problem(METHODS.get("ties"), "core") is None  # doctest: +SKIP
        True
    """
    if space not in SPACES:
        return (
            f"space must be one of {', '.join(SPACES)}, got {short_repr(space)}."
            f"{did_you_mean(str(space), SPACES)}"
        )
    if space in method.spaces:
        return None
    if method.needs_base:
        why = "it works on the base model's weights, not on coordinates"
    elif method.data is not None:
        why = "its data step gathers statistics or masks of the full parameters"
    elif method.artifacts:
        why = "its artifacts are shaped like the full parameters"
    else:
        why = f"it declares spaces: {', '.join(sorted(method.spaces))}"
    return f"{method.name} does not run in space {space} ({why}); use space: full"


def check_space(method: Method, space: Any) -> None:
    """Raise :func:`space_problem`'s message, if any.

    Raises:
        ConfigError: An unknown space, or one the method does not run in.
    """
    problem = space_problem(method, space)
    if problem:
        raise ConfigError([problem])


def to_space(
    key: str, deltas: Sequence[Delta | None], space: str, basis: SpaceBasis | None = None
) -> Projection:
    """Project one parameter's task deltas (None: the task lacks it) into ``space``.

    ``basis``: one computed before for these deltas (:meth:`SpaceBasis.fits`), else computed now.

    Raises:
        InputError: A task gives a dense delta (a full fine-tune) or a non-matrix parameter.
    """
    for t, d in enumerate(deltas):
        if d is not None and not isinstance(d, LowRank):
            what = "a dense delta (a full fine-tune)" if len(d.shape) == 2 else "not a matrix"
            raise InputError(
                f"space: {space} merges LoRA deltas in a shared low-rank basis, but task {t}'s "
                f"'{key}' (shape {d.shape}) is {what}; use space: full"
            )
    if basis is None:
        basis = space_basis(deltas, space)  # type: ignore[arg-type]
    return Projection(basis, tuple(deltas))  # type: ignore[arg-type]


def coordinates(projection: Projection, out: list[Tensor] | None = None) -> list[Dense | None]:
    """Each task's coordinates as a ``Dense`` delta; None kept for a task without the parameter.

    ``out``: buffers to compute them into (:meth:`SpaceBasis.coordinates`); else new tensors.

    Example:
        >>> x = LowRank(torch.ones(3, 1), torch.ones(1, 2))
        >>> coordinates(to_space("w", [x, None], "core"))[1] is None  # doctest: +SKIP
        True
    """
    coords = (
        projection.coords if out is None else projection.basis.coordinates(projection.deltas, out)
    )
    pairs = zip(projection.basis.tasks, coords, strict=True)
    return [None if t is None else Dense(c) for t, c in pairs]
