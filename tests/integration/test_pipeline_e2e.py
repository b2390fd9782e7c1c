"""The whole pipeline on the tiny experiment with local Ray: every stage for real, then again
with every stage reused."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from components.config import load_config
from fixtures.tiny import SMALL
from pipelines.pipeline import run_pipeline
from pipelines.run import selected_specs

pytestmark = pytest.mark.integration

STAGES = ["prepare", "tune", "train", "evaluate", "register", "deploy"]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


def live_placement_groups() -> list[str]:
    from ray.util import placement_group_table

    return [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]


def wait_for_no_placement_groups(timeout_s: float = 30.0) -> list[str]:
    """Train runs (finished, or stopped early by ASHA) must give their CPUs back."""
    deadline = time.monotonic() + timeout_s
    while (live := live_placement_groups()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return live


def test_full_pipeline_then_fully_cached(ray_session, root_overrides, mlflow_uri, serve_port):
    # the smallest data and model (fixtures/tiny.py), one sweep trial and no dense baseline: every
    # stage still runs for real, expert-parallel on two workers (the sweep and the dense
    # comparison are tested in depth in tests/integration/sweep/)
    config = load_config(
        root_overrides
        + [
            *SMALL,
            f"serve.port={serve_port}",
            "tune.num_samples=1",
            "evaluate.compare_dense=false",
            # a third of tiny's training steps: an evaluation and a checkpoint still come at 5
            "train.max_steps=10",
            "train.warmup_steps=2",
            "train.eval_every=5",
            "train.checkpoint_every=5",
        ]
    )
    assert config.stages == STAGES
    first = run_pipeline(config, selected_specs(config))

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.num_experts"] == str(config.model.num_experts)
    assert "moeops.ray.resources" in parent.data.tags

    children = client.search_runs(
        [first.experiment_id], f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'"
    )
    by_stage = {run.data.tags["moeops.stage"]: run for run in children}
    assert sorted(by_stage) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children)

    tune_run = by_stage["tune"]
    trials = client.search_runs(
        [first.experiment_id], f"tags.`mlflow.parentRunId` = '{tune_run.info.run_id}'"
    )
    assert len(trials) == config.tune.num_samples
    assert all(
        "train.lr" in trial.data.params and "val_loss" in trial.data.metrics for trial in trials
    )

    # the train run carries the data-flow report; its per-step fingerprints compare with themselves
    from tools.flow_diff import main as flow_diff

    train_run_id = by_stage["train"].info.run_id
    assert flow_diff([train_run_id, train_run_id, "--tracking-uri", mlflow_uri]) == 0

    register = first.stages["register"].outputs
    version = client.get_model_version(register.model_name, register.model_version)
    assert config.registry.challenger_alias in version.aliases
    assert version.tags["dataset_digest"] == first.stages["prepare"].outputs.dataset_digest
    assert version.source == first.stages["train"].outputs.model_uri

    endpoint = first.stages["deploy"].outputs.endpoint
    assert endpoint == f"http://127.0.0.1:{serve_port}"
    completion = post_json(
        f"{endpoint}/v1/completions", {"prompt": "def ", "max_tokens": 4, "seed": 1}
    )
    assert (
        completion["choices"][0]["text"] is not None
        and completion["usage"]["completion_tokens"] >= 1
    )

    assert wait_for_no_placement_groups() == [], "a training run left its placement group behind"

    second = run_pipeline(config, selected_specs(config))
    assert all(outcome.reused for outcome in second.stages.values()), {
        name: outcome.reused for name, outcome in second.stages.items()
    }
    assert client.get_run(second.parent_run_id).data.tags["moeops.reused_stages"] == ",".join(
        STAGES
    )
