"""One pipeline invocation: a parent MLflow run, the stages in order, and the closing summary."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient

from components.config import Config, flatten, to_container, to_yaml
from components.tracking import mlflow_utils
from components.tracking.progress import format_duration
from components.tracking.provenance import code_tags
from components.tracking.stages import (
    StageOutcome,
    StageSpec,
    final_status,
    resolve_upstream,
    run_stage,
)
from pipelines.runtime import cluster_tags


@dataclass
class PipelineResult:
    parent_run_id: str
    experiment_id: str
    stages: dict[str, StageOutcome]


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: unwinds like Ctrl-C so every open run ends KILLED."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def signals_end_runs() -> Iterator[None]:
    """While the pipeline runs, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread.

    The ``finally`` blocks of the stage runner then mark the stage and parent runs KILLED (a
    process stopped by ``kill``, Kubernetes or Ctrl-C must not leave runs RUNNING). A second
    signal while that cleanup runs gets the default action (stop at once).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def run_pipeline(
    config: Config, specs: list[StageSpec], entry_point: str = "pipelines.run"
) -> PipelineResult:
    client = MlflowClient(config.tracking.uri)
    # MLflow's fluent APIs used inside stages (log_model, register_model, system metrics) use
    # the process' tracking URI: this store's.
    mlflow.set_tracking_uri(config.tracking.uri)
    experiment_id = mlflow_utils.ensure_experiment(
        client, config.tracking.experiment, config.tracking.artifact_location
    )
    # Fail on missing upstream runs before any run is opened or Ray is started.
    resolve_upstream(client, experiment_id, specs[0], config, produced={})

    tags = code_tags()
    parent = client.create_run(
        experiment_id,
        run_name=config.run_name
        or f"{entry_point.split('.')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            **tags,
            "moeops.kind": "pipeline",
            "mlflow.source.name": entry_point,
            "moeops.stages": ",".join(s.name for s in specs),
        },
    )
    parent_id = parent.info.run_id
    print(
        f"[pipeline] MLflow run {parent_id} in experiment '{config.tracking.experiment}' at "
        f"{config.tracking.uri}"
        f" (pid {os.getpid()})",
        flush=True,
    )
    produced: dict[str, StageOutcome] = {}
    error: BaseException | None = None
    with signals_end_runs():
        try:
            mlflow_utils.log_params(client, parent_id, flatten(to_container(config)))
            client.log_text(parent_id, to_yaml(config), "config.yaml")
            for spec in specs:
                produced[spec.name] = run_stage(
                    spec,
                    config,
                    client=client,
                    experiment_id=experiment_id,
                    parent_run_id=parent_id,
                    produced=produced,
                    base_tags=tags,
                )
        except BaseException as err:
            error = err
            raise
        finally:
            mlflow_utils.set_tags(
                client,
                parent_id,
                {
                    **cluster_tags(),
                    "moeops.reused_stages": ",".join(n for n, o in produced.items() if o.reused)
                    or "none",
                    "moeops.run_stages": ",".join(n for n, o in produced.items() if not o.reused)
                    or "none",
                    "moeops.failed_stage": next(
                        (s.name for s in specs if s.name not in produced), ""
                    )
                    if error is not None
                    else "",
                },
            )
            client.set_terminated(parent_id, final_status(error))
    result = PipelineResult(parent_id, experiment_id, produced)
    print(summary(config, specs, result), flush=True)
    return result


def summary(config: Config, specs: list[StageSpec], result: PipelineResult) -> str:
    rows = [("stage", "status", "duration", "result", "MLflow run")]
    reasons = []
    for spec in specs:
        outcome = result.stages[spec.name]
        status = f"reused ({outcome.reused_from[:8]})" if outcome.reused else "ran"
        rows.append(
            (
                spec.name,
                status,
                format_duration(outcome.duration_s),
                outcome.outputs.headline() or "-",
                outcome.run_id,
            )
        )
        if not outcome.reused:
            reasons.append(f"  {spec.name} ran: {outcome.reason}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", "moeops pipeline summary"]
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines += ["", "why stages ran:", *reasons] if reasons else []
    lines.append("")
    register = result.stages.get("register")
    if register:
        out = register.outputs
        lines.append(
            f"  registered model: {out.model_name} version {out.model_version} from "
            f"models:/{out.model_id} (aliases: {', '.join(out.aliases) or '-'}; promoted: "
            f"{str(out.promoted).lower()})"
        )
        lines.append(f"  {'promoted' if out.promoted else 'not promoted'} because: {out.why()}")
    deploy = result.stages.get("deploy")
    if deploy:
        lines.append(
            f"  endpoint: {deploy.outputs.endpoint} (model version {deploy.outputs.model_version})"
        )
    lines.append(f"  parent run: {result.parent_run_id}")
    lines.append(f"  MLflow UI: {ui_command(config.tracking.uri)}")
    return "\n".join(lines)


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
