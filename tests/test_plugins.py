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


def test_a_method_that_does_not_apply_to_a_task_is_left_out_and_says_why(monkeypatch):
    import numpy as np
    from click.testing import CliRunner

    from harness.cli import main
    from harness.errors import ParameterError
    from harness.method import METHODS
    from harness.runner import parse_method_names, plan_runs

    class NeedsOwners(Method):
        name, family = "needs_owners", "baseline"

        @classmethod
        def applies_to(cls, task):
            return None if task.name == "owners" else "it ranks owners, and the task has none"

        def score(self, bundle, queries):
            return np.zeros((len(queries), len(bundle.data.documents)))

    METHODS.names()  # discover the built-ins first, then add this one for this test only
    monkeypatch.setitem(METHODS._classes, "needs_owners", NeedsOwners)
    assert "needs_owners" in parse_method_names("all", task="owners")
    assert "needs_owners" not in parse_method_names("all", task="facts")
    assert set(parse_method_names("all", task="facts")) == set(METHODS.names()) - {"needs_owners"}
    with pytest.raises(ParameterError, match="does not apply to task 'facts': it ranks owners"):
        plan_runs(["needs_owners"], "facts", scale="tiny", seed=0, overrides={})

    listing = CliRunner().invoke(main, ["list"])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Where each method" in line)
    header = lines[start + 1]
    row = next(line for line in lines[start:] if line.strip().startswith("needs_"))
    columns = header.split()
    cells = row.split()[1:]
    # each column names one task; "no (1)" takes two words
    marks = " ".join(cells).replace("no (", "no(").split()
    assert dict(zip(columns, marks, strict=True)) == {
        t: ("yes" if t == "owners" else "no(1)") for t in columns
    }
    assert "(1) it ranks owners, and the task has none" in listing.output
