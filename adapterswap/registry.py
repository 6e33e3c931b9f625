"""Typed registries of the backbones, adapters and metrics that plugins provide.

A registry maps a name to the class a plugin registered and remembers which plugin did it, so
that a clash names both plugins and an unknown name can suggest the closest known one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from adapterswap.errors import DuplicateNameError, RegistrationError, UnknownNameError

T = TypeVar("T")

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered class and the plugin that registered it."""

    name: str
    cls: type[T]
    plugin: str


class Registry(Generic[T]):
    """Name -> class mapping for one kind of plugin object (``backbone``, ``adapter``, ``metric``).

    :param kind: the word used in messages ("backbone").
    :param base: the abstract base class every registered class must subclass.
    """

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, Entry[T]] = {}

    def register(self, cls: object, plugin: str) -> None:
        """Add ``cls`` under ``cls.name``; refuse wrong types, bad names and duplicates."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistrationError(
                f"Plugin {plugin!r} registered {cls!r} as a {self.kind}, but it is not a "
                f"subclass of {self.base.__module__}.{self.base.__qualname__}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise RegistrationError(
                f"Plugin {plugin!r} registered {self.kind} class {cls.__qualname__} with "
                f"name={name!r}: a name must be lowercase letters, digits, '.', '_' or '-'"
            )
        problems = self.base.class_problems(cls)  # type: ignore[attr-defined]
        if problems:
            raise RegistrationError(
                f"Plugin {plugin!r} registered {self.kind} {name!r} ({cls.__qualname__}) "
                f"incompletely: {'; '.join(problems)}"
            )
        if name in self._entries:
            other = self._entries[name]
            raise DuplicateNameError(
                f"Duplicate {self.kind} name {name!r}: registered by plugin {other.plugin!r} "
                f"({other.cls.__module__}.{other.cls.__qualname__}) and by plugin {plugin!r} "
                f"({cls.__module__}.{cls.__qualname__})"
            )
        self._entries[name] = Entry(name, cls, plugin)

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; :class:`UnknownNameError` with suggestions if none."""
        return self.entry(name).cls

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` for ``name`` (class and plugin)."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """Registered entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
