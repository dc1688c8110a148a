"""Name-to-class registries for the extension points: methods and tasks.

Classes register themselves when defined (``class BM25(Method, name="bm25")``),
so adding a plugin edits no list. Plugins from other distributions are found
through the entry-point groups ``harness.methods`` and ``harness.tasks``; the
built-ins are declared there too.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.errors import UnknownNameError

_logger = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of classes of one kind, filled by definition and by entry points."""

    def __init__(
        self,
        kind: str,
        *,
        group: str,
        builtin_package: str,
        check: Callable[[str, type], None] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self.builtin_package = builtin_package
        self._check = check  # raises TypeError for a class that breaks the plugin contract
        self._classes: dict[str, type[T]] = {}
        self._discovered = False

    def add(self, name: str, cls: type[T]) -> None:
        if self._check is not None:
            self._check(name, cls)
        existing = self._classes.get(name)
        if existing is not None and _same_definition(existing, cls):
            existing = None  # the same class defined again (a re-run notebook cell): replace it
        if existing is not None and existing is not cls:
            raise ValueError(
                f"{self.kind} name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        self._classes[name] = cls

    def get(self, name: str) -> type[T]:
        self._discover()
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._classes) from None

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._classes)

    def __iter__(self) -> Iterator[type[T]]:
        return iter(self.get(name) for name in self.names())

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        # the built-ins import even from a source tree that was never installed
        importlib.import_module(self.builtin_package)
        for entry_point in entry_points(group=self.group):
            try:
                loaded = entry_point.load()  # a class that registers itself is now known
            except Exception as error:  # a broken plugin must not hide the others
                _logger.warning(
                    "could not load %s plugin %r: %s", self.kind, entry_point.name, error
                )
                continue
            if loaded in self._classes.values():
                continue
            try:  # a class that does not register itself is known by its entry-point name
                self.add(entry_point.name, loaded)
            except (TypeError, ValueError) as error:
                _logger.warning("skipping %s plugin %r: %s", self.kind, entry_point.name, error)


def _same_definition(first: type, second: type) -> bool:
    return (first.__module__, first.__qualname__) == (second.__module__, second.__qualname__)
