"""Named extension points (docs/design.md, "Extension points"): search spaces, searched
methods and token-pruning baselines each live in one registry, and adding one is one new
file that registers itself.

    from dop.search.spaces import SPACES

    @SPACES.register("toy")
    class ToySpace(Space): ...

A registry tied to a package imports every module of that package the first time it is
read, so the package's own entries (one file each) need no list anywhere; an entry defined
elsewhere (a plugin, a test) registers when its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, in registration order (the package's modules in file-name order first).

    ``what`` names an entry in messages ("search space"); ``error`` is the exception an
    unknown name raises; ``package`` (a dotted name) is imported module by module on first
    read so that its entries register themselves."""

    def __init__(self, what: str, *, error: type[Exception] = ValueError, package: str | None = None):
        self.what, self.error, self.package = what, error, package
        self._entries: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """``@REG.register("name")`` above a class or function, or ``REG.register("name", obj)``.
        A name registered twice with another entry is an error (a module imported twice under
        two names would otherwise shadow one entry with its copy)."""
        def add(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise ValueError(f"{self.what} {name!r} is registered twice ({_qualname(old)}, {_qualname(obj)})")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry for a while)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise self.error(f"unknown {self.what} {name!r}; known: {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before importing: a module of the package may read the registry
        # importing by name is this module's job (docs/design.md, "Imports")
        pkg = importlib.import_module(self.package)  # heavy: the package, on the registry's first read
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")  # heavy: an entry's file (may load torch)


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
