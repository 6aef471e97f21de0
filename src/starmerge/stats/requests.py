"""What data a method needs, given its parameters (None: nothing; the merge is data-free)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataRequest:
    """Statistics to collect per task, and/or Localize-and-Stitch masks to train.

    Args:
        kinds: Statistic kinds (``fisher``, ``gram_in``, ``gram_out``).
        fisher: ``empirical`` or ``true`` labels for the gradient statistics.
        masks: Mask-training settings (``sparsity``, ``steps``, ``lr``, ``l1``,
            ``regularizer``, ``sigmoid_bias``, ``parameter_set``), or None.
    """

    kinds: tuple[str, ...] = ()
    fisher: str = "empirical"
    masks: Mapping[str, Any] | None = field(default=None)


def data_request(method: str, params: Mapping[str, Any]) -> DataRequest | None:
    """The data ``method`` needs with ``params``; None when it needs none.

    Example:
        >>> data_request("mats", {"objective": "average"}) is None
        True
    """
    if method == "mats":
        from starmerge.methods.mats import OBJECTIVE_KINDS

        kinds = OBJECTIVE_KINDS[params.get("objective", "regmean")]
        return DataRequest(kinds, params.get("fisher", "empirical")) if kinds else None
    if method == "fisher_merging":
        return DataRequest(("fisher",), params.get("fisher", "empirical"))
    if method == "regmean":
        return DataRequest(("gram_in",))
    if method == "localize_stitch" and params.get("mode") == "trained":
        from starmerge.methods.localize_stitch import resolve_sparsity

        names = ("steps", "lr", "l1", "regularizer", "sigmoid_bias", "parameter_set")
        masks = {k: params[k] for k in names if k in params}
        masks["sparsity"] = resolve_sparsity("trained", params.get("sparsity"))
        return DataRequest(masks=masks)
    return None
