"""Optuna sweeps over a method's declared search space, tracked in MLflow, held out honestly.

A sweep splits the task's queries once, by seed, into a tuning and a held-out
half (:mod:`harness.splits`). Every trial scores the tuning queries; the
study's best configuration, and the method's default one beside it, are then
evaluated once on the held-out queries. Those two runs are what the
leaderboard reports; the trials never reach it.

Tracking: the study is one parent MLflow run, each trial a nested run holding
its parameters, metrics and state; the study records the parent's run id and
the parent the study's name and storage.

Resuming: the same command on the same storage continues the study and runs
only the trials still missing to reach ``--trials``. The study records what
it searches (method, task, scale, seed, objective, fixed parameters and the
search space); a command that would change any of it is refused unless it
names a new study. A trial that raises, or whose objective is NaN, is recorded
FAILED with its reason and never chosen as best. Trials left RUNNING by a
killed sweep are marked FAILED when it resumes.

Storage: ``sqlite:///<results>/optuna.db`` by default. Parallel workers
(``--jobs N``, one process each) write through Optuna's journal file storage,
which Optuna recommends for several processes on one machine (SQLite would
fail them with "database is locked"); ``journal:///path`` selects it, and a
database server URL (``postgresql://...``) serves workers on many machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from harness.errors import HarnessError, ParameterError, UnknownNameError
from harness.evaluation import Evaluation
from harness.executor import ProcessExecutor
from harness.method import METHODS, Method
from harness.runner import Runner, RunOutcome, RunPlan, plan_runs
from harness.splits import select_queries
from harness.task import TASKS
from harness.tracking import ROLE_TAG, ActiveRun

_logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "nsga2")
COST = "cost"  # fit plus score seconds, minimised
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class SweepConflictError(HarnessError, ValueError):
    """The command would change what an existing study searches."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep, or one of its worker processes, needs: plain, picklable data."""

    method: str
    task: str
    scale: str
    seed: int
    trials: int
    objectives: tuple[str, ...]
    sampler: str
    timeout: float | None
    storage: str
    study_name: str
    jobs: int
    fixed: dict[str, str]
    results_dir: Path
    tracking_uri: str | None
    heldout_seeds: tuple[int, ...]
    evaluation: Evaluation
    task_params: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        return ["minimize" if o == COST else "maximize" for o in self.objectives]

    def signature(self) -> dict:
        """What the study searches; a resumed study must match it."""
        method = METHODS.get(self.method)
        space = {
            name: distribution_json(d) for name, d in search_space(method, self.fixed).items()
        }
        return {
            "method": self.method,
            "task": self.task,
            "scale": self.scale,
            "seed": self.seed,
            "objectives": list(self.objectives),
            "fixed": dict(sorted(self.fixed.items())),
            "space": space,
            # the settings as parsed, those equal to the preset left out
            "variant": TASKS.get(self.task)(self.task_params).variant(self.scale),
        }


def distribution_json(distribution) -> str:
    return optuna.distributions.distribution_to_json(distribution)


def search_space(method: type[Method], fixed: Mapping[str, str]) -> dict:
    """The method's tunable parameters, less those the command fixes."""
    return {k: v for k, v in method.Params.search_space().items() if k not in fixed}


def parse_objectives(text: str | None, task: str) -> tuple[str, ...]:
    """``None``: the task's primary metric; ``fidelity,cost``: that and cost; else names."""
    from harness.leaderboard import FIDELITY  # the metrics a leaderboard ranks

    primary = TASKS.get(task).primary_metric
    if text is None:
        return (primary,)
    names = [n.strip() for n in text.split(",") if n.strip()]
    names = [primary if n == "fidelity" else n for n in names]
    valid = [*FIDELITY, COST, "fidelity"]
    for name in names:
        if name not in valid:
            raise UnknownNameError("objective", name, valid)
    if not names or len(set(names)) != len(names) or len(names) > 2:
        raise ParameterError(f"--objective takes one or two distinct metrics, but got {text!r}")
    return tuple(names)


def default_study_name(method: str, task: str, scale: str, seed: int, variant: str = "") -> str:
    task = f"{task}[{variant}]" if variant else task
    return f"{method}-{task}-{scale}-seed{seed}"


def open_storage(url: str):
    """An Optuna storage from a URL: ``journal:///file`` or a database URL."""
    if url.startswith("journal://"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def check_spec(spec: SweepSpec) -> None:
    """Refuse, before any work, what cannot run."""
    method = METHODS.get(spec.method)
    plan_runs(
        [spec.method],
        spec.task,
        scale=spec.scale,
        seed=spec.seed,
        overrides=spec.fixed,
        task_params=spec.task_params,
    )
    if not search_space(method, spec.fixed):
        raise ParameterError(
            f"method {spec.method!r} has nothing to tune"
            + (" once the fixed parameters are set" if spec.fixed else "")
        )
    if spec.trials < 1:
        raise ParameterError(f"--trials must be at least 1, but got {spec.trials}")
    if spec.jobs < 1:
        raise ParameterError(f"--jobs must be at least 1, but got {spec.jobs}")
    if spec.timeout is not None and spec.timeout <= 0:
        raise ParameterError(f"--timeout must be positive, but got {spec.timeout}")
    if spec.sampler not in SAMPLERS:
        raise UnknownNameError("sampler", spec.sampler, SAMPLERS)
    if spec.jobs > 1 and spec.storage.startswith("sqlite:"):
        raise ParameterError(
            f"--jobs {spec.jobs} cannot share the SQLite storage {spec.storage!r} (its writers "
            "lock each other out); leave --storage unset for the journal file storage, or pass "
            "journal:///PATH or a database server URL"
        )
    if not spec.storage.startswith(("journal://", "sqlite:///", "postgresql", "mysql")):
        raise ParameterError(
            f"--storage {spec.storage!r} is not a storage URL; use sqlite:///PATH, "
            "journal:///PATH or a database server URL (postgresql://..., mysql://...)"
        )
    spec.evaluation.check()


def _sampler(spec: SweepSpec, *, stream: int, history: int) -> optuna.samplers.BaseSampler:
    """A sampler seeded by the sweep's seed, its worker (``stream``) and the trials so far.

    A sampler seeded by ``--seed`` alone would, on resuming, replay the
    suggestions it made the first time, and parallel workers would all suggest
    the same ones; the seed is deterministic in all three instead.
    """
    seed = int(np.random.SeedSequence([spec.seed, stream, history]).generate_state(1)[0])
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2" or len(spec.objectives) > 1:
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _trial_evaluation(spec: SweepSpec) -> Evaluation:
    """Trials measure only what the objectives need."""
    return dataclasses.replace(
        spec.evaluation,
        lds="lds" in spec.objectives,
        reliability=False,
        removal=False,
        owner_retrains="owner_spearman" in spec.objectives,
    )


@dataclasses.dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    complete: int
    failed: int
    best: list[dict]  # trial number, values and params of the best trial (the Pareto front)
    heldout: list[tuple[str, int, RunOutcome]]  # (selection, seed, outcome)


def run_sweep(spec: SweepSpec) -> SweepResult:
    check_spec(spec)
    runner = Runner(spec.results_dir, tracking_uri_override=spec.tracking_uri)
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=open_storage(spec.storage),
        directions=spec.directions,
        load_if_exists=True,
    )
    _check_signature(study, spec)  # a conflict is refused before any training
    # the model, and any ground truth the objectives need, before any trial
    bundle, _ = runner.prepare(_plan(spec, spec.fixed, "tuning", _trial_evaluation(spec)))
    sides = ("tuning", "heldout") if spec.seed in spec.heldout_seeds else ("tuning",)
    for side in sides:
        _check_learned_queries(bundle, side)
    parent_id = _parent_run(runner, study, spec)
    _fail_stale_trials(study)
    done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    missing = max(0, spec.trials - done)
    _logger.info(
        "study %s: %d of %d trials finished; running %d", spec.study_name, done, spec.trials,
        missing,
    )  # fmt: skip
    status = "FAILED"
    try:
        history = len(study.trials)
        if missing and spec.jobs == 1:
            study.sampler = _sampler(spec, stream=0, history=history)
            _optimize(spec, study, runner, parent_id, missing)
        elif missing:
            workers = min(spec.jobs, missing)
            jobs = [(spec, parent_id, worker, history) for worker in range(workers)]
            for _ in ProcessExecutor(workers).run(_worker, jobs):
                pass
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        failed = sum(t.state == TrialState.FAIL for t in trials)
        if not complete:
            raise RuntimeError(
                f"no trial of study {spec.study_name!r} completed ({failed} failed); "
                "see the failed trials' reasons in MLflow"
            )
        best = _best(study, spec)
        _log_study(runner, parent_id, study, spec, best, failed)
        heldout = _evaluate_heldout(runner, spec, best[0]["params"], parent_id)
        status = "FINISHED"
    finally:
        runner.tracker.client.set_terminated(parent_id, status=status)
    return SweepResult(spec.study_name, parent_id, len(complete), failed, best, heldout)


def _plan(spec: SweepSpec, params: Mapping[str, str], queries: str, evaluation) -> RunPlan:
    return plan_runs(
        [spec.method],
        spec.task,
        scale=spec.scale,
        seed=spec.seed,
        overrides=params,
        evaluation=evaluation,
        queries=queries,
        task_params=spec.task_params,
    )


def _check_learned_queries(bundle, side: str) -> None:
    """Refuse a sweep whose trials or held-out runs would find no learned query to score."""
    chosen = select_queries(bundle.data.queries, side, seed=bundle.seed)
    if not any(bundle.learned[q.id] for q in chosen):
        raise ParameterError(
            f"the model learned none of the {len(chosen)} {side} queries (seed {bundle.seed}; "
            f"{sum(bundle.learned.values())} of all {len(bundle.data.queries)} learned): "
            "the sweep would have nothing to score there; use a larger scale"
        )


def _check_signature(study: optuna.Study, spec: SweepSpec) -> None:
    wanted = spec.signature()
    stored = study.user_attrs.get("signature")
    if stored is None:
        study.set_user_attr("signature", wanted)
        return
    # a study made before task variants existed was made for the preset
    stored = {"variant": "", **stored}
    changed = [k for k in {**stored, **wanted} if stored.get(k) != wanted.get(k)]
    if changed:
        raise SweepConflictError(
            f"study {spec.study_name!r} in {spec.storage} was created with another "
            + "; ".join(_difference(k, stored.get(k), wanted.get(k)) for k in changed)
            + ". Rerun the original command to resume it, or pass --study-name NEW for a "
            "new study"
        )


def _difference(key: str, stored, wanted) -> str:
    if key == "space":
        return (
            f"search space (stored: {', '.join(stored) or 'none'}; "
            f"now: {', '.join(wanted) or 'none'}; or their ranges differ)"
        )
    if key == "variant":
        return f"task settings (stored: {stored or 'the preset'}; now: {wanted or 'the preset'})"
    label = {"fixed": "fixed parameters"}.get(key, key)
    return f"{label} (stored: {stored}; now: {wanted})"


def _parent_run(runner: Runner, study: optuna.Study, spec: SweepSpec) -> str:
    """The study's parent MLflow run: reopened when resuming, else created."""
    client = runner.tracker.client
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # a study kept, a tracking store replaced: start a new parent
            run_id = None
    if run_id is None:
        run = client.create_run(
            runner.tracker.experiment_id(spec.task),
            run_name=f"sweep-{spec.study_name}",
            tags={
                ROLE_TAG: "sweep",
                "method": spec.method,
                "task": spec.task,
                "scale": spec.scale,
                "optuna.study_name": spec.study_name,
                "optuna.storage": spec.storage,
            },
        )
        run_id = run.info.run_id
        study.set_user_attr("mlflow_run_id", run_id)
        study.set_user_attr("mlflow_tracking_uri", runner.tracker.uri)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def _fail_stale_trials(study: optuna.Study) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _logger.warning(
            "trial %d was left running by an interrupted sweep; marking it failed", trial.number
        )
        study.tell(trial.number, state=TrialState.FAIL)


def _worker(job: tuple[SweepSpec, str, int, int]) -> None:
    """One parallel worker: its own storage and tracking connections, the same study."""
    spec, parent_id, worker, history = job
    runner = Runner(spec.results_dir, tracking_uri_override=spec.tracking_uri)
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=open_storage(spec.storage),
        sampler=_sampler(spec, stream=worker + 1, history=history),
    )
    _optimize(spec, study, runner, parent_id, spec.trials)


def _optimize(
    spec: SweepSpec, study: optuna.Study, runner: Runner, parent_id: str, trials: int
) -> None:
    plan = _plan(spec, spec.fixed, "tuning", _trial_evaluation(spec))
    bundle, truth = runner.prepare(plan)  # from the cache: the sweep built them first
    space = search_space(type(plan.methods[0]), spec.fixed)
    skeleton = bundle.model()

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        sampled = {name: _suggest(trial, name, d) for name, d in space.items()}
        tags = {
            "mlflow.parentRunId": parent_id,
            ROLE_TAG: "trial",
            "optuna.study_name": spec.study_name,
            "optuna.trial": str(trial.number),
        }
        try:  # combinations the method refuses, and layer selections or ranks the model
            # cannot take, fail before any work
            params = dataclasses.replace(plan.methods[0].params, **sampled)
            method = type(plan.methods[0])(params, seed=spec.seed)
            method.check_model(skeleton, checkpoints=len(bundle.checkpoints))
        except (ParameterError, ValueError) as error:
            trial.set_user_attr("error", str(error))
            _record_refusal(runner, spec, trial.number, sampled, tags, error)
            raise
        outcome = runner.run_method(method, plan, bundle, truth, tags=tags)
        trial.set_user_attr("mlflow_run_id", outcome.run_id or "")
        if outcome.status != "FINISHED":
            trial.set_user_attr("error", outcome.error or "failed")
            raise RuntimeError(outcome.error)
        values = tuple(_objective_value(outcome.metrics, name) for name in spec.objectives)
        if any(math.isnan(v) for v in values):
            trial.set_user_attr(
                "error", f"objective is NaN: {dict(zip(spec.objectives, values, strict=True))}"
            )
        return values[0] if len(values) == 1 else values

    stop = optuna.study.MaxTrialsCallback(spec.trials, states=(*FINISHED, TrialState.RUNNING))
    study.optimize(
        objective,
        n_trials=trials,
        timeout=spec.timeout,
        catch=(Exception,),
        callbacks=[stop],
        gc_after_trial=True,
    )


def _record_refusal(
    runner: Runner, spec: SweepSpec, number: int, sampled: dict, tags: dict, error: Exception
) -> None:
    """A nested MLflow run, FAILED with the reason, for a trial refused before any work."""
    name = f"{spec.method}-{spec.task}-{spec.scale}-trial{number}"
    with (
        contextlib.suppress(ParameterError, ValueError),
        runner.tracker.run(task=spec.task, name=name, tags={**tags, "method": spec.method}) as run,
    ):
        run.log_params({f"method.{key}": value for key, value in sampled.items()})
        raise error


def _suggest(trial: optuna.Trial, name: str, distribution):
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    raise TypeError(f"unsupported distribution {distribution!r} for {name}")


def _objective_value(metrics: Mapping[str, float], name: str) -> float:
    if name == COST:
        return metrics["fit_seconds"] + metrics["score_seconds"]
    return float(metrics.get(name, math.nan))


def _best(study: optuna.Study, spec: SweepSpec) -> list[dict]:
    """The best trial; with two objectives the Pareto front, best fidelity first."""
    trials = study.best_trials if len(spec.objectives) > 1 else [study.best_trial]
    trials = sorted(trials, key=lambda t: -t.values[0])
    return [
        {
            "trial": t.number,
            "values": dict(zip(spec.objectives, t.values, strict=True)),
            "params": {k: _as_string(v) for k, v in {**spec.fixed, **t.params}.items()},
        }
        for t in trials
    ]


def _as_string(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _log_study(runner, parent_id, study, spec: SweepSpec, best: list[dict], failed: int) -> None:
    run = ActiveRun(runner.tracker.client, parent_id)
    complete = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    run.log_metrics(
        {
            "trials_complete": complete,
            "trials_failed": failed,
            **{f"best_{k}": v for k, v in best[0]["values"].items()},
        }
    )
    # tags, not params: a resumed study may find another best configuration
    run.set_tags({f"best.{key}": value for key, value in best[0]["params"].items()})
    run.set_tags({"best.trial": best[0]["trial"]})
    runner.tracker.client.log_text(parent_id, json.dumps(best, indent=2), "best_trials.json")


def _evaluate_heldout(
    runner: Runner, spec: SweepSpec, best_params: Mapping[str, str], parent_id: str
) -> list[tuple[str, int, RunOutcome]]:
    """The best and the default configuration, once each, on the held-out queries."""
    outcomes = []
    for seed in spec.heldout_seeds:
        for selection, params in (("best", best_params), ("default", spec.fixed)):
            plan = plan_runs(
                [spec.method],
                spec.task,
                scale=spec.scale,
                seed=seed,
                overrides=params,
                evaluation=spec.evaluation,
                queries="heldout",
                task_params=spec.task_params,
            )
            bundle, truth = runner.prepare(plan)
            outcome = runner.run_method(
                plan.methods[0],
                plan,
                bundle,
                truth,
                tags={
                    "selection": selection,
                    "optuna.study_name": spec.study_name,
                    "sweep_run_id": parent_id,
                },
            )
            outcomes.append((selection, seed, outcome))
    return outcomes


def study_summary(result: SweepResult) -> Sequence[str]:
    lines = [
        (
            f"study {result.study_name}: {result.complete} trials complete, "
            f"{result.failed} failed (MLflow parent run {result.parent_run_id})"
        )
    ]
    for entry in result.best:
        values = ", ".join(f"{k} {v:.4g}" for k, v in entry["values"].items())
        params = ", ".join(f"{k}={v}" for k, v in entry["params"].items())
        lines.append(f"  trial {entry['trial']}: {values} on the tuning queries; {params}")
    return lines
