"""Discovery of third-party plugins through package entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from harness import registry
from harness.errors import UnknownNameError
from harness.method import Method
from harness.registry import Registry


def _registry_with(monkeypatch, *points: EntryPoint) -> Registry:
    monkeypatch.setattr(registry, "entry_points", lambda group: list(points))
    return Registry("method", group="harness.methods", builtin_package="methods")


def test_a_method_declared_by_entry_point_is_found(monkeypatch):
    point = EntryPoint("document_length", "plugin_example:DocumentLength", "harness.methods")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    methods = _registry_with(monkeypatch, point)
    found = methods.get("document_length")
    assert issubclass(found, Method) and found.__name__ == "DocumentLength"
    assert "document_length" in methods.names()


def test_a_broken_plugin_is_reported_and_the_others_still_load(monkeypatch, caplog):
    broken = EntryPoint("broken", "no_such_module_anywhere:Thing", "harness.methods")
    methods = _registry_with(monkeypatch, broken)
    with caplog.at_level("WARNING"):
        names = methods.names()
    assert "could not load method plugin 'broken'" in caplog.text
    with pytest.raises(UnknownNameError):
        methods.get("broken")
    assert names == []  # this registry holds only what its entry points declared


def test_the_installed_distribution_declares_the_builtins():
    from importlib.metadata import entry_points

    declared = {point.name for point in entry_points(group="harness.methods")}
    assert {"random", "bm25", "grad_dot", "grad_cos", "tracin"} <= declared
    assert "facts" in {point.name for point in entry_points(group="harness.tasks")}
