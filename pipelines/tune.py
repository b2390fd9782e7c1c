"""Tune stage: Ray Tune over shortened training runs; every trial is an MLflow run nested under
this one.

    python -m pipelines.tune experiment=tiny              # after pipelines.prepare
    python -m pipelines.tune tune=large cluster=remote    # a real sweep on a cluster

Each trial is a function trainable that drives one Ray Train V2 run
(``components.training.ray_runner.run_training`` with ``report_to_tune=True``, so ASHA sees
``val_loss`` at every eval). Train V2 takes no Tune callbacks, so MLflow logging is explicit: the
trial creates (or, after a restart, finds) its own run tagged ``mlflow.parentRunId`` = this stage's
run, and rank 0 logs step metrics to it. The sweep directory is named after the config, the data
and the code, so rerunning after the driver died restores it (and new code never restores it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from ray import tune

from components.config import Config, flatten, to_container, with_overrides
from components.evaluation.sweep_report import write_sweep_summary
from components.tracking import mlflow_utils
from components.tracking.stages import StageContext, StageSpec, digest_of
from pipelines._cli import stage_main
from pipelines.outputs import PrepareOutputs, TuneOutputs

SWEEP_TAG = "moeops.sweep"
TRIAL_TAG = "moeops.trial_id"
TRIAL_STATUS_TAG = "moeops.trial_status"
COMPLETED, STOPPED_EARLY, ERRORED = "completed", "stopped_early", "errored"
_MLFLOW_STATUS = {COMPLETED: "FINISHED", STOPPED_EARLY: "KILLED", ERRORED: "FAILED"}


# --------------------------------------------------------------------------- search space


def search_space(spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``tune.search_space`` (dotted key -> {type, low, high, values, q}) -> Tune domains."""
    space: dict[str, Any] = {}
    for key, s in spec.items():
        kind = s["type"]
        if kind == "loguniform":
            space[key] = tune.loguniform(s["low"], s["high"])
        elif kind == "uniform":
            space[key] = tune.uniform(s["low"], s["high"])
        elif kind == "quniform":
            space[key] = tune.quniform(s["low"], s["high"], s.get("q", 1))
        elif kind == "randint":
            space[key] = tune.randint(
                int(s["low"]), int(s["high"]) + 1
            )  # high inclusive, like the YAML reads
        elif kind == "choice":
            space[key] = tune.choice(list(s["values"]))
        else:
            raise ValueError(f"tune.search_space.{key}.type={kind!r}: unknown distribution")
    return space


def trial_overrides(config: Config) -> dict[str, Any]:
    """What makes a trial a shortened training run (applied on top of the sampled values)."""
    tu, t = config.tune, config.train
    overrides: dict[str, Any] = {
        "train.max_steps": tu.trial_max_steps,
        "train.eval_every": tu.trial_eval_every,
        "train.checkpoint_every": tu.trial_eval_every,
        "train.num_workers": tu.trial_num_workers,
        "train.resume": "auto",
    }
    if t.warmup_steps >= tu.trial_max_steps:
        overrides["train.warmup_steps"] = tu.trial_max_steps // 4
    return overrides


def max_concurrent_trials(config: Config, available: dict[str, float]) -> int:
    """Trials that fit at once: each needs its Train workers' CPUs/GPUs plus its own driver's CPUs.

    Ray Train schedules all workers or none, so admitting more trials than fit would leave
    every trial waiting for the others' CPUs forever.
    """
    tu, t = config.tune, config.train
    if tu.max_concurrent_trials > 0:
        return tu.max_concurrent_trials
    cpus = tu.trial_num_workers * t.cpus_per_worker + tu.trial_driver_cpus
    fits = math.floor(available.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else tu.num_samples
    if t.use_gpu:
        gpus = tu.trial_num_workers * t.gpus_per_worker
        fits = min(fits, math.floor(available.get("GPU", 0.0) / gpus + 1e-9))
    if fits < 1:
        raise RuntimeError(
            f"one trial needs {cpus} CPUs (tune.trial_num_workers={tu.trial_num_workers} x "
            f"train.cpus_per_worker={t.cpus_per_worker} + "
            f"tune.trial_driver_cpus={tu.trial_driver_cpus})"
            + (f" and {tu.trial_num_workers * t.gpus_per_worker} GPUs" if t.use_gpu else "")
            + f", but the cluster has {available.get('CPU', 0)} CPUs / {available.get('GPU', 0)} "
            "GPUs "
            "available; lower tune.trial_num_workers or set tune.max_concurrent_trials for an "
            "autoscaling cluster"
        )
    return min(fits, tu.num_samples)


def sweep_name(config: Config, upstream_digest: str, code: str) -> str:
    """Stable for the same sweep config, data and code (the stage's code digest), so a rerun
    finds the interrupted sweep and a code change never restores the old code's sweep."""
    data = to_container(config)
    key = {k: data[k] for k in ("tune", "model", "train", "data")}
    return "sweep-" + digest_of({"config": key, "data": upstream_digest, "code": code})[:12]


# --------------------------------------------------------------------------- trial side


def trial_run_id(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    sweep: str,
    trial_id: str,
    trial_name: str,
) -> str:
    """The trial's MLflow run: found again after a trial restart or a restored sweep, else
    created."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        experiment_id,
        run_name=trial_name,
        tags={
            "mlflow.parentRunId": parent_run_id,
            SWEEP_TAG: sweep,
            TRIAL_TAG: trial_id,
            "moeops.stage": "tune-trial",
            TRIAL_STATUS_TAG: "running",
        },
    )
    return run.info.run_id


def train_trial(
    sampled: dict[str, Any],
    *,
    base_config: Config,
    manifest_uri: str,
    parent_run_id: str,
    experiment_id: str,
    sweep: str,
) -> None:
    """One trial (runs in the trial's process): a shortened, distributed training run."""
    from components.training.ray_runner import run_training

    base = base_config
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    client = MlflowClient(base.tracking.uri)
    run_id = trial_run_id(client, experiment_id, parent_run_id, sweep, trial_id, trial_name)
    try:
        config = with_overrides(base, {**sampled, **trial_overrides(base)})
    except Exception as err:  # an impossible combination (e.g. top_k > num_experts)
        client.set_tag(run_id, TRIAL_STATUS_TAG, ERRORED)
        client.log_text(run_id, str(err), "error.txt")
        raise
    container = to_container(config)
    mlflow_utils.log_params(
        client, run_id, {**flatten({"model": container["model"], "train": container["train"]})}
    )
    mlflow_utils.set_tags(
        client, run_id, {"moeops.sampled": json.dumps(sampled, sort_keys=True, default=str)}
    )
    result = run_training(
        config,
        manifest_uri,
        mlflow_run_id=run_id,
        name=f"{sweep}-{trial_id}",
        report_to_tune=True,
    )
    client.set_tag(run_id, TRIAL_STATUS_TAG, COMPLETED)
    mlflow_utils.log_metrics(
        client,
        run_id,
        {f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    )


# --------------------------------------------------------------------------- driver side


def _search_alg(config: Config, max_concurrent: int):
    tu = config.tune
    points = [dict(p) for p in tu.points_to_evaluate] or None
    if tu.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(points_to_evaluate=points, seed=tu.seed)
        except ImportError:  # optuna missing: random search still sweeps
            print("[tune] optuna is not installed; falling back to random search", flush=True)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # the limit goes here: Tune ignores TuneConfig.max_concurrent_trials for a SearchGenerator (it
    # warns so), and more trials than fit would wait on each other's CPUs
    return BasicVariantGenerator(
        points_to_evaluate=points, random_state=tu.seed, max_concurrent=max_concurrent
    )


def _scheduler(config: Config):
    tu = config.tune
    if tu.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Time is counted in evals (one Tune report per eval); a trial's last eval is max_t.
    max_t = max(1, math.ceil(tu.trial_max_steps / tu.trial_eval_every))
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=min(tu.grace_period, max_t),
        reduction_factor=tu.reduction_factor,
    )


SIGINT_HANDLER_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


@contextmanager
def signals_stop_the_sweep() -> Iterator[None]:
    """While Tune runs, Ctrl-C (SIGINT) stops the pipeline as SIGTERM does.

    ``Tuner.fit`` otherwise replaces the process' SIGINT handler with its own, which stops the
    trials, saves the experiment state and makes ``fit`` *return* as if the sweep had ended: the
    pipeline went on to ``train`` with whatever the interrupted trials had reported (or failed the
    stage when none had). Tune also leaves that handler installed after ``fit``, so a Ctrl-C in a
    later stage was swallowed once. Tune's documented ``TUNE_DISABLE_SIGINT_HANDLER`` (read when
    ``fit`` starts) keeps the process' handler, the pipeline's
    (``pipelines.pipeline.signals_end_runs``),
    which raises ``Interrupted``: the trial, tune and parent runs end KILLED and no later stage
    runs.
    An interrupted sweep stays restorable: Tune saves its experiment state periodically while it
    runs.
    """
    previous_env = os.environ.get(SIGINT_HANDLER_ENV)
    previous_handler = signal.getsignal(signal.SIGINT)
    os.environ[SIGINT_HANDLER_ENV] = "1"
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(SIGINT_HANDLER_ENV, None)
        else:
            os.environ[SIGINT_HANDLER_ENV] = previous_env
        # (belt and braces should a Tune version ignore the variable; only the main thread may)
        if (
            threading.current_thread() is threading.main_thread()
            and previous_handler is not None
            and signal.getsignal(signal.SIGINT) is not previous_handler
        ):
            signal.signal(signal.SIGINT, previous_handler)


def run_sweep(
    config: Config,
    manifest_uri: str,
    *,
    parent_run_id: str,
    experiment_id: str,
    sweep: str,
    storage_dir: str | Path,
) -> tuple[tune.ResultGrid, bool]:
    """Fit a new sweep, or restore ``<storage_dir>/<sweep>`` when an interrupted one exists.

    Returns (results, restored)."""
    tu = config.tune
    storage_dir = Path(storage_dir).resolve()
    storage_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial,
            base_config=config,
            manifest_uri=manifest_uri,
            parent_run_id=parent_run_id,
            experiment_id=experiment_id,
            sweep=sweep,
        ),
        {"cpu": tu.trial_driver_cpus},
    )
    path = storage_dir / sweep
    if tune.Tuner.can_restore(str(path)):
        print(f"[tune] restoring interrupted sweep {path}", flush=True)
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_unfinished=True, restart_errored=True
        )
        with signals_stop_the_sweep():
            return tuner.fit(), True
    concurrency = max_concurrent_trials(config, ray.available_resources())
    print(
        f"[tune] {tu.num_samples} trials, {concurrency} at a time, search={tu.search_alg}, "
        f"scheduler={tu.scheduler}, dir={path}",
        flush=True,
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(tu.search_space),
        tune_config=tune.TuneConfig(
            metric=tu.metric,
            mode=tu.mode,
            num_samples=tu.num_samples,
            search_alg=_search_alg(config, concurrency),
            scheduler=_scheduler(config),
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=sweep,
            storage_path=str(storage_dir),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with signals_stop_the_sweep():
        return tuner.fit(), False


def _plain(value: Any) -> Any:
    """numpy scalars (from the search algorithms) -> Python numbers, so JSON and the schema accept
    them."""
    return value.item() if hasattr(value, "item") else value


def _trial_id(result) -> str:
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return str(trial_id)
    # A trial that failed before its first report has no metrics; its directory name holds the id.
    parts = Path(result.path).name.split("_")
    return "_".join(parts[1:3]) if len(parts) > 2 else Path(result.path).name


def close_trial_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str, sweep: str, grid, config: Config
) -> list[dict[str, Any]]:
    """Final status of each trial run (completed / stopped early / errored) and the summary rows."""
    tu = config.tune
    runs = {
        r.data.tags.get(TRIAL_TAG): r
        for r in client.search_runs(
            [experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'", max_results=1000
        )
    }
    rows = []
    for result in grid:
        trial_id = _trial_id(result)
        metrics = result.metrics or {}
        run = runs.get(trial_id)
        steps = int(metrics.get("step", 0) or 0)
        if result.error is not None:
            status = ERRORED
        elif (
            run and run.data.tags.get(TRIAL_STATUS_TAG) == COMPLETED
        ) or steps >= tu.trial_max_steps:
            status = COMPLETED
        else:
            status = STOPPED_EARLY
        sampled = {k: _plain(v) for k, v in (result.config or {}).items() if k in tu.search_space}
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "status": status,
            "steps": steps,
            tu.metric: metrics.get(tu.metric, float("nan")),
            "evals": metrics.get("training_iteration", 0),
            **{f"param.{k}": v for k, v in sampled.items()},
            "run_id": run.info.run_id if run else "",
        }
        rows.append(row)
        if run is None:
            continue
        run_id = run.info.run_id
        # A restored sweep's finished trials keep their runs: move them under this stage run.
        mlflow_utils.set_tags(
            client, run_id, {"mlflow.parentRunId": parent_run_id, TRIAL_STATUS_TAG: status}
        )
        if result.error is not None:
            client.log_text(run_id, f"{type(result.error).__name__}: {result.error}", "error.txt")
        if run.info.status != _MLFLOW_STATUS[status]:
            client.set_terminated(run_id, _MLFLOW_STATUS[status])
    return rows


def disabled_outputs(config: Config) -> TuneOutputs:
    return TuneOutputs(
        enabled=False,
        metric=config.tune.metric,
        best_params={},
        best_metric=float("nan"),
        best_trial_run_id="",
        num_trials=0,
        num_completed=0,
        num_stopped_early=0,
        num_errored=0,
        sweep_dir="",
    )


def end_open_trial_runs(client: MlflowClient, experiment_id: str, sweep: str, status: str) -> None:
    """Trial runs still RUNNING when the sweep's driver stops (Ctrl-C, SIGTERM, an error) get
    ``status``:
    their processes die with the driver and would leave them RUNNING forever."""
    for run in client.search_runs(
        [experiment_id],
        f"tags.`{SWEEP_TAG}` = '{sweep}' and attributes.status = 'RUNNING'",
        max_results=1000,
    ):
        client.set_terminated(run.info.run_id, status)


def run(ctx: StageContext) -> TuneOutputs:
    from components.tracking.stages import final_status
    from pipelines.runtime import ensure_ray

    config, tu = ctx.config, ctx.config.tune
    prepare = ctx.input(PrepareOutputs)
    if not tu.enabled:
        ctx.set_tags({"moeops.tune": "disabled"})
        return disabled_outputs(config)
    if not tu.search_space:
        raise ValueError(
            "tune.search_space is empty: declare at least one dotted key in conf/tune/ "
            "(or use tune=off to train with the config as composed)"
        )
    ensure_ray(config)
    sweep = sweep_name(config, prepare.dataset_digest, ctx.code_digest)
    if config.force or not tu.resume:
        sweep = f"{sweep}-{ctx.run_id[:8]}"  # a fresh sweep, never a restored one
    ctx.set_tags({SWEEP_TAG: sweep})
    sweep_dir = Path(config.paths.root) / "tune" / sweep
    try:
        grid, restored = run_sweep(
            config,
            prepare.manifest_uri,
            parent_run_id=ctx.run_id,
            experiment_id=ctx.experiment_id,
            sweep=sweep,
            storage_dir=sweep_dir.parent,
        )
    except BaseException as err:
        end_open_trial_runs(ctx.client, ctx.experiment_id, sweep, final_status(err))
        raise
    ctx.set_tags({"moeops.sweep_restored": str(restored).lower()})
    rows = close_trial_runs(ctx.client, ctx.experiment_id, ctx.run_id, sweep, grid, config)

    log_params = [k for k, s in tu.search_space.items() if s.get("type") == "loguniform"]
    files = write_sweep_summary(
        rows, tu.metric, tu.mode, list(tu.search_space), log_params, ctx.work_dir / "sweep"
    )
    for path in files.values():
        ctx.log_artifact(path, "sweep")
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED_EARLY, ERRORED)}
    ctx.log_metrics({"num_trials": len(rows), **{f"trials_{k}": v for k, v in counts.items()}})

    try:
        best = grid.get_best_result(
            metric=tu.metric, mode=tu.mode, scope="last", filter_nan_and_inf=True
        )
    except RuntimeError:
        best = None
    if best is None or best.metrics is None or tu.metric not in best.metrics:
        errors = "; ".join(f"{_trial_id(r)}: {r.error}" for r in grid if r.error is not None)
        raise RuntimeError(
            f"sweep {sweep}: no trial reported {tu.metric} ({errors or 'no errors recorded'}); "
            f"see the trial runs under MLflow run {ctx.run_id}"
        )
    best_params = {k: _plain(best.config[k]) for k in tu.search_space}
    best_metric = float(best.metrics[tu.metric])
    best_run = next((r["run_id"] for r in rows if r["trial_id"] == _trial_id(best)), "")
    ctx.log_metrics({f"best_{tu.metric}": best_metric})
    ctx.set_tags({"moeops.best_trial": _trial_id(best), "moeops.best_trial_run": best_run})
    ctx.log_text(json.dumps(best_params, sort_keys=True), "sweep/best_params.json")
    return TuneOutputs(
        enabled=True,
        metric=tu.metric,
        best_params=best_params,
        best_metric=best_metric,
        best_trial_run_id=best_run,
        num_trials=len(rows),
        num_completed=counts[COMPLETED],
        num_stopped_early=counts[STOPPED_EARLY],
        num_errored=counts[ERRORED],
        sweep_dir=str(sweep_dir),
    )


SPEC = StageSpec(
    name="tune",
    config_keys=("data", "model", "train", "tune"),
    upstream=(PrepareOutputs,),
    fn=run,
    outputs=TuneOutputs,
    system_metrics=True,
)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
