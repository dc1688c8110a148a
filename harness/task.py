"""The task plugin contract.

A task turns (scale, seed) into :class:`~harness.data.TaskData`: training
documents, queries with their ground truth, held-out text, and a recipe for the
reference model. Subclasses register by name::

    class FactsTask(Task, name="facts"): ...

A scale is a named preset of the task's settings and model recipe; a task
object may carry ``KEY=VALUE`` overrides of either (``model.KEY`` for the
recipe), which make a variant of the task (``harness run --task-param``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.cache import code_fingerprint, content_key
from harness.data import TaskData
from harness.errors import ParameterError, UnknownNameError
from harness.params import Params
from harness.pretrained import fingerprint as pretrained_fingerprint
from harness.registry import Registry
from harness.training import TrainRecipe

if TYPE_CHECKING:  # the bundle module imports this one
    from harness.bundle import Bundle


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


RECIPE_PREFIX = "model."  # an override of the model recipe rather than of the task


def path_fingerprint(path: str) -> str:
    """A hash of a file's or folder's contents alone: moved or renamed, it is the same.

    Recomputed only when the file changes: a run asks for it many times (its variant,
    cache keys and logs), and a corpus can be large.
    """
    if not Path(path).exists():
        raise ParameterError(f"{path!r}: no such file or folder")
    if Path(path).is_dir():
        return pretrained_fingerprint(path)
    stat = Path(path).stat()
    return _file_fingerprint(str(Path(path).resolve()), (stat.st_size, stat.st_mtime_ns))


@functools.cache
def _file_fingerprint(path: str, stamp: tuple[int, int]) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def recipe_identity(recipe: TrainRecipe) -> dict[str, Any]:
    """The recipe as it determines a model: a pretrained model by its contents, not its path."""
    values = recipe.to_dict()
    if values["pretrained"]:
        values["pretrained"] = path_fingerprint(values["pretrained"])
    return values


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

    # settings that name a file or folder: identified, and shown, by their contents
    path_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self.overrides = dict(overrides or {})

    def variant(self, scale: str) -> str:
        """The overrides that differ from the scale's preset, as ``key=value,...``.

        Keys in name order, values as parsed (``paraphrase=True`` whether typed true,
        1 or yes); empty for the preset itself.
        """
        preset, settings = self.scale(scale), self.settings(scale)
        changed = []
        for key in sorted(self.overrides):
            if key.startswith(RECIPE_PREFIX):
                name = key.removeprefix(RECIPE_PREFIX)
                value, default = getattr(settings.recipe, name), getattr(preset.recipe, name)
            else:
                value, default = getattr(settings.config, key), getattr(preset.config, key)
            if value != default:
                changed.append(f"{key}={self._shown(key, value)}")
        return ",".join(changed)

    def _shown(self, key: str, value: Any) -> str:
        """A path setting by its contents (``corpus=1a2b3c4d``): not where it is, nor its name."""
        is_path = key in self.path_settings or key == f"{RECIPE_PREFIX}pretrained"
        if is_path and value:
            return path_fingerprint(value)[:8]
        return str(value)

    def config_identity(self, config: Params) -> dict[str, Any]:
        """The settings as they determine the data: path settings by their contents."""
        values = config.to_dict()
        for key in self.path_settings:
            if values.get(key):
                values[key] = path_fingerprint(values[key])
        return values

    def setup_key(self, scale: str) -> str:
        """A hash of the settings and recipe, path settings by their contents.

        Over the values as runs log them (``model.KEY`` and ``task.KEY``), so that a
        task without path settings keeps the key of runs logged before this one existed.
        """
        settings = self.settings(scale)
        recipe = recipe_identity(settings.recipe)
        values = {f"{RECIPE_PREFIX}{k}": str(v) for k, v in recipe.items()}
        values |= {f"task.{k}": str(v) for k, v in self.config_identity(settings.config).items()}
        return content_key(values)

    def label(self, scale: str) -> str:
        """The name with its variant, as runs and logs show it: ``facts[paraphrase=True]``."""
        variant = self.variant(scale)
        return f"{self.name}[{variant}]" if variant else self.name

    def inputs_fingerprint(self, scale: str) -> str:
        """A hash of the user files and pretrained model these settings read; empty if none."""
        settings = self.settings(scale)
        parts = []
        files = self.input_files(settings.config)
        if files:
            parts.append(code_fingerprint(files))
        if settings.recipe.pretrained:
            parts.append(pretrained_fingerprint(settings.recipe.pretrained))
        return "-".join(parts)

    def settings(self, scale: str) -> Scale:
        """The scale's preset with this task's overrides applied and validated."""
        preset = self.scale(scale)
        recipe_keys = {
            key.removeprefix(RECIPE_PREFIX): value
            for key, value in self.overrides.items()
            if key.startswith(RECIPE_PREFIX)
        }
        config_keys = {k: v for k, v in self.overrides.items() if not k.startswith(RECIPE_PREFIX)}
        config = preset.config.with_strings(config_keys)
        recipe = self.recipe(config, preset.recipe.with_strings(recipe_keys))
        return Scale(config, recipe, preset.help)

    def recipe(self, config: Params, recipe: TrainRecipe) -> TrainRecipe:
        """The model recipe for these settings; by default the scale's own."""
        return recipe

    def model_metrics(self, bundle: Bundle) -> dict[str, float]:
        """Figures about what the trained model learned, logged with every run.

        A task defines its own (task ``canaries``: the share memorised at each
        repetition count); by default there are none.
        """
        return {}

    def input_files(self, config: Params) -> list[Path]:
        """Files these settings read (a user's corpus): their content keys the cached data."""
        return []

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
