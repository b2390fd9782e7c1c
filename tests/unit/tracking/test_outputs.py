"""Typed stage outputs: every stage's dataclass round-trips through a real MLflow store with its
types."""

from __future__ import annotations

import dataclasses
import math

import pytest
from mlflow import MlflowClient

from components.tracking.outputs import OutputsError
from components.tracking.stages import StageInputError, outputs_of_run, record_outputs
from pipelines.outputs import (
    DeployOutputs,
    EvaluateOutputs,
    PrepareOutputs,
    RegisterOutputs,
    TrainOutputs,
    TuneOutputs,
)

NAN = float("nan")
EXAMPLES = [
    PrepareOutputs(
        manifest_uri="s3://b/d/manifest.json",
        dataset_digest="a" * 64,
        tokenizer_uri="s3://b/d/t.json",
        tokenizer_hash="t" * 16,
        vocab_size=1024,
        seq_len=64,
        train_rows=900,
        val_rows=50,
    ),
    TuneOutputs(
        enabled=True,
        metric="val_loss",
        best_params={"train.lr": 0.003, "model.top_k": 1, "model.dropless": True},
        best_metric=4.25,
        best_trial_run_id="r1",
        num_trials=2,
        num_completed=1,
        num_stopped_early=1,
        num_errored=0,
        sweep_dir="/x/tune/sweep-1",
    ),
    TrainOutputs(
        model_id="m-1",
        model_digest="w" * 64,
        export_dir="/x/export",
        checkpoint_uri="/x/ckpt",
        tuned_params={"train.lr": 0.003},
        steps=30,
        val_loss=4.0,
        train_loss=3.9,
        tokens_per_s=1200.5,
        moe_dropped_fraction=0.02,
        moe_load_max_over_mean=1.4,
        comm_exposed_fraction=NAN,
    ),
    EvaluateOutputs(
        report_uri="runs:/r/evaluation/report.json",
        model_digest="w" * 64,
        dataset_digest="a" * 64,
        val_loss=4.0,
        perplexity=54.6,
        generation_tokens_per_s=300.0,
        dense_val_loss=4.2,
        champion_version="",
        champion_val_loss=NAN,
        champion_perplexity=NAN,
        champion_generation_tokens_per_s=NAN,
    ),
    RegisterOutputs(
        model_name="moeops-moe",
        model_version="3",
        model_id="m-1",
        aliases=["challenger", "champion"],
        promoted=True,
        reason="promoted: ...",
        previous_champion="2",
    ),
    DeployOutputs(
        endpoint="http://127.0.0.1:8000",
        model_uri="models:/moeops-moe@champion",
        model_version="3",
        serve_config_path="/x/serve_config.yaml",
    ),
]


def same(a, b) -> bool:
    """Equal, NaN included, and of the same type field by field."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if type(x) is not type(y):
            return False
        if isinstance(x, float) and math.isnan(x):
            if not math.isnan(y):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_mlflow_store) -> MlflowClient:
    """One sqlite store for this module (a copy of the session's empty one)."""
    client = MlflowClient(new_mlflow_store(tmp_path_factory.mktemp("outputs") / "mlflow.db"))
    client.create_experiment("outputs")
    return client


@pytest.fixture
def run_id(store):
    return store, store.create_run(
        store.get_experiment_by_name("outputs").experiment_id
    ).info.run_id


@pytest.mark.parametrize("outputs", EXAMPLES, ids=lambda o: o.stage)
def test_outputs_round_trip_through_mlflow_with_their_types(outputs, run_id):
    client, run = run_id
    record_outputs(client, run, outputs)
    loaded = outputs_of_run(client, run, type(outputs))
    assert same(loaded, outputs), (loaded, outputs)
    # readable in the UI and searchable, one tag per field
    tags = client.get_run(run).data.tags
    assert all(f"moeops.out.{f.name}" in tags for f in dataclasses.fields(outputs))


def test_no_duplicate_keys_and_digests_are_content_digests():
    for outputs in EXAMPLES:
        names = [f.name for f in dataclasses.fields(outputs)]
        assert "digest" not in names and "checkpoint_path" not in names
    prepare, _, train, *_ = EXAMPLES
    assert (
        prepare.cache_digest() == prepare.dataset_digest
        and train.cache_digest() == train.model_digest
    )
    assert train.model_uri == "models:/m-1"
    assert "dropped=2.0%" in train.headline() and "load max/mean=1.40" in train.headline()


def test_wrong_or_missing_fields_are_named():
    good = EXAMPLES[0].to_json()
    with pytest.raises(OutputsError, match=r"PrepareOutputs.vocab_size='1024': expected int"):
        PrepareOutputs.from_json({**good, "vocab_size": "1024"})
    with pytest.raises(OutputsError, match=r"missing: \['seq_len'\]"):
        PrepareOutputs.from_json({k: v for k, v in good.items() if k != "seq_len"})
    with pytest.raises(
        OutputsError, match=r"TuneOutputs.best_params='{}': expected dict\[str, Any\]"
    ):
        TuneOutputs.from_json({**EXAMPLES[1].to_json(), "best_params": "{}"})
    with pytest.raises(OutputsError, match="RegisterOutputs.promoted='true': expected bool"):
        RegisterOutputs.from_json({**EXAMPLES[4].to_json(), "promoted": "true"})


def test_a_run_recorded_with_other_outputs_is_refused_clearly(run_id):
    client, run = run_id
    client.log_dict(run, {"manifest_uri": "x", "digest": "d"}, "outputs.json")
    with pytest.raises(
        StageInputError, match=f"run {run}: PrepareOutputs: recorded outputs do not match"
    ):
        outputs_of_run(client, run, PrepareOutputs)
