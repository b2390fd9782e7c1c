"""Small, explicit MLflow helpers: always a client and a run id, never global fluent state,
so the same code works on the driver, in Ray workers and in Serve replicas."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_CHARS = 6000


def param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_params(client: MlflowClient, run_id: str, flat_params: dict[str, Any]) -> None:
    """Flattened (dotted) params in batches; existing keys with the same value are skipped so
    a retried stage or trial does not fail on MLflow's immutable params."""
    existing = client.get_run(run_id).data.params
    params = [
        Param(key, param_value(value)) for key, value in flat_params.items() if key not in existing
    ]
    for batch in _chunks(params, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=batch)


def log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    now = int(time.time() * 1000)
    items = [
        Metric(key, float(value), now, int(step or 0))
        for key, value in metrics.items()
        if value is not None
    ]
    for batch in _chunks(items, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    items = [RunTag(key, str(value)) for key, value in tags.items()]
    for batch in _chunks(items, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=batch)


# What the MLflow UI (3.x) reads to open an experiment on model training rather than its GenAI
# view (traces, sessions, judges); the UI itself writes this tag when a user picks a type.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str = "") -> str:
    """The experiment's id, created if missing; tagged as model development unless a kind is set
    (one chosen in the UI stays)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location or None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except Exception:
            # Another process created it first (parallel trials or jobs).
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id
