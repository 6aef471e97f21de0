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
