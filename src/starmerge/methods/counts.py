"""How many models a method merges: the check behind ``Method.n_models``."""

from __future__ import annotations


def count_problem(method: str, n: int, allowed: tuple[int, int | None]) -> str | None:
    """Why ``method`` cannot merge ``n`` models, given the ``(least, most)`` it takes.

    Example:
        >>> count_problem("slerp", 3, (1, 2))
        'slerp takes 1 or 2 models, got 3; list 1 or 2 models under models:'
    """
    lo, hi = allowed
    if n >= lo and (hi is None or n <= hi):
        return None
    if hi is None:
        want = f"at least {lo} models"
    elif lo == hi:
        want = f"exactly {lo} model{'s' if lo > 1 else ''}"
    else:
        want = f"{lo} or {hi} models" if hi == lo + 1 else f"{lo} to {hi} models"
    return f"{method} takes {want}, got {n}; list {want} under models:"
