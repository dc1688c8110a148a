"""Exceptions the harness raises for bad input, each a subclass of the nearest built-in."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """Base class of every error the harness raises on purpose."""


class UnknownNameError(HarnessError, KeyError):
    """A method, task, scale or parameter name that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], *, where: str = "") -> None:
        self.kind, self.name, self.valid, self.where = kind, name, sorted(valid), where
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" {self.where}" if self.where else ""
        message = (
            f"unknown {self.kind} {self.name!r}{where}; valid choices: {', '.join(self.valid)}"
        )
        close = difflib.get_close_matches(self.name, self.valid, n=1, cutoff=0.5)
        return message + (f". Did you mean {close[0]!r}?" if close else ".")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self._message()


class ParameterError(HarnessError, ValueError):
    """A parameter value of the wrong type or outside its valid range."""


class InputFileError(ParameterError):
    """A user's data file the task cannot use; the message names the file, line and field."""


class ScoresNotFiniteError(HarnessError, ArithmeticError):
    """A method produced NaN or infinite scores; its run is failed, never ranked."""
