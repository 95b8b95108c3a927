"""A named table filled by registration: observers, number formats, conversions, architecture families.

One small class so every registry says the same thing when a name is missing or taken:

>>> from lowbit.errors import SchemeError
>>> OBSERVERS = Registry("observer", SchemeError)
>>> @OBSERVERS.register("minmax")
... def minmax(xg, grid, importance=None): ...
>>> OBSERVERS.get("minmax") is minmax, "minmax" in OBSERVERS, OBSERVERS.names()
(True, True, ['minmax'])
>>> OBSERVERS.get("mse")
Traceback (most recent call last):
lowbit.errors.SchemeError: unknown observer 'mse' (known: minmax)

``names()`` is sorted (as every ``*_names()`` and every error lists them); iterating, ``items()`` and
``values()`` follow registration order, for registries where order matters (later conversions win).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lowbit.errors import LowbitError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one ``kind`` by name; a missing or duplicate name raises ``error`` (a LowbitError subclass)."""

    def __init__(self, kind: str, error: type[Exception] = LowbitError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` (refused if the name is taken); returns ``obj``."""
        if name in self._items:
            raise self.error(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REGISTRY.register("name")``."""

        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``, else ``error("unknown <kind> 'name' (known: a, b)")``."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name is unknown too
            raise self.error(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})") from None

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests that register their own); unknown names raise as :meth:`get` does."""
        obj = self.get(name)
        del self._items[name]
        return obj

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs in registration order."""
        return list(self._items.items())

    def values(self) -> list[T]:
        """The registered objects in registration order."""
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
