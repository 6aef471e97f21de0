"""Errors that reach the user.

Every error a user can cause is a subclass of :class:`StarmergeError`. The CLI prints its
message as one line beginning ``error:`` and exits with code 2; anything else is a bug and
keeps its traceback. Messages say what was wrong, what was received, and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class StarmergeError(Exception):
    """Base class of every user-facing error (bad input, bad config, bad data)."""


class ConfigError(StarmergeError):
    """One or more problems in a merge config; lists every problem at once.

    Args:
        problems: One message per problem, each saying what, what was received and the fix.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            joined = "; ".join(self.problems)
            super().__init__(f"{len(self.problems)} problems in the config: {joined}")


class InputError(StarmergeError):
    """A model, adapter or checkpoint that cannot be used as given."""


class UnsupportedFeatureError(InputError):
    """An adapter uses a feature that starmerge does not implement (refused, never dropped)."""


class UnknownNameError(StarmergeError, KeyError):
    """A name (method, task, suite, backend) that is not in its registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OutputError(StarmergeError):
    """The output directory cannot be written as asked."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean: x?"`` for the closest choice, or an empty string.

    Example:
        >>> did_you_mean("tie", ["ties", "star"])
        ' Did you mean: ties?'
    """
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean: {close[0]}?" if close else ""


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about user-given values.

    A config value may be huge (a YAML alias bomb expands to millions of nodes), so a message
    never formats it whole: containers are summarized before ``repr`` is attempted.

    Example:
        >>> short_repr(list(range(1000)), limit=20)
        '[0, … (list of 1000)'
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        head = list(value)[:limit] if not isinstance(value, dict) else list(value.items())[:limit]
        text = repr(type(value)(head) if not isinstance(value, dict) else dict(head))
    else:
        text = repr(value) if not isinstance(value, (list, tuple, dict, set)) else _bounded(value)
    if len(text) <= limit:
        return text
    size = f" ({type(value).__name__} of {len(value)})" if hasattr(value, "__len__") else ""
    return text[: limit - 1 - len(size)] + "…" + size


def _bounded(value: object, budget: int = 2000) -> str:
    """``repr`` of a nested container that stops once ``budget`` characters are produced."""
    out: list[str] = []
    total = 0

    def walk(v: object, depth: int) -> None:
        nonlocal total
        if total > budget or depth > 20:
            out.append("…")
            total += 1
            return
        if isinstance(v, dict):
            out.append("{")
            for i, (k, x) in enumerate(v.items()):
                if total > budget:
                    break
                out.append(f"{', ' if i else ''}{k!r}: ")
                walk(x, depth + 1)
            out.append("}")
        elif isinstance(v, (list, tuple, set)):
            out.append("[")
            for i, x in enumerate(v):
                if total > budget:
                    break
                out.append(", " if i else "")
                walk(x, depth + 1)
            out.append("]")
        else:
            text = repr(v)[: budget + 1]
            out.append(text)
            total += len(text)
        total += 2

    walk(value, 0)
    return "".join(out)
