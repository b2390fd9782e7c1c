"""The prepare stage end to end: Ray tasks, the cold tier (local and S3), MLflow lineage."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from mlflow import MlflowClient

from components.config import load_config
from components.data.build import prepare_dataset
from components.data.manifest import load_manifest
from components.data.tokenizer import TextTokenizer
from pipelines.pipeline import run_pipeline
from pipelines.prepare import SPEC

pytestmark = pytest.mark.integration

SMALL = [
    "experiment=tiny",
    "data.max_files=16",
    "data.max_bytes=150000",
    "data.vocab_size=400",
    "data.seq_len=32",
    "data.rows_per_shard=128",
]


def test_prepare_stage_logs_lineage_and_matches_the_serial_build(
    ray_session, root_overrides, tmp_path
):
    config = load_config(root_overrides + SMALL)
    result = run_pipeline(config, [SPEC], entry_point="pipelines.prepare")
    outcome = result.stages["prepare"]
    out = outcome.outputs
    assert out.manifest_uri and out.dataset_digest and out.tokenizer_uri and out.tokenizer_hash
    assert out.seq_len == 32 and out.vocab_size > 0 and out.train_rows > 0 and out.val_rows > 0
    m = load_manifest(out.manifest_uri, config.storage)
    assert m.dataset_digest == out.dataset_digest and m.rows("train") == out.train_rows
    assert TextTokenizer.load(out.tokenizer_uri).digest == out.tokenizer_hash

    # Ray fan-out and an in-process build agree byte for byte
    serial = prepare_dataset(
        config.data, replace(config.storage, cold_uri=str(tmp_path / "serial-cold"))
    )
    assert serial.manifest.dataset_digest == out.dataset_digest

    client = MlflowClient(config.tracking.uri)
    run = client.get_run(outcome.run_id)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == out.dataset_digest[:32]
    assert {t.key: t.value for t in inputs[0].tags}["moeops.dataset_digest"] == out.dataset_digest
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "tokenizer")}
    assert "tokenizer/tokenizer.json" in artifacts
    assert run.data.metrics["train_rows"] == float(out.train_rows)

    # the same config again: the runner reuses the finished run (its manifest still exists)
    again = run_pipeline(config, [SPEC], entry_point="pipelines.prepare").stages["prepare"]
    assert again.reused and again.outputs.dataset_digest == out.dataset_digest
    # ... but not once the dataset is gone from the cold tier
    os.unlink(m.uri)
    rerun = run_pipeline(config, [SPEC], entry_point="pipelines.prepare").stages["prepare"]
    assert not rerun.reused and rerun.outputs.dataset_digest == out.dataset_digest


def test_prepare_stage_writes_to_s3(ray_session, root_overrides, s3_server):
    config = load_config(root_overrides + SMALL + s3_server.overrides("stage-test"))
    out = run_pipeline(config, [SPEC], entry_point="pipelines.prepare").stages["prepare"].outputs
    assert out.manifest_uri.startswith("s3://moeops/stage-test/")
    m = load_manifest(out.manifest_uri, config.storage)
    assert m.dataset_digest == out.dataset_digest
