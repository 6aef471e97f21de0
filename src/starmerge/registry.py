"""A small registry of named things (merge methods, eval backends, tasks).

Entries are objects, or ``"module:attr"`` strings imported on first use so that heavy backends
cost nothing until asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from starmerge.errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry mapping with did-you-mean errors.

    Args:
        kind: What the entries are, for error messages ("method", "backend").

    Example:
        >>> reg: Registry[int] = Registry("number")
        >>> reg.add("one", 1); reg.get("one")
        1
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def add(self, name: str, entry: T | str) -> None:
        """Register ``entry`` under ``name``; a duplicate name is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register a method of their own undo it with this)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        """Return the entry for ``name``, importing a lazy ``"module:attr"`` entry.

        Raises:
            UnknownNameError: ``name`` is not registered.
        """
        if name not in self._entries:
            hint = did_you_mean(name, self._entries)
            available = ", ".join(sorted(self._entries))
            raise UnknownNameError(f"Unknown {self.kind} {name!r}.{hint} Available: {available}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
