"""Typed parameter sets: parsing, validation and the registry's error messages."""

from __future__ import annotations

import pytest

from harness.errors import ParameterError, UnknownNameError
from harness.method import METHODS
from harness.params import Params, param
from harness.task import TASKS
from harness.training import TrainRecipe
from methods.bm25 import BM25Params
from methods.gradient import TracInParams
from tasks.facts import FactsConfig


def test_strings_are_parsed_to_the_declared_types():
    params = TracInParams.from_strings({"normalize": "true", "last_checkpoints": "2"})
    assert params.normalize is True and params.last_checkpoints == 2
    assert BM25Params.from_strings({"k1": "2"}).k1 == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k1": "abc"}, r"'k1' must be of type float in \[0.0, 5.0\], but got 'abc'"),
        ({"k1": "9"}, r"'k1' must lie in \[0.0, 5.0\], but got 9.0"),
        ({"k3": "1"}, "unknown parameter 'k3'; valid choices: b, k1. Did you mean 'k1'"),
    ],
)
def test_bad_strings_name_the_value_and_the_valid_choices(overrides, message):
    with pytest.raises((ParameterError, UnknownNameError), match=message):
        BM25Params.from_strings(overrides)


def test_booleans_and_integers_are_not_confused():
    with pytest.raises(ParameterError, match=r"must be a bool \(true or false\)"):
        TracInParams.from_strings({"normalize": "maybe"})
    with pytest.raises(ParameterError, match="must be of type int"):
        TracInParams(last_checkpoints=True)


def test_cross_field_rules_fail_at_construction():
    with pytest.raises(ValueError, match="heads must divide width"):
        TrainRecipe(width=30, heads=4)
    with pytest.raises(ValueError, match="min_statements"):
        FactsConfig(min_statements=4, max_statements=2)


def test_to_dict_round_trips():
    recipe = TrainRecipe(depth=3, learning_rate=1e-3)
    assert TrainRecipe(**recipe.to_dict()) == recipe


def test_learning_rate_schedule():
    recipe = TrainRecipe(
        steps=100, warmup_steps=10, learning_rate=1.0, final_lr_fraction=0.2, checkpoints=4
    )
    assert recipe.learning_rate_at(0) == pytest.approx(0.1)
    assert recipe.learning_rate_at(10) == pytest.approx(1.0)
    assert recipe.learning_rate_at(100) == pytest.approx(0.2)  # cosine reaches the floor
    assert recipe.checkpoint_steps() == [25, 50, 75, 100]


def test_registry_lookup_suggests_the_closest_name():
    with pytest.raises(UnknownNameError) as error:
        METHODS.get("grad_cosine")
    assert "Did you mean 'grad_cos'" in str(error.value)
    assert "bm25" in str(error.value) and "tracin" in str(error.value)
    with pytest.raises(UnknownNameError, match=r"unknown task 'fact'.*Did you mean 'facts'"):
        TASKS.get("fact")


def test_builtins_are_registered():
    assert {"random", "bm25", "grad_dot", "grad_cos", "tracin"} <= set(METHODS.names())
    assert METHODS.get("tracin").family == "gradient"
    assert "facts" in TASKS.names()


def test_non_finite_numbers_and_non_string_overrides_are_refused():
    with pytest.raises(
        ParameterError, match=r"'k1' must be a finite number in \[0.0, 5.0\], but got nan"
    ):
        BM25Params.from_strings({"k1": "nan"})
    with pytest.raises(TypeError, match="from_strings takes strings"):
        TracInParams.from_strings({"last_checkpoints": 3.7})
    with pytest.raises(ParameterError, match="must be of type int"):
        TracInParams(last_checkpoints=3.7)
    assert isinstance(BM25Params(k1=2).k1, float)  # an int for a float field is converted


def test_a_log_scale_parameter_needs_a_positive_lower_bound():
    from harness.params import param

    with pytest.raises(ValueError, match="needs low > 0"):
        param(1e-3, help="damping", low=0.0, high=1.0, log=True)


def test_every_registered_method_declares_a_search_space():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from harness.method import METHODS

    for name in METHODS.names():
        space = METHODS.get(name).Params.search_space()
        for key, distribution in space.items():
            assert isinstance(
                distribution, CategoricalDistribution | FloatDistribution | IntDistribution
            ), (name, key)
    trak = METHODS.get("trak").Params.search_space()
    assert trak["damping"].log and trak["damping"].low > 0  # damping is never 0
    # sweeps draw from a narrower range than the parameter accepts
    assert trak["projection_dim"] == IntDistribution(64, 4096, log=True)
    assert METHODS.get("trak").Params(projection_dim=8192).projection_dim == 8192
    assert "chunk_size" not in trak and "layers" not in trak  # memory knobs are not tuned
    assert METHODS.get("ekfac").Params.search_space()["fisher"].choices == ("sampled", "empirical")


def test_a_search_range_must_lie_inside_the_valid_range():
    with pytest.raises(ValueError, match=r"search range \(0, 10\) must lie within \[1, 5\]"):
        param(2, help="count", low=1, high=5, search=(0, 10))


def test_a_tunable_number_without_bounds_is_a_declaration_error():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Unbounded(Params):
        strength: float = param(1.0, help="no range")

    with pytest.raises(ValueError, match=r"Unbounded.strength is tunable but has no low/high"):
        Unbounded.search_space()
