"""What ``starmerge methods`` shows: each registered method's declarations, as data and as text."""

from __future__ import annotations

from typing import Any

from starmerge.methods.base import Method, Param


def _params(params: dict[str, Param]) -> dict[str, dict[str, Any]]:
    return {k: {"default": p.default, "help": p.help} for k, p in params.items()}


def describe(method: Method) -> dict[str, Any]:
    """A method's registry entry as JSON-able data (``starmerge methods --json``).

    Example:
        >>> describe(METHODS.get("star"))["separable"]  # doctest: +SKIP
        'mean'
    """
    data = None
    if method.data is not None:
        request = method.data(method.resolve({}))
        data = {
            "at_defaults": None if request is None else request.describe(),
            "parameters": _params(dict(method.data_params)),
        }
    return {
        "name": method.name,
        "summary": method.summary,
        "paper": method.paper,
        "accepts": sorted(method.accepts),
        "lowrank_output": method.exact_lowrank(method.resolve({})),
        "parameters": _params(dict(method.params)),
        "data_step": data,
        "needs_base": method.needs_base,
        "separable": None if method.separable is None else method.separable.combine,
        "spaces": sorted(method.spaces),
        "n_models": list(method.n_models),
    }


def render(row: dict[str, Any]) -> list[str]:
    """The text lines of one :func:`describe` row."""
    separable = f"{row['separable']} of a per-task transform" if row["separable"] else "no"
    lines = [
        f"{row['name']}: {row['summary']}",
        f"    paper: {row['paper'] or '-'}; inputs: {', '.join(row['accepts'])}; "
        f"exact adapter output: {'yes' if row['lowrank_output'] else 'no (output.rank)'}",
        f"    needs base weights: {'yes' if row['needs_base'] else 'no'}; separable: {separable}; "
        f"spaces: {', '.join(row['spaces'])}; models: {_count(row['n_models'])}",
    ]
    lines += [f"    {k} = {p['default']!r}: {p['help']}" for k, p in row["parameters"].items()]
    data = row["data_step"]
    if data is not None:
        lines.append(f"    data step (at the defaults: {data['at_defaults'] or 'none'}):")
        lines += [
            f"      {k} = {p['default']!r}: {p['help']}" for k, p in data["parameters"].items()
        ]
    return lines


def _count(n_models: list[int | None]) -> str:
    """``1 or more``, ``exactly 2``, ``1 to 2``."""
    least, most = n_models
    if most is None:
        return f"{least} or more"
    return f"exactly {least}" if least == most else f"{least} to {most}"
