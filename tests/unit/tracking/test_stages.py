"""The stage runner against a real sqlite MLflow store: nesting, lineage, caching, failures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from mlflow import MlflowClient

from components.config import load_config
from components.tracking.outputs import StageOutputs
from components.tracking.stages import StageInputError, StageSpec, digest_of
from pipelines.pipeline import run_pipeline

CALLS: list[str] = []


@dataclass(frozen=True)
class FakePrepared(StageOutputs):
    stage: ClassVar[str] = "prepare"
    digest: str
    manifest_uri: str

    def cache_digest(self) -> str:
        return self.digest


@dataclass(frozen=True)
class FakeTrained(StageOutputs):
    stage: ClassVar[str] = "train"
    val_loss: float
    model_uri: str
    manifest_uri: str


def prepare_fn(ctx):
    CALLS.append("prepare")
    text = f"rows={ctx.config.data.max_files}"
    ctx.log_metrics({"rows": ctx.config.data.max_files})
    return FakePrepared(
        digest=digest_of(text), manifest_uri=f"{ctx.config.paths.root}/manifest.json"
    )


def train_fn(ctx):
    CALLS.append("train")
    manifest = ctx.input(FakePrepared).manifest_uri
    return FakeTrained(
        val_loss=1.0 / ctx.config.train.lr,
        model_uri=f"runs:/{ctx.run_id}/export",
        manifest_uri=manifest,
    )


def failing_fn(ctx):
    raise RuntimeError("boom in the stage")


PREPARE = StageSpec("prepare", ("data",), (), prepare_fn, FakePrepared)
TRAIN = StageSpec("train", ("model", "train"), (FakePrepared,), train_fn, FakeTrained)


@pytest.fixture
def base(root_overrides):
    CALLS.clear()
    return root_overrides + ["experiment=tiny"]


def runs_by_stage(uri: str, parent_id: str) -> dict[str, object]:
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {r.data.tags["moeops.stage"]: r for r in runs}


def test_nested_runs_params_and_outputs(base, mlflow_uri):
    config = load_config(base)
    result = run_pipeline(config, [PREPARE, TRAIN])
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.top_k"] == str(config.model.top_k)
    assert parent.data.params["train.overlap.a2a_chunks"] == str(config.train.overlap.a2a_chunks)
    assert "mlflow.source.git.commit" in parent.data.tags and parent.data.tags["moeops.version"]
    assert parent.data.tags["moeops.reused_stages"] == "none"
    assert "config.yaml" in [a.path for a in client.list_artifacts(result.parent_run_id)]
    # the MLflow UI opens this experiment on model training, not on its GenAI view
    experiment = client.get_experiment(result.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    stages = runs_by_stage(mlflow_uri, result.parent_run_id)
    assert set(stages) == {"prepare", "train"}
    train = stages["train"]
    assert train.info.status == "FINISHED"
    assert train.data.tags["moeops.in.prepare"] == stages["prepare"].info.run_id
    assert train.data.tags["moeops.out.manifest_uri"].endswith("manifest.json")
    assert "train.lr" in train.data.params and "data.max_files" not in train.data.params
    assert float(train.data.tags["moeops.duration_s"]) >= 0
    outputs = json.loads(open(client.download_artifacts(train.info.run_id, "outputs.json")).read())
    assert outputs["model_uri"] == f"runs:/{train.info.run_id}/export"


def test_second_run_reuses_and_force_reruns(base, mlflow_uri):
    run_pipeline(load_config(base), [PREPARE, TRAIN])
    assert CALLS == ["prepare", "train"]
    second = run_pipeline(load_config(base), [PREPARE, TRAIN])
    assert CALLS == ["prepare", "train"], "nothing recomputed"
    assert all(o.reused for o in second.stages.values())
    parent = MlflowClient(mlflow_uri).get_run(second.parent_run_id)
    assert parent.data.tags["moeops.reused_stages"] == "prepare,train"
    assert (
        runs_by_stage(mlflow_uri, second.parent_run_id)["train"].data.tags["moeops.reused"]
        == "true"
    )

    run_pipeline(load_config(base + ["force=true"]), [PREPARE, TRAIN])
    assert CALLS == ["prepare", "train"] * 2


def test_changed_upstream_invalidates_downstream(base, capsys):
    first = run_pipeline(load_config(base), [PREPARE, TRAIN])
    assert {o.reason for o in first.stages.values()} == {"no earlier run"}
    lr = run_pipeline(load_config(base + ["train.lr=0.001"]), [PREPARE, TRAIN])
    assert CALLS == ["prepare", "train", "train"], "only train's config changed"
    assert lr.stages["train"].reason == "config changed (train.lr)"
    assert "train ran: config changed (train.lr)" in capsys.readouterr().out, "the summary says why"
    data = run_pipeline(
        load_config(base + ["train.lr=0.001", "data.max_files=7"]), [PREPARE, TRAIN]
    )
    assert CALLS[-2:] == ["prepare", "train"], "new data digest reruns train"
    assert data.stages["prepare"].reason == "config changed (data.max_files)"
    assert data.stages["train"].reason == "input changed (prepare)"
    forced = run_pipeline(load_config(base + ["force=true"]), [PREPARE, TRAIN])
    assert {o.reason for o in forced.stages.values()} == {"forced (force=true)"}


def test_standalone_stage_takes_latest_or_explicit_upstream(base, mlflow_uri):
    first = run_pipeline(load_config(base), [PREPARE])
    run_pipeline(load_config(base + ["data.max_files=9"]), [PREPARE])
    latest = run_pipeline(load_config(base), [TRAIN])
    stages = runs_by_stage(mlflow_uri, latest.parent_run_id)
    prepare_runs = MlflowClient(mlflow_uri).search_runs(
        [latest.experiment_id],
        "tags.`moeops.stage` = 'prepare'",
        order_by=["attributes.start_time DESC"],
    )
    assert stages["train"].data.tags["moeops.in.prepare"] == prepare_runs[0].info.run_id

    explicit_id = first.stages["prepare"].run_id
    pinned = run_pipeline(load_config(base + [f"+inputs.prepare=runs:/{explicit_id}"]), [TRAIN])
    assert (
        runs_by_stage(mlflow_uri, pinned.parent_run_id)["train"].data.tags["moeops.in.prepare"]
        == explicit_id
    )


def test_missing_upstream_is_a_clear_error_before_any_run(base, mlflow_uri):
    with pytest.raises(StageInputError, match="python -m pipelines.prepare"):
        run_pipeline(load_config(base), [TRAIN])
    client = MlflowClient(mlflow_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    with pytest.raises(StageInputError, match="no such MLflow run"):
        run_pipeline(load_config(base + ["+inputs.prepare=deadbeef"]), [TRAIN])


def test_failed_stage_marks_runs_failed(base, mlflow_uri):
    broken = StageSpec("train", ("train",), (FakePrepared,), failing_fn, FakeTrained)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(load_config(base), [PREPARE, broken])
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_kind = {r.data.tags.get("moeops.stage", "parent"): r for r in runs}
    assert by_kind["train"].info.status == "FAILED"
    assert by_kind["parent"].info.status == "FAILED"
    assert by_kind["parent"].data.tags["moeops.failed_stage"] == "train"
    assert "error.txt" in [a.path for a in client.list_artifacts(by_kind["train"].info.run_id)]
    # A failed run is never reused.
    run_pipeline(load_config(base), [PREPARE, TRAIN])
    assert CALLS[-1] == "train"
