"""The method plugin contract.

A method is a registered class with a name, a family, a typed parameter set
and two steps, called in this order by the runner:

1. ``fit(bundle)`` once: build whatever the method needs from the training side
   (an index, train-side features, its own model). Optional.
2. ``score(bundle, queries)`` any number of times with the same bundle: return
   a float array of shape ``(len(queries), len(bundle.data.documents))`` where
   ``scores[q, i]`` is larger when training document ``i`` pushes query ``q``'s
   target towards being generated (a proponent). Columns follow
   ``bundle.data.documents``; a method whose natural sign is the opposite flips
   it itself. Scores must be finite; the runner fails a run that is not.

What a method reads (see :class:`harness.bundle.Bundle`): ``bundle.data.documents``
(each with ``id``, ``text``, ``source``) and ``bundle.documents``, the same
documents encoded as the model trained on them; ``bundle.model(i)``, a fresh copy
of checkpoint ``i`` (``-1`` the final model) and ``bundle.checkpoints[i]``'s
``step`` and ``learning_rate``; ``bundle.encode_queries(queries)``; and
``bundle.tokenizer``. A method that trains a model of its own says so with
``trains_own_model = True`` and reports that model's held-out loss through
:meth:`Method.own_heldout_loss`; one built from shards it can drop exactly
implements :class:`harness.unlearning.RemovableShards` and is put through the
unlearning check. A method that learns from retrained models keeps the
:class:`harness.retrain.SubsetPool` it used as ``self.pool``, so that the runner
can refuse to evaluate it against the same retrains.
``queries`` are :class:`harness.data.Query` objects
(``prompt``, ``target``, ``relevant``): the runner passes only those whose target
the model learned. ``self.params`` holds the validated parameters and
``self.seed`` the run's seed, for any randomness.

A gradient method builds on the shared machinery rather than its own:
:func:`harness.features.train_features` gives a checkpoint's featurizer and its
documents' (stored or streamed) gradient features, :func:`harness.features.feature_products`
their products with query features, and :mod:`harness.curvature` damped inverses
and K-FAC/EK-FAC factors.

Subclasses register by keyword when their module is imported::

    class BM25(Method, name="bm25", family="retrieval"):
        Params = BM25Params
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch

from harness.bundle import Bundle
from harness.data import Query, TaskData
from harness.params import Params
from harness.registry import Registry
from harness.task import Task

FAMILIES = ("baseline", "gradient", "datamodel", "retrieval", "experts")


def _check_method_class(name: str, cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a method must subclass harness.method.Method, but got {cls!r}")
    if getattr(cls, "name", None) != name:
        raise TypeError(
            f"{cls.__qualname__}.name must equal its registered name {name!r}, "
            f"but is {getattr(cls, 'name', None)!r}"
        )
    if getattr(cls, "family", None) not in FAMILIES:
        raise TypeError(
            f"{cls.__qualname__}.family must be one of {FAMILIES}, "
            f"but is {getattr(cls, 'family', None)!r}"
        )


METHODS: Registry[Method] = Registry(
    "method", group="harness.methods", builtin_package="methods", check=_check_method_class
)


@dataclasses.dataclass(frozen=True)
class NoParams(Params):
    """A method without parameters."""


class Method(abc.ABC):
    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = NoParams
    trains_own_model: ClassVar[bool] = False  # its own model's held-out loss is then reported
    # set by fit when trains_own_model: seconds its model took to train, cached or not
    own_train_seconds: float | None = None

    def __init_subclass__(
        cls, *, name: str | None = None, family: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if family not in FAMILIES:
            raise ValueError(
                f"family of method {name!r} must be one of {FAMILIES}, but got {family!r}"
            )
        cls.name, cls.family = name, family
        METHODS.add(name, cls)

    def __init__(self, params: Params | None = None, *, seed: int = 0) -> None:
        params = self.Params() if params is None else params
        if not isinstance(params, self.Params):
            raise TypeError(
                f"{self.name} takes {self.Params.__name__}, got {type(params).__name__}"
            )
        self.params = params
        self.seed = seed

    def check_model(self, model: torch.nn.Module, *, checkpoints: int) -> None:
        """Refuse, before any training, parameters the model's structure rules out.

        ``model`` has the task's architecture but untrained weights and a dummy
        vocabulary, and training will keep ``checkpoints`` checkpoints; raise
        :class:`harness.errors.ParameterError` to refuse. By default the parameter
        set's own ``check_model``, where it has one, decides.
        """
        check = getattr(self.params, "check_model", None)
        if check is not None:
            check(model, checkpoints=checkpoints)

    @classmethod
    def applies_to(cls, task: type[Task]) -> str | None:
        """Why the method cannot run on tasks of this kind, or ``None`` when it can.

        ``harness list`` shows the answer for every method and task; ``--method all``
        leaves out the methods that do not apply, and naming one is refused with the
        reason. By default a method applies to every task.
        """
        return None

    def check_task(self, data: TaskData) -> None:  # noqa: B027 (optional check)
        """Refuse, before any training, parameters the task's data rules out.

        Called with the task's documents and queries once they are built;
        raise :class:`harness.errors.ParameterError` to refuse.
        """

    def own_heldout_loss(self, bundle: Bundle) -> float:
        """The held-out loss of the model a method trains itself (``trains_own_model``).

        Mean token cross-entropy on ``bundle.data.heldout_texts``, comparable with
        ``bundle.heldout_loss``; called after ``fit``.
        """
        raise NotImplementedError(f"{self.name} does not train a model of its own")

    def fit(self, bundle: Bundle) -> None:  # noqa: B027 (optional step)
        """Prepare the training side; the default needs nothing."""

    @abc.abstractmethod
    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        """Scores of shape (len(queries), n_documents); larger means more responsible."""
