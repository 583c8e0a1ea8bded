"""One registry pattern for everything chosen by name: generators, targeting policies, curricula.

Adding one is one file plus one registration: ``GENERATORS.register(name, loader)``
(:mod:`hardneg.generators`), ``register_policy(name, factory, options=...)``
(:mod:`hardneg.targeting`), ``CURRICULA.register(name, factory)`` (:mod:`hardneg.curriculum`).
:class:`hardneg.config.HardNegConfig` checks every name against its registry when it is built,
so an unknown name fails at config time, with the known names in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

__all__ = ["Registry", "RegistryEntry"]

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    """A registered name: its factory and, when it has settings of its own, their options dataclass."""

    name: str
    factory: Callable[..., T]
    options: Optional[type] = None


class Registry(Generic[T]):
    """Names -> factories, in registration order.

    Args:
        kind: what is registered ("generator", "targeting policy", "curriculum"), for messages.
        autoload: called once when a name is missing (e.g. importing the modules that register
            more names on import, like :mod:`hardneg.methods`).
    """

    def __init__(self, kind: str, autoload: Optional[Callable[[], None]] = None) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry[T]] = {}
        self._autoload = autoload

    def register(self, name: str, factory: Callable[..., T], options: Optional[type] = None) -> Callable[..., T]:
        """Register ``factory`` under ``name`` (a repeat replaces it); returns the factory."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        self._entries[name] = RegistryEntry(name, factory, options)
        return factory

    def _load(self) -> None:
        if self._autoload is not None:
            load, self._autoload = self._autoload, None
            load()

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self)

    def entries(self) -> list[RegistryEntry[T]]:
        self._load()
        return list(self._entries.values())

    def get(self, name: str) -> RegistryEntry[T]:
        """The entry of ``name``; ``ValueError`` naming the known ones when it is not registered."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}")
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """``factory(*args, **kwargs)`` of ``name``."""
        return self.get(name).factory(*args, **kwargs)
