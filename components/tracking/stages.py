"""The stage runner: one nested MLflow run per stage, step caching, timing and lineage.

A stage is a function ``StageContext -> outputs`` plus what it depends on. The runner owns
everything around it: finding upstream outputs (in this invocation, an explicit run id, or the
latest finished run), the cache key, reusing a finished run with the same key, the nested run's
params/tags/status/duration, and recording outputs so the next stage (or a later invocation)
finds them.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow import MlflowClient
from mlflow.entities import RunStatus

import components
from components.config import Config, flatten, to_container
from components.tracking import mlflow_utils
from components.tracking.progress import Progress

OUT_PREFIX = "moeops.out."
STAGE_TAG = "moeops.stage"
CACHE_TAG = "moeops.cache_key"


class StageInputError(RuntimeError):
    """An upstream stage's outputs cannot be found; says how to provide them."""


@dataclass
class StageSpec:
    name: str
    # config sections (or dotted keys) whose values change this stage's outputs
    config_keys: tuple[str, ...]
    # stages whose outputs this one reads; a callable picks them from the config
    upstream: tuple[str, ...] | Callable[[Config], tuple[str, ...]]
    fn: Callable[["StageContext"], dict[str, str]]
    # output shown in the summary table
    key_output: str = ""
    # a cached run is reused only while this still holds (e.g. its files or endpoint exist)
    still_valid: Callable[[Config, dict[str, str]], bool] | None = None

    def upstream_for(self, config: Config) -> tuple[str, ...]:
        return self.upstream(config) if callable(self.upstream) else self.upstream


@dataclass
class StageOutcome:
    name: str
    run_id: str
    outputs: dict[str, str]
    reused: bool
    duration_s: float
    reused_from: str = ""


@dataclass
class StageContext:
    name: str
    config: Config
    config_dict: dict[str, Any]
    run_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    client: MlflowClient
    inputs: dict[str, dict[str, str]]
    work_dir: Path
    input_run_ids: dict[str, str] = field(default_factory=dict)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow_utils.log_metrics(self.client, self.run_id, metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow_utils.log_params(self.client, self.run_id, flatten(params))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow_utils.set_tags(self.client, self.run_id, tags)

    def progress(self, total: int, unit: str = "step") -> Progress:
        return Progress(self.name, total, unit)


def digest_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def select_config(config_dict: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    selected: dict[str, Any] = {}
    for key in keys:
        node: Any = config_dict
        for part in key.split("."):
            node = node[part]
        selected[key] = node
    return selected


def cache_key(spec: StageSpec, config_dict: dict[str, Any], upstream: dict[str, dict[str, str]]) -> str:
    """Same stage code version, relevant config and upstream digests -> same key."""
    return digest_of(
        {
            "stage": spec.name,
            "version": components.__version__,
            "config": select_config(config_dict, spec.config_keys),
            "inputs": {name: output_digest(outputs) for name, outputs in sorted(upstream.items())},
        }
    )


def output_digest(outputs: dict[str, str]) -> str:
    return outputs.get("digest") or digest_of(outputs)


def outputs_of_run(client: MlflowClient, run_id: str) -> dict[str, str]:
    tags = client.get_run(run_id).data.tags
    return {k[len(OUT_PREFIX):]: v for k, v in tags.items() if k.startswith(OUT_PREFIX)}


def parse_run_ref(ref: str) -> str:
    """``<run_id>`` or ``runs:/<run_id>[/path]`` -> run id."""
    if ref.startswith("runs:/"):
        return ref[len("runs:/"):].strip("/").split("/")[0]
    return ref.strip()


def latest_finished_run(client: MlflowClient, experiment_id: str, stage: str, cache: str | None = None):
    query = f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'"
    if cache:
        query += f" and tags.`{CACHE_TAG}` = '{cache}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def resolve_upstream(
    client: MlflowClient,
    experiment_id: str,
    spec: StageSpec,
    config: Config,
    produced: dict[str, StageOutcome],
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Upstream outputs: from this invocation, ``inputs.<stage>=<run>``, or the latest finished run."""
    inputs: dict[str, dict[str, str]] = {}
    run_ids: dict[str, str] = {}
    for name in spec.upstream_for(config):
        if name in produced:
            inputs[name], run_ids[name] = produced[name].outputs, produced[name].run_id
            continue
        ref = config.inputs.get(name)
        if ref:
            run_id = parse_run_ref(ref)
            try:
                run = client.get_run(run_id)
            except Exception as err:
                raise StageInputError(f"inputs.{name}={ref!r}: no such MLflow run ({err})") from None
            if run.data.tags.get(STAGE_TAG) != name or run.info.status != "FINISHED":
                raise StageInputError(
                    f"inputs.{name}={ref!r}: run {run_id} is not a finished '{name}' stage run "
                    f"(stage={run.data.tags.get(STAGE_TAG)!r}, status={run.info.status})"
                )
        else:
            run = latest_finished_run(client, experiment_id, name)
            if run is None:
                raise StageInputError(
                    f"stage '{spec.name}' needs the outputs of stage '{name}', and the experiment has no "
                    f"finished '{name}' run: run `python -m pipelines.{name}` first, run the whole "
                    f"pipeline with `python -m pipelines.run`, or pass +inputs.{name}=<run id>"
                )
        inputs[name] = outputs_of_run(client, run.info.run_id)
        run_ids[name] = run.info.run_id
    return inputs, run_ids


def _start_nested_run(client, experiment_id, parent_run_id, name, tags) -> str:
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, STAGE_TAG: name, **tags},
    )
    return run.info.run_id


def _record_outputs(client: MlflowClient, run_id: str, outputs: dict[str, str]) -> None:
    mlflow_utils.set_tags(client, run_id, {OUT_PREFIX + k: v for k, v in outputs.items()})
    client.log_dict(run_id, outputs, "outputs.json")


def run_stage(
    spec: StageSpec,
    config: Config,
    *,
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    produced: dict[str, StageOutcome],
    base_tags: dict[str, str],
) -> StageOutcome:
    config_dict = to_container(config)
    inputs, input_run_ids = resolve_upstream(client, experiment_id, spec, config, produced)
    key = cache_key(spec, config_dict, inputs)
    lineage_tags = {f"moeops.in.{name}": run_id for name, run_id in input_run_ids.items()}
    started = time.monotonic()

    cached = None if config.force else latest_finished_run(client, experiment_id, spec.name, key)
    if cached is not None:
        outputs = outputs_of_run(client, cached.info.run_id)
        if spec.still_valid is None or spec.still_valid(config, outputs):
            source = cached.data.tags.get("moeops.reused_from") or cached.info.run_id
            run_id = _start_nested_run(
                client, experiment_id, parent_run_id, spec.name,
                {**base_tags, **lineage_tags, CACHE_TAG: key, "moeops.reused": "true", "moeops.reused_from": source},
            )
            _record_outputs(client, run_id, outputs)
            duration = time.monotonic() - started
            mlflow_utils.set_tags(client, run_id, {"moeops.duration_s": f"{duration:.2f}"})
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
            print(f"[{spec.name}] reused run {source} (same inputs and config; force=true reruns)", flush=True)
            return StageOutcome(spec.name, run_id, outputs, True, duration, source)

    run_id = _start_nested_run(
        client, experiment_id, parent_run_id, spec.name,
        {**base_tags, **lineage_tags, CACHE_TAG: key, "moeops.reused": "false"},
    )
    mlflow_utils.log_params(client, run_id, flatten(select_config(config_dict, spec.config_keys)))
    work_dir = Path(config.paths.root) / "stages" / spec.name / run_id
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name=spec.name, config=config, config_dict=config_dict, run_id=run_id,
        parent_run_id=parent_run_id, experiment_id=experiment_id,
        tracking_uri=config.tracking.uri, client=client, inputs=inputs,
        work_dir=work_dir, input_run_ids=input_run_ids,
    )
    print(f"[{spec.name}] started (MLflow run {run_id})", flush=True)
    status = RunStatus.FAILED
    try:
        outputs = {k: str(v) for k, v in spec.fn(ctx).items()}
        _record_outputs(client, run_id, outputs)
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        raise
    finally:
        duration = time.monotonic() - started
        mlflow_utils.set_tags(client, run_id, {"moeops.duration_s": f"{duration:.2f}"})
        mlflow_utils.log_metrics(client, run_id, {"stage_duration_s": duration})
        client.set_terminated(run_id, RunStatus.to_string(status))
    print(f"[{spec.name}] finished in {duration:.1f}s", flush=True)
    return StageOutcome(spec.name, run_id, outputs, False, duration)
