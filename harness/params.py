"""Typed, validated parameter sets for methods and tasks.

A parameter set is a frozen dataclass whose fields are declared with
:func:`param`: a default, help text, and the valid range or choices, which also
make the field's Optuna search space. Values are checked when the object is
built, so an impossible setting fails before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, get_type_hints

from harness.errors import ParameterError, UnknownNameError


def param(
    default: Any,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    choices: Sequence[Any] | None = None,
    log: bool = False,
    tune: bool = True,
    memory_only: bool = False,
    search: tuple[float, float] | None = None,
) -> Any:
    """Declare one parameter; ``low``/``high`` are inclusive bounds.

    ``search`` narrows the range a sweep draws from, where the valid range holds
    values that are legal but not worth a trial's time (a 65,536-dimensional
    projection, sixteen retrained models).

    ``log`` asks for a log-uniform search space, which needs ``low > 0``.
    ``tune=False`` keeps it out of the search space; ``memory_only=True`` says it
    changes nothing but memory use and speed (a chunk size), so runs that differ
    only in it are the same configuration (implies ``tune=False``).
    """
    if log and (low is None or low <= 0):
        raise ValueError(f"a log-scale parameter needs low > 0, but got low={low!r}")
    if search is not None and not (
        low is not None and high is not None and low <= search[0] <= search[1] <= high
    ):
        raise ValueError(f"search range {search!r} must lie within [{low}, {high}]")
    metadata = {
        "help": help,
        "low": low,
        "high": high,
        "choices": choices,
        "log": log,
        "tune": tune and not memory_only,
        "memory_only": memory_only,
        "search": search,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Params:
    """Base class of every parameter set; subclasses add fields with :func:`param`."""

    kind: ClassVar[str] = "parameter"

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _checked_value(field, hints[field.name], getattr(self, field.name))
            object.__setattr__(self, field.name, value)  # an int given for a float becomes one

    @classmethod
    def from_strings(cls, overrides: Mapping[str, str]) -> Params:
        """Build from ``KEY=VALUE`` strings as typed on a command line."""
        return cls(**cls._parse_strings(overrides))

    def with_strings(self, overrides: Mapping[str, str]) -> Params:
        """A copy with ``KEY=VALUE`` strings applied, validated like a new set."""
        if not overrides:
            return self
        return dataclasses.replace(self, **self._parse_strings(overrides))

    @classmethod
    def _parse_strings(cls, overrides: Mapping[str, str]) -> dict[str, Any]:
        hints = get_type_hints(cls)
        fields = {field.name: field for field in dataclasses.fields(cls)}
        values = {}
        for key, text in overrides.items():
            if key not in fields:
                raise UnknownNameError(cls.kind, key, fields)
            if not isinstance(text, str):
                raise TypeError(f"from_strings takes strings, but {key!r} is {text!r}; "
                                f"pass typed values to {cls.__name__}(...) instead")  # fmt: skip
            values[key] = _parse(key, text, hints[key], fields[key].metadata)
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        """Optuna distributions of the tunable parameters (``tune=True``), by name.

        Booleans and choices become categorical; numbers their ``[low, high]``
        range, log-uniform where declared. A tunable number without both bounds
        is a declaration error, reported here rather than in a sweep.
        """
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        hints = get_type_hints(cls)
        space: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            meta, annotation = field.metadata, hints[field.name]
            if not meta.get("tune", True):
                continue
            if annotation is bool:
                space[field.name] = CategoricalDistribution([False, True])
            elif meta.get("choices") is not None:
                space[field.name] = CategoricalDistribution(list(meta["choices"]))
            elif annotation in (int, float):
                if meta.get("low") is None or meta.get("high") is None:
                    raise ValueError(
                        f"{cls.__name__}.{field.name} is tunable but has no low/high bounds; "
                        "give both or declare it tune=False"
                    )
                distribution = IntDistribution if annotation is int else FloatDistribution
                low, high = meta.get("search") or (meta["low"], meta["high"])
                space[field.name] = distribution(low, high, log=meta["log"])
            else:
                raise ValueError(
                    f"{cls.__name__}.{field.name} ({_type_name(annotation)}) is tunable but "
                    "has no choices; give choices or declare it tune=False"
                )
        return space

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per parameter: name, type, default, help and valid values."""
        hints = get_type_hints(cls)
        return [
            {
                "name": field.name,
                "type": _type_name(hints[field.name]),
                "default": field.default,
                **field.metadata,
            }
            for field in dataclasses.fields(cls)
        ]


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _parse(key: str, text: str, annotation: Any, meta: Mapping[str, Any]) -> Any:
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError
            return lowered in {"true", "1", "yes"}
        return annotation(text)
    except (TypeError, ValueError):
        raise ParameterError(
            f"parameter {key!r} must be {_describe_valid(annotation, meta)}, but got {text!r}"
        ) from None


def _range_text(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return ""
    return f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"


def _describe_valid(annotation: Any, meta: Mapping[str, Any]) -> str:
    if annotation is bool:
        return "a bool (true or false)"
    text = f"of type {_type_name(annotation)}"
    if meta.get("choices") is not None:
        return f"{text}, one of {list(meta['choices'])}"
    return text + _range_text(meta)


def _checked_value(field: dataclasses.Field, annotation: Any, value: Any) -> Any:
    name, meta = field.name, field.metadata
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is float and is_number:
        value = float(value)
        if not math.isfinite(value):
            raise ParameterError(
                f"parameter {name!r} must be a finite number{_range_text(meta)}, but got {value!r}"
            )
    elif not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ParameterError(
            f"parameter {name!r} must be of type {_type_name(annotation)}, "
            f"but got {value!r} ({type(value).__name__})"
        )
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ParameterError(
            f"parameter {name!r} must be one of {list(choices)}, but got {value!r}"
        )
    low, high = meta.get("low"), meta.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ParameterError(f"parameter {name!r} must lie in {bounds}, but got {value!r}")
    return value
