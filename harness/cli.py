"""The ``harness`` command line: list, run, sweep, leaderboard, ui and bench.

stdout carries results (tables, paths); progress and logs go to stderr.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click
import polars as pl

from harness import bench, executor
from harness import sweep as sweep_module
from harness import ui as ui_module
from harness.errors import HarnessError, ParameterError
from harness.evaluation import Evaluation
from harness.leaderboard import PARAMS_WIDTH, terminal_tables, write_leaderboard
from harness.method import METHODS
from harness.resources import keep_freed_memory
from harness.runner import Runner, RunOutcome, parse_method_names, plan_runs
from harness.task import TASKS
from harness.tracking import TrackingStoreError, open_client, tracking_uri

DEFAULT_RESULTS = Path("results")

# a tracking server that does not answer should fail in seconds, not retry for minutes
_MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
}


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    )
    # the handler's level filters too: some libraries set their own loggers to DEBUG
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.set_name("harness-cli")
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "harness-cli"] + [handler]
    root.setLevel(handler.level)
    for noisy in ("alembic", "mlflow", "urllib3", "git", "bm25s", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class TerminatedBySignal(SystemExit):
    """SystemExit with the shell's exit status for a signal, named in its message."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def __str__(self) -> str:
        return f"terminated by {self.signal_name}"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise TerminatedBySignal(signum)


def _store_options(command: Callable) -> Callable:
    """``--results-dir`` and ``--tracking-uri``, accepted before or after the subcommand."""

    @click.option(
        "--results-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder for the cache, the MLflow store and exported tables "
        "(env HARNESS_RESULTS_DIR; default results/).",
    )
    @click.option(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (env MLFLOW_TRACKING_URI; "
        "default sqlite:///<results-dir>/mlflow.db).",
    )
    @functools.wraps(command)
    def wrapper(*args, results_dir: Path | None, tracking_uri: str | None, **kwargs):
        obj = click.get_current_context().ensure_object(dict)
        obj["results_dir"] = results_dir or obj.get("results_dir") or DEFAULT_RESULTS
        obj["tracking_uri"] = tracking_uri or obj.get("tracking_uri")
        return command(obj, *args, **kwargs)

    return wrapper


@click.group()
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RESULTS,
    envvar="HARNESS_RESULTS_DIR",
    show_default=True,
    help="Folder for the cache, the MLflow store and exported tables (env HARNESS_RESULTS_DIR).",
)
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///<results-dir>/mlflow.db).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def main(ctx: click.Context, results_dir: Path, tracking_uri: str | None, verbose: bool) -> None:
    """Score training-data attribution methods against planted ground truth."""
    _configure_logging(verbose)
    for name, value in _MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    keep_freed_memory()
    ctx.obj = {"results_dir": results_dir, "tracking_uri": tracking_uri}


@main.command("list")
def list_command() -> None:
    """Registered methods and tasks, with their parameters."""
    click.echo("Methods:")
    for cls in METHODS:
        click.echo(f"  {cls.name:<10} [{cls.family}] {cls.description}")
        for p in cls.Params.describe():
            click.echo(
                f"      {p['name']}={p['default']!r} ({p['type']}{_bounds(p)}): {p['help']}"
            )
    click.echo("Tasks (--task-param values shown are the default scale's; model.KEY sets the "
               "model recipe, e.g. model.steps):")  # fmt: skip
    for cls in TASKS:
        click.echo(f"  {cls.name:<10} {cls.description} (primary metric: {cls.primary_metric})")
        for scale, preset in cls.scales.items():
            default = " (default)" if scale == cls.default_scale else ""
            click.echo(f"      --scale {scale}{default}: {preset.help}")
        for p in cls.scale(cls.default_scale).config.describe():
            click.echo(
                f"      --task-param {p['name']}={p['default']!r} "
                f"({p['type']}{_bounds(p)}): {p['help']}"
            )
    _echo_applicability()


def _echo_applicability() -> None:
    """Which method runs on which task: 'yes', or a numbered reason why not."""
    tasks = list(TASKS)
    reasons: list[str] = []
    click.echo("\nWhere each method applies (`--method all` runs those marked yes):")
    methods = list(METHODS)
    name_width = max(len(m.name) for m in methods) + 2
    cell_width = max(10, *(len(t.name) + 2 for t in tasks))
    click.echo(" " * (name_width + 2) + "".join(f"{t.name:<{cell_width}}" for t in tasks))
    for method in methods:
        cells = []
        for task in tasks:
            reason = method.applies_to(task)
            if reason is None:
                cells.append("yes")
                continue
            if reason not in reasons:
                reasons.append(reason)
            cells.append(f"no ({reasons.index(reason) + 1})")
        click.echo(f"  {method.name:<{name_width}}" + "".join(f"{c:<{cell_width}}" for c in cells))
    for number, reason in enumerate(reasons, start=1):
        click.echo(f"  ({number}) {reason}")


def _bounds(p: dict) -> str:
    if p["choices"] is not None:
        return f", one of {list(p['choices'])}"
    if p["low"] is not None or p["high"] is not None:
        return f", {p['low']}..{p['high']}"
    return ""


def _task_param_option(command: Callable) -> Callable:
    return click.option(
        "--task-param",
        "task_params",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a task setting of the scale (see `harness list`), or model.KEY=VALUE "
        "its model recipe; makes a task variant, ranked apart. Repeatable.",
    )(command)


def _parse_key_values(values: tuple[str, ...], *, option: str = "--param") -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, but got {item!r}", param_hint=option)
        if key.strip() in pairs and pairs[key.strip()] != value.strip():
            raise click.BadParameter(
                f"{key.strip()} is given twice ({pairs[key.strip()]!r} and {value.strip()!r})",
                param_hint=option,
            )
        pairs[key.strip()] = value.strip()
    return pairs


@main.command()
@click.option("--method", "methods", required=True, help="A method, a comma list, or 'all'.")
@click.option("--task", required=True, help="A registered task (see `harness list`).")
@click.option("--scale", default=None, help="Task scale preset; the task's default if omitted.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seeds the task data, the model's training and the methods.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Method parameter; METHOD.KEY=VALUE targets one method. Repeatable.",
)
@_task_param_option
@click.option(
    "--lds/--no-lds",
    default=True,
    show_default=True,
    help="Score every method against models retrained on random subsets (LDS); the pool "
    "is trained once per task and cached.",
)
@click.option(
    "--pool-models",
    type=int,
    default=Evaluation.pool_models,
    show_default=True,
    help="Retrained models in the LDS pool (a larger pool reuses a smaller one's models).",
)
@click.option(
    "--pool-fraction",
    type=float,
    default=Evaluation.pool_fraction,
    show_default=True,
    help="Fraction α of the documents each pool model trains on.",
)
@click.option(
    "--reliability/--no-reliability",
    default=True,
    show_default=True,
    help="Rescore with another method seed, on an independently trained model and on "
    "re-initialised weights (stability and the randomisation check).",
)
@click.option(
    "--removal",
    is_flag=True,
    help="Also retrain without each sampled query's top-k documents and k random ones "
    "(k = 10, 50; costly: two retrains per query and k).",
)
@click.option(
    "--removal-queries",
    type=int,
    default=Evaluation.removal_queries,
    show_default=True,
    help="Queries sampled for --removal.",
)
@click.option(
    "--owner-retrains/--no-owner-retrains",
    default=True,
    show_default=True,
    help="On tasks with data owners, retrain once without each owner's documents: the "
    "ground truth of owner_spearman and of the unlearning check.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes for retraining (default: one per 2 cores).",
)
@_store_options
def run(
    obj: dict,
    methods: str,
    task: str,
    scale: str | None,
    seed: int,
    params: tuple[str, ...],
    task_params: tuple[str, ...],
    lds: bool,
    pool_models: int,
    pool_fraction: float,
    reliability: bool,
    removal: bool,
    removal_queries: int,
    owner_retrains: bool,
    workers: int | None,
) -> None:
    """Run attribution methods on a task, each as its own MLflow run."""
    executor.configure(workers=workers)
    evaluation = Evaluation(
        lds=lds,
        pool_models=pool_models,
        pool_fraction=pool_fraction,
        reliability=reliability,
        removal=removal,
        removal_queries=removal_queries,
        owner_retrains=owner_retrains,
    )
    try:
        plan = plan_runs(
            parse_method_names(methods, task=task),
            task,
            scale=scale,
            seed=seed,
            overrides=_parse_key_values(params),
            evaluation=evaluation,
            task_params=_parse_key_values(task_params, option="--task-param"),
        )
        runner = Runner(obj["results_dir"], tracking_uri_override=obj["tracking_uri"])
    except (HarnessError, ValueError, TypeError) as error:
        raise click.UsageError(str(error)) from None

    try:
        outcomes = runner.execute(plan)
    except ParameterError as error:  # settings that needed the task's data to check
        raise click.UsageError(str(error)) from None
    variant = plan.task.variant(plan.scale)
    label = f"{plan.task.name}[{variant}]" if variant else plan.task.name
    _print_summary(outcomes, label, plan.scale)
    if plan.task.primary_metric != "mrr":
        click.echo(f"The leaderboard ranks {plan.task.name} by {plan.task.primary_metric}.")
    click.echo(f"\nResults: {obj['results_dir']}/  (MLflow store: {runner.tracker.uri})")
    where = f" --results-dir {obj['results_dir']}" if obj["results_dir"] != DEFAULT_RESULTS else ""
    where += f" --tracking-uri {obj['tracking_uri']}" if obj["tracking_uri"] else ""
    click.echo(f"Browse:  harness ui{where}")
    click.echo(f"Export:  harness leaderboard{where} [--plots]")
    if any(o.status != "FINISHED" for o in outcomes):
        sys.exit(1)


def _print_summary(outcomes: list[RunOutcome], task: str, scale: str) -> None:
    finished = [o for o in outcomes if o.status == "FINISHED"]
    if finished:
        m = finished[0].metrics
        click.echo(
            f"\n{task}/{scale}: the model learned {int(m['queries_scored'])} of the "
            f"{int(m['queries_total'])} queries' targets ({m['learned_fraction']:.0%}; "
            f"untrained: {m['learned_fraction_untrained']:.0%}), "
            f"held-out loss {m['heldout_loss']:.3f}; attribution is scored on the learned ones."
        )
        memorised = sorted(k for k in m if k.startswith("memorised_k"))
        if memorised:  # task canaries: memorisation by repetition count
            click.echo(
                "Memorised (exposure in bits) by repetitions: "
                + ", ".join(
                    f"k={int(k.removeprefix('memorised_k'))} {m[k]:.0%} "
                    f"({m[k.replace('memorised', 'exposure')]:.2f})"
                    for k in memorised
                )
            )
        click.echo()
    header = (
        f"{'method':<10} {'MRR [95% CI]':<22} {'R@1':>6} {'R@10':>6} {'R@50':>6} "
        f"{'AUPRC':>6} {'LDS':>6} {'seed ρ':>6} {'model ρ':>7} {'rand ρ':>6} "
        f"{'fit s':>7} {'score s':>8} {'mem MB':>7}"
    )
    click.echo(header)
    click.echo("-" * len(header))
    for o in outcomes:
        if o.status != "FINISHED":
            click.echo(f"{o.method:<10} FAILED: {o.error}")
            continue
        m = o.metrics
        mrr = f"{m['mrr']:.3f} [{m['mrr_ci_low']:.3f}, {m['mrr_ci_high']:.3f}]"
        click.echo(
            f"{o.method:<10} {mrr:<22} {m['recall_at_1']:>6.3f} {m['recall_at_10']:>6.3f} "
            f"{m['recall_at_50']:>6.3f} {m['auprc']:>6.3f} {_cell(m, 'lds')} "
            f"{_cell(m, 'seed_stability')} {_cell(m, 'model_seed_stability', 7)} "
            f"{_cell(m, 'randomization_correlation')} "
            f"{m['fit_seconds']:>7.2f} "
            f"{m['score_seconds']:>8.2f} {m['peak_memory_mb']:>7.0f}"
        )
    removals = [o for o in finished if "removal_queries" in o.metrics]
    if removals:
        click.echo(
            "\nTop-k removal, mean drop of the target log-probability over "
            f"{_count(int(removals[0].metrics['removal_queries']), 'query', 'queries')} "
            "(top-k / random k / effect):"
        )
        for o in removals:
            ks = sorted(
                int(k.rpartition("_")[2]) for k in o.metrics if k.startswith("removal_effect")
            )
            cells = [
                f"k={k}: {o.metrics[f'removal_drop_at_{k}']:.3f} / "
                f"{o.metrics[f'removal_random_drop_at_{k}']:.3f} / "
                f"{o.metrics[f'removal_effect_at_{k}']:+.3f}"
                for k in ks
            ]
            click.echo(f"{o.method:<10} " + "   ".join(cells))

    owner_level = [o for o in finished if "owner_top1" in o.metrics]
    if owner_level:
        click.echo(
            "\nOwner level: document scores summed per owner. Top-1: the queried fact's "
            "owner ranked first; ρ: Spearman against the leave-one-owner-out drops."
        )
        for o in owner_level:
            m = o.metrics
            line = f"{o.method:<10} top-1 {_with_ci(m, 'owner_top1')}"
            if "owner_spearman" in m:
                line += f"   ρ {_with_ci(m, 'owner_spearman')}"
            click.echo(line)
    for o in finished:
        if "own_heldout_loss" in o.metrics:
            _print_own_model(o)


def _with_ci(m: dict[str, float], name: str) -> str:
    return f"{m[name]:.3f} [{m[name + '_ci_low']:.3f}, {m[name + '_ci_high']:.3f}]"


def _print_own_model(o: RunOutcome) -> None:
    m = o.metrics
    trained = f", trained in {m['own_train_seconds']:.0f} s" if "own_train_seconds" in m else ""
    click.echo(
        f"\n{o.method} trains its own model{trained}: held-out loss "
        f"{m['own_heldout_loss']:.3f} against the reference's {m['heldout_loss']:.3f} "
        f"(delta {m['heldout_loss_delta']:+.3f})."
    )
    if "unlearn_queries" not in m:
        return
    # in queries and their relevant documents: a fact on facts, a secret on canaries, ...
    checked, stuck = int(m["unlearn_queries"]), int(m["unlearn_not_removable"])
    if stuck:
        click.echo(
            f"Unlearning check: {_count(stuck, 'query', 'queries')} cannot be removed by "
            "dropping experts (a relevant document in the public portion, or relevant "
            "documents in every shard)."
        )
    if not checked:
        click.echo("Unlearning check: no query the mixture learned could be checked.")
        return
    click.echo(
        f"Unlearning check on {_count(checked, 'query', 'queries')} the mixture learned: "
        f"dropping the experts holding a query's relevant documents forgets the target in "
        f"{m['unlearn_forgotten']:.0%} of them; dropping the strongest other expert keeps it "
        f"in {m['unlearn_kept_other']:.0%}."
    )
    click.echo(
        "Mean target log-probability: "
        f"full {m['unlearn_logprob_full']:.2f}, "
        f"without the query's experts {m['unlearn_logprob_without_responsible']:.2f}, "
        f"without the other {m['unlearn_logprob_without_other']:.2f}."
    )
    if m.get("unlearn_never_seen_queries"):
        click.echo(
            "Against a model that never saw the relevant documents "
            f"({_count(int(m['unlearn_never_seen_queries']), 'query', 'queries')}): "
            f"{m['unlearn_logprob_never_seen']:.2f}; without the query's experts minus that: "
            f"{m['unlearn_gap_never_seen']:+.2f}."
        )


@main.command()
@click.option("--method", required=True, help="The method to tune (see `harness list`).")
@click.option("--task", required=True, help="A registered task.")
@click.option("--scale", default=None, help="Task scale preset; the task's default if omitted.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seeds the task, the model, the query split, the sampler and the method.",
)
@click.option("--trials", required=True, type=int, help="Trials the study should hold in all.")
@click.option(
    "--objective",
    default=None,
    help="Metric to maximise (default: the task's primary metric), or 'fidelity,cost' for "
    "a two-objective study whose Pareto front is reported.",
)
@click.option(
    "--sampler",
    type=click.Choice(sweep_module.SAMPLERS),
    default="tpe",
    show_default=True,
    help="Optuna sampler (two objectives use NSGA-II unless random).",
)
@click.option("--timeout", type=float, default=None, help="Stop starting trials after SECONDS.")
@click.option(
    "--storage",
    default=None,
    help="Optuna storage URL (default sqlite:///<results-dir>/optuna.db; with --jobs > 1, "
    "journal:///<results-dir>/optuna.journal).",
)
@click.option("--study-name", default=None, help="Default: METHOD-TASK-SCALE-seedSEED.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Parallel worker processes.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Fix a parameter (it leaves the search space). Repeatable.",
)
@_task_param_option
@click.option(
    "--seeds",
    default=None,
    help="Comma-separated seeds on which the best and the default configuration are "
    "evaluated on held-out queries (default: --seed).",
)
@click.option(
    "--lds/--no-lds",
    default=True,
    show_default=True,
    help="LDS in the held-out evaluation (trials measure it only when it is the objective).",
)
@click.option(
    "--pool-models", type=int, default=Evaluation.pool_models, show_default=True,
    help="Retrained models in the LDS pool.",
)  # fmt: skip
@click.option(
    "--reliability/--no-reliability",
    default=True,
    show_default=True,
    help="Reliability checks in the held-out evaluation.",
)
@_store_options
def sweep(
    obj: dict,
    method: str,
    task: str,
    scale: str | None,
    seed: int,
    trials: int,
    objective: str | None,
    sampler: str,
    timeout: float | None,
    storage: str | None,
    study_name: str | None,
    jobs: int,
    params: tuple[str, ...],
    task_params: tuple[str, ...],
    seeds: str | None,
    lds: bool,
    pool_models: int,
    reliability: bool,
) -> None:
    """Tune a method with Optuna on tuning queries; report best and default on held-out ones."""
    results_dir = obj["results_dir"]
    try:
        task_class = TASKS.get(task)
        scale = scale or task_class.default_scale
        task_overrides = _parse_key_values(task_params, option="--task-param")
        variant = task_class(task_overrides).variant(scale)
        heldout_seeds = _parse_seeds(seeds) if seeds else (seed,)
        if storage is None:
            storage = (
                f"journal:///{results_dir.resolve()}/optuna.journal"
                if jobs > 1
                else f"sqlite:///{results_dir.resolve()}/optuna.db"
            )
        spec = sweep_module.SweepSpec(
            method=method,
            task=task,
            scale=scale,
            seed=seed,
            trials=trials,
            objectives=sweep_module.parse_objectives(objective, task),
            sampler=sampler,
            timeout=timeout,
            storage=storage,
            study_name=study_name
            or sweep_module.default_study_name(method, task, scale, seed, variant),
            jobs=jobs,
            fixed=_parse_key_values(params),
            results_dir=results_dir,
            tracking_uri=obj["tracking_uri"],
            heldout_seeds=heldout_seeds,
            evaluation=Evaluation(lds=lds, pool_models=pool_models, reliability=reliability),
            task_params=task_overrides,
        )
        sweep_module.check_spec(spec)
    except (HarnessError, ValueError, TypeError) as error:
        raise click.UsageError(str(error)) from None
    try:
        result = sweep_module.run_sweep(spec)
    except (sweep_module.SweepConflictError, ParameterError) as error:
        raise click.UsageError(str(error)) from None
    for line in sweep_module.study_summary(result):
        click.echo(line)
    click.echo("\nHeld-out queries (what the leaderboard reports):")
    for selection, run_seed, outcome in result.heldout:
        if outcome.status != "FINISHED":
            click.echo(f"  {selection:<8} seed {run_seed}: FAILED: {outcome.error}")
            continue
        m = outcome.metrics
        primary = spec.objectives[0] if spec.objectives[0] != sweep_module.COST else "mrr"
        click.echo(
            f"  {selection:<8} seed {run_seed}: {primary} {m[primary]:.3f} "
            f"[{m[primary + '_ci_low']:.3f}, {m[primary + '_ci_high']:.3f}] "
            f"on {int(m['queries_scored'])} queries (run {outcome.run_id})"
        )
    if any(o.status != "FINISHED" for *_, o in result.heldout):
        sys.exit(1)


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise ParameterError(f"--seeds takes comma-separated integers, but got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ParameterError(f"--seeds takes non-negative integers, but got {text!r}")
    return seeds


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _cell(metrics: dict[str, float], name: str, width: int = 6) -> str:
    return f"{metrics[name]:>{width}.3f}" if name in metrics else f"{'-':>{width}}"


@main.command()
@click.option("--task", "tasks", multiple=True, help="Only these tasks (repeatable).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CSV path; default <results-dir>/leaderboard.csv.",
)
@click.option(
    "--plots", is_flag=True, help="Also write figures to <results-dir>/plots/ (seaborn)."
)
@_store_options
def leaderboard(obj: dict, tasks: tuple[str, ...], out: Path | None, plots: bool) -> None:
    """Rank the finished MLflow runs per task and write them as CSV."""
    for name in tasks:
        try:
            TASKS.get(name)
        except HarnessError as error:
            raise click.BadParameter(str(error), param_hint="--task") from None
    out = out or obj["results_dir"] / "leaderboard.csv"
    _check_writable(out)
    uri = tracking_uri(obj["results_dir"], obj["tracking_uri"])
    try:
        table = write_leaderboard(uri, out, tasks=tasks)
    except TrackingStoreError as error:
        raise click.UsageError(str(error)) from None

    if table.is_empty():
        click.echo("No finished runs yet: start one with `harness run --method all --task facts`.")
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, float_precision=3,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                       fmt_str_lengths=PARAMS_WIDTH, tbl_formatting="ASCII_MARKDOWN"):  # fmt: skip
            for title, view in terminal_tables(table):
                click.echo(f"\n{title}")
                click.echo(view)
    click.echo(f"Wrote {out}")
    if plots and not table.is_empty():
        from harness.plots import write_plots  # matplotlib loads only when asked for

        for path in write_plots(table, obj["results_dir"] / "plots"):
            click.echo(f"Wrote {path}")


@main.command()
@click.option("--task", required=True, help="A registered task (see `harness list`).")
@click.option("--scale", default=None, help="Task scale preset; the task's default if omitted.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@_task_param_option
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for corpus.jsonl, queries.jsonl and heldout.jsonl.",
)
@_store_options
def export(
    obj: dict, task: str, scale: str | None, seed: int, task_params: tuple[str, ...], out: Path
) -> None:
    """Write a task's data as the JSONL files task `custom` reads: a template for your own."""
    from harness.bundle import prepare_task_data
    from harness.cache import Cache
    from tasks.custom import write_task_files

    try:
        task_object = TASKS.get(task)(_parse_key_values(task_params, option="--task-param"))
        scale = scale or task_object.default_scale
        task_object.settings(scale)
        data = prepare_task_data(
            task_object, scale, seed=seed, cache=Cache(obj["results_dir"] / "cache")
        )
    except (HarnessError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    for path in write_task_files(data, out):
        click.echo(f"Wrote {path}")
    click.echo(
        f"Load them with: harness run --task custom --scale {scale} "
        f"--task-param corpus={out}/corpus.jsonl "
        f"--task-param queries={out}/queries.jsonl --task-param heldout={out}/heldout.jsonl "
        "--method ..."
    )


@main.command()
@click.option(
    "--optuna",
    "optuna_dashboard",
    is_flag=True,
    help="The Optuna dashboard on the study storage instead of the MLflow UI.",
)
@click.option(
    "--storage",
    default=None,
    help="Optuna storage for --optuna (default sqlite:///<results-dir>/optuna.db, or the "
    "journal file a --jobs sweep wrote there).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Default: a free one.")
@_store_options
def ui(obj: dict, optuna_dashboard: bool, storage: str | None, port: int | None) -> None:
    """Serve the MLflow UI (or the Optuna dashboard) on 127.0.0.1 until Ctrl-C."""
    results_dir = obj["results_dir"]
    port = port or ui_module.free_port()
    try:
        if optuna_dashboard:
            journal = results_dir.resolve() / "optuna.journal"
            database = results_dir.resolve() / "optuna.db"
            if storage is None and not database.exists() and journal.exists():
                storage = f"journal://{journal}"
            storage = storage or f"sqlite:///{database}"
            if storage.startswith("sqlite:///") and not Path(storage[10:]).exists():
                raise click.UsageError(
                    f"no Optuna storage at {storage}; run `harness sweep` first or pass --storage"
                )
            command, what = (
                ui_module.optuna_command(storage, port),
                f"Optuna dashboard ({storage})",
            )
        else:
            uri = tracking_uri(results_dir, obj["tracking_uri"])
            open_client(uri)  # a store that cannot be opened fails here, with advice
            command, what = ui_module.mlflow_command(uri, port), f"MLflow UI ({uri})"
    except (FileNotFoundError, TrackingStoreError) as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"{what} at http://{ui_module.HOST}:{port}  (Ctrl-C stops it)", err=False)
    sys.stdout.flush()
    sys.exit(ui_module.serve(command))


@main.command("bench")
@click.option(
    "--workload",
    "workloads",
    type=click.Choice(["reference", "default"]),
    multiple=True,
    help="reference: random 0.44M-parameter GPT, 100 × 2,000 sequences of 64 tokens; "
    "default: the facts task at its default scale. Both if omitted.",
)
@click.option(
    "--method",
    "methods",
    default=",".join(bench.METHODS_TIMED),
    show_default=True,
    help="Gradient methods to time end to end (comma list).",
)
@click.option(
    "--scale-up",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Also time the reference workload with this many times the documents (1 = skip), "
    "for the memory-growth check.",
)
@click.option(
    "--documents",
    type=click.IntRange(min=1),
    default=bench.REFERENCE["documents"],
    show_default=True,
    help="Training sequences of the reference workload.",
)
@click.option(
    "--queries",
    type=click.IntRange(min=1),
    default=bench.REFERENCE["queries"],
    show_default=True,
    help="Query sequences of the reference workload.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Processes per figure; the median time is reported.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch threads."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CSV path; default <results-dir>/bench.csv.",
)
@_store_options
def bench_command(
    obj: dict,
    workloads: tuple[str, ...],
    methods: str,
    scale_up: int,
    documents: int,
    queries: int,
    repeats: int,
    threads: int,
    out: Path | None,
) -> None:
    """Time gradient attribution against the FLOP lower bound and the plain baseline.

    The gemm floor is the same work's matrix products alone, at their own shapes:
    the least any float32 implementation on this machine's BLAS could take.
    """
    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("name at least one gradient method", param_hint="--method")
    for name in names:
        try:
            method = METHODS.get(name)
        except HarnessError as error:
            raise click.BadParameter(str(error), param_hint="--method") from None
        if method.family != "gradient":
            raise click.BadParameter(
                f"{name} is a {method.family} method; bench times gradient methods: "
                f"{', '.join(n for n in METHODS.names() if METHODS.get(n).family == 'gradient')}",
                param_hint="--method",
            )
    out = out or obj["results_dir"] / "bench.csv"
    _check_writable(out)
    environment = bench.environment()
    click.echo(
        f"harness bench, {environment['date']}, {environment['cpus']} CPUs, "
        f"torch {environment['torch']}; each figure in its own process"
    )
    rows = bench.run_benchmark(
        workloads=list(workloads) or ["reference", "default"],
        measures=bench.default_measures(names),
        scale_up=scale_up,
        results_dir=obj["results_dir"],
        threads=threads,
        report=click.echo,
        documents=documents,
        queries=queries,
        repeats=repeats,
    )
    table = pl.DataFrame(rows, infer_schema_length=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out)
    shown = table.filter(pl.col("x_plain_baseline_warm").is_not_null()).select(
        "workload", "measure", "seconds_cold", "seconds_warm", "x_flop_bound_warm",
        "x_gemm_floor_warm", "x_plain_baseline_warm", "peak_memory_mb",
    )  # fmt: skip
    with pl.Config(tbl_rows=100, float_precision=2, tbl_hide_dataframe_shape=True,
                   fmt_str_lengths=44, tbl_width_chars=160):  # fmt: skip
        click.echo(shown)
    click.echo(f"Wrote {out}")


def _check_writable(out: Path) -> None:
    """Fail as a usage error, before reading any run, if ``out`` cannot be written."""
    existing = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise click.BadParameter(
            f"cannot write {out}: {existing} is not a writable folder", param_hint="--out"
        )


def entry_point() -> None:
    """The ``harness`` console script: the CLI, with SIGTERM and Ctrl-C unwinding.

    Unwinding lets the run in progress be marked FAILED instead of left RUNNING,
    and the exit status is the shell's for the signal (130 for Ctrl-C, 143 for
    SIGTERM). The handlers are installed here, not in :func:`main`, so that calling
    the CLI in-process (tests, notebooks) leaves the caller's signal handling alone.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    main()
