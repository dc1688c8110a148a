"""The task plugin contract.

A task turns (scale, seed) into :class:`~harness.data.TaskData`: training
documents, queries with their ground truth, held-out text, and a recipe for the
reference model. Subclasses register by name::

    class FactsTask(Task, name="facts"): ...
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from pathlib import Path
from typing import Any, ClassVar

from harness.data import TaskData
from harness.errors import UnknownNameError
from harness.params import Params
from harness.registry import Registry
from harness.training import TrainRecipe


def _check_task_class(name: str, cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"a task must subclass harness.task.Task, but got {cls!r}")
    if getattr(cls, "name", None) != name:
        raise TypeError(f"{cls.__qualname__}.name must equal its registered name {name!r}")


TASKS: Registry[Task] = Registry(
    "task", group="harness.tasks", builtin_package="tasks", check=_check_task_class
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """A named preset: the task's own settings and the model recipe to train on it."""

    config: Params
    recipe: TrainRecipe
    help: str


class Task(abc.ABC):
    """Builds the data of one kind of attribution problem at a chosen scale."""

    name: ClassVar[str]
    description: ClassVar[str]
    primary_metric: ClassVar[str] = "mrr"
    scales: ClassVar[dict[str, Scale]]
    default_scale: ClassVar[str] = "small"

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            TASKS.add(name, cls)

    @classmethod
    def scale(cls, name: str) -> Scale:
        try:
            return cls.scales[name]
        except KeyError:
            raise UnknownNameError(
                "scale", name, cls.scales, where=f"for task {cls.name!r}"
            ) from None

    @classmethod
    def source_files(cls) -> list[Path]:
        """Files whose content determines the built data (hashed into cache keys).

        By default every Python file beside the task's module (its helpers) and the
        engine's data and tokenizer modules; a task that reads data files adds them.
        """
        engine = Path(__file__).parent
        package = Path(inspect.getfile(cls)).parent
        return [*sorted(package.glob("*.py")), engine / "data.py", engine / "tokenizer.py"]

    @abc.abstractmethod
    def build(self, config: Params, *, seed: int) -> TaskData:
        """Return the task's documents, queries and ground truth; deterministic in ``seed``."""
