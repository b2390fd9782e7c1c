"""One pipeline invocation: a parent MLflow run, the stages in order, and the closing summary."""
from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from components.config import Config, flatten, to_container, to_yaml
from components.tracking import mlflow_utils
from components.tracking.progress import format_duration
from components.tracking.provenance import code_tags
from components.tracking.stages import StageOutcome, StageSpec, resolve_upstream, run_stage
from pipelines.runtime import cluster_tags


@dataclass
class PipelineResult:
    parent_run_id: str
    experiment_id: str
    stages: dict[str, StageOutcome]


def run_pipeline(config: Config, specs: list[StageSpec], entry_point: str = "pipelines.run") -> PipelineResult:
    client = MlflowClient(config.tracking.uri)
    # Fluent-API users inside stages (mlflow.data, log_model) see the same store.
    mlflow.set_tracking_uri(config.tracking.uri)
    experiment_id = mlflow_utils.ensure_experiment(
        client, config.tracking.experiment, config.tracking.artifact_location
    )
    # Fail on missing upstream runs before any run is opened or Ray is started.
    resolve_upstream(client, experiment_id, specs[0], config, produced={})

    tags = code_tags()
    parent = client.create_run(
        experiment_id,
        run_name=config.run_name or f"{entry_point.split('.')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={**tags, "moeops.kind": "pipeline", "mlflow.source.name": entry_point,
              "moeops.stages": ",".join(s.name for s in specs)},
    )
    parent_id = parent.info.run_id
    print(f"[pipeline] MLflow run {parent_id} in experiment '{config.tracking.experiment}' at {config.tracking.uri}", flush=True)
    mlflow_utils.log_params(client, parent_id, flatten(to_container(config)))
    client.log_text(parent_id, to_yaml(config), "config.yaml")

    produced: dict[str, StageOutcome] = {}
    status = RunStatus.FAILED
    try:
        for spec in specs:
            produced[spec.name] = run_stage(
                spec, config, client=client, experiment_id=experiment_id,
                parent_run_id=parent_id, produced=produced, base_tags=tags,
            )
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:
        reused = [name for name, outcome in produced.items() if outcome.reused]
        mlflow_utils.set_tags(client, parent_id, {
            **cluster_tags(),
            "moeops.reused_stages": ",".join(reused) or "none",
            "moeops.run_stages": ",".join(n for n, o in produced.items() if not o.reused) or "none",
            "moeops.failed_stage": next((s.name for s in specs if s.name not in produced), "")
            if status != RunStatus.FINISHED else "",
        })
        client.set_terminated(parent_id, RunStatus.to_string(status))
    result = PipelineResult(parent_id, experiment_id, produced)
    print(summary(config, specs, result), flush=True)
    return result


def summary(config: Config, specs: list[StageSpec], result: PipelineResult) -> str:
    rows = [("stage", "status", "duration", "key metric", "MLflow run")]
    for spec in specs:
        outcome = result.stages[spec.name]
        key = spec.key_output
        value = outcome.outputs.get(key, "-")
        metric = f"{key}={value[:16] + '…' if len(value) > 24 else value}" if key else "-"
        status = f"reused ({outcome.reused_from[:8]})" if outcome.reused else "ran"
        rows.append((spec.name, status, format_duration(outcome.duration_s), metric, outcome.run_id))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", "moeops pipeline summary"]
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    register = result.stages.get("register")
    if register:
        out = register.outputs
        lines.append(f"  registered model: {out.get('model_name')} version {out.get('model_version')} "
                     f"(aliases: {out.get('alias', '-')}; promoted: {out.get('promoted', '-')})")
    deploy = result.stages.get("deploy")
    if deploy:
        lines.append(f"  endpoint: {deploy.outputs.get('endpoint')} (model version {deploy.outputs.get('model_version', '-')})")
    lines.append(f"  parent run: {result.parent_run_id}")
    lines.append(f"  MLflow UI: {ui_command(config.tracking.uri)}")
    return "\n".join(lines)


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
