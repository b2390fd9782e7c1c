"""The stage runner against a real `mlflow server` process (tracking=server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from mlflow import MlflowClient

from components.config import load_config
from components.tracking.outputs import StageOutputs
from components.tracking.stages import StageSpec, outputs_of_run
from pipelines.pipeline import run_pipeline


@dataclass(frozen=True)
class Prepared(StageOutputs):
    stage: ClassVar[str] = "prepare"
    manifest_uri: str
    rows: int
    fraction: float


def prepare_fn(ctx):
    ctx.log_metrics({"rows": 3.0}, step=0)
    (ctx.work_dir / "note.txt").write_text("artifact through the server's proxy")
    ctx.log_artifact(ctx.work_dir / "note.txt")
    return Prepared(manifest_uri="file:///nowhere", rows=3, fraction=0.5)


@pytest.mark.integration
def test_pipeline_against_mlflow_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    config = load_config(["tracking=server", f"paths.root={tmp_path}", "experiment=tiny"])
    assert config.tracking.uri == mlflow_server
    spec = StageSpec("prepare", ("data",), (), prepare_fn, Prepared)
    first = run_pipeline(config, [spec])
    second = run_pipeline(config, [spec])
    assert second.stages["prepare"].reused

    client = MlflowClient(mlflow_server)
    run = client.get_run(first.stages["prepare"].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert run.data.metrics["rows"] == 3.0
    assert {"note.txt", "outputs.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # typed outputs round-trip through the server's artifact proxy too
    assert outputs_of_run(client, run.info.run_id, Prepared) == Prepared("file:///nowhere", 3, 0.5)
