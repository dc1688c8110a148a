"""Discovery of third-party plugins through package entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from harness import registry
from harness.errors import UnknownNameError
from harness.method import Method, _check_method_class
from harness.registry import Registry


def _registry_with(monkeypatch, *points: EntryPoint) -> Registry:
    monkeypatch.setattr(registry, "entry_points", lambda group: list(points))
    return Registry(
        "method", group="harness.methods", builtin_package="methods", check=_check_method_class
    )


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


def test_a_plugin_that_breaks_the_contract_is_skipped_with_the_reason(monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    misnamed = EntryPoint("doclen", "plugin_example:DocumentLength", "harness.methods")
    not_a_method = EntryPoint("path", "pathlib:Path", "harness.methods")
    methods = _registry_with(monkeypatch, misnamed, not_a_method)
    with caplog.at_level("WARNING"):
        assert methods.names() == []
    assert "DocumentLength.name must equal its registered name 'doclen'" in caplog.text
    assert "a method must subclass harness.method.Method" in caplog.text


def test_redefining_the_same_class_replaces_it_and_another_class_is_refused():
    methods = Registry("method", group="harness.methods", builtin_package="methods")

    def define(qualname: str) -> type:
        return type("Overlap", (), {"__module__": "notebook", "__qualname__": qualname})

    first, rerun = define("Overlap"), define("Overlap")  # the same cell run twice
    methods.add("overlap", first)
    methods.add("overlap", rerun)
    assert methods._classes["overlap"] is rerun
    with pytest.raises(ValueError, match=r"already registered by notebook\.Overlap"):
        methods.add("overlap", define("OtherOverlap"))
