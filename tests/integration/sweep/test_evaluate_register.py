"""train -> evaluate -> register as stages on local Ray: the report's MoE / dense / champion
figures,
the champion gate through the stages, a registered version's lineage tags and its Hugging Face
directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from components.config import load_config
from components.model.export import load_export
from components.tracking.hf_artifact import TAG_HF_ARCHITECTURE, TAG_HF_URI
from components.tracking.registry import TAG_DECISION, load_registered
from components.tracking.stages import outputs_of_run
from fixtures.hf_loader import load_without_moeops
from pipelines.evaluate import SPEC as EVALUATE
from pipelines.outputs import PrepareOutputs
from pipelines.pipeline import run_pipeline
from pipelines.register import SPEC as REGISTER
from pipelines.train import SPEC as TRAIN

pytestmark = pytest.mark.integration


def test_evaluate_report_and_registry_gate(sweep_env, tmp_path):
    base = sweep_env.overrides + [
        f"+inputs.prepare={sweep_env.prepare_run_id}",
        "tune=off",
        "train.max_steps=6",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "registry.model_name=moeops-sweep-test",
    ]
    client = MlflowClient(sweep_env.tracking_uri)

    # Round 1: no champion yet -> the report compares MoE and its dense baseline; v1 is promoted.
    first = run_pipeline(load_config(base), [TRAIN, EVALUATE, REGISTER])
    evaluate_run = first.stages["evaluate"].run_id
    report = json.loads(mlflow.artifacts.load_text(first.stages["evaluate"].outputs.report_uri))
    assert set(report["models"]) == {"moe", "dense_baseline"}
    moe, dense = report["models"]["moe"], report["models"]["dense_baseline"]
    assert moe["kind"] == "moe" and dense["kind"] == "dense"
    assert dense["params_active"] == pytest.approx(
        moe["params_active"], rel=0.05
    )  # equal active parameters
    assert len(moe["expert_counts"]) == 2 and all(sum(layer) > 0 for layer in moe["expert_counts"])
    assert moe["perplexity"] == pytest.approx(torch.tensor(moe["val_loss"]).exp().item(), rel=1e-5)
    assert moe["generation_tokens_per_s"] > 0 and len(moe["samples"]) == 4
    artifacts = {a.path for a in client.list_artifacts(evaluate_run, "evaluation")}
    assert {
        "evaluation/report.md",
        "evaluation/report.json",
        "evaluation/expert_utilisation.png",
    } <= artifacts
    dense_runs = client.search_runs(
        [first.experiment_id], f"tags.`mlflow.parentRunId` = '{evaluate_run}'"
    )
    assert [r.info.run_name for r in dense_runs] == ["dense-baseline"] and "val_loss" in dense_runs[
        0
    ].data.metrics

    reg1, trained = first.stages["register"].outputs, first.stages["train"].outputs
    assert reg1.model_version == "1" and reg1.promoted is True
    assert set(reg1.aliases) == {"champion", "challenger"}
    version = client.get_model_version("moeops-sweep-test", "1")
    prepared = outputs_of_run(client, sweep_env.prepare_run_id, PrepareOutputs)
    assert version.tags["dataset_digest"] == prepared.dataset_digest
    assert version.tags["training_run_id"] == first.stages["train"].run_id
    assert version.tags["git_commit"] and version.tags[TAG_DECISION] == "promoted"

    # run -> model -> version: the version's source is the LoggedModel the train run logged (once),
    # which carries its params, step and the dataset digest; evaluate's figures are linked to it
    # by model id and dataset.
    train_run = client.get_run(first.stages["train"].run_id)
    assert version.source == f"models:/{trained.model_id}" == trained.model_uri
    logged = client.get_logged_model(trained.model_id)
    assert logged.source_run_id == train_run.info.run_id
    assert logged.tags["dataset_digest"] == prepared.dataset_digest
    trained_config = load_config(base)
    assert logged.params["model.num_experts"] == str(trained_config.model.num_experts)
    assert logged.params["train.max_steps"] == str(trained_config.train.max_steps) == "6"
    assert [(o.model_id, o.step) for o in train_run.outputs.model_outputs] == [
        (trained.model_id, 6)
    ]
    assert (
        client.search_logged_models(
            [first.experiment_id], filter_string=f"source_run_id = '{evaluate_run}'"
        ).to_list()
        == []
    )
    assert [
        (v["name"], str(v["version"])) for v in json.loads(logged.tags["mlflow.modelVersions"])
    ] == [("moeops-sweep-test", "1")]
    linked = {m.key: m for m in logged.metrics if m.run_id == evaluate_run}
    assert linked["val_loss"].value == pytest.approx(moe["val_loss"])
    assert linked["val_loss"].dataset_digest == prepared.dataset_digest[:32]
    for run in (train_run, client.get_run(sweep_env.prepare_run_id)):
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {
            prepared.dataset_digest[:32]
        }
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        train_run.data.metrics
    )

    # The registered champion gives the trained model's logits.
    loaded, info = load_registered(
        "models:/moeops-sweep-test@champion", sweep_env.tracking_uri, dst_dir=tmp_path / "champion"
    )
    trained_model = load_export(trained.export_dir)
    tokens = torch.randint(0, loaded.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(tokens)[0], trained_model.model(tokens)[0], rtol=0, atol=0
        )

    # The version's Hugging Face directory: logged by the register stage, downloaded with the
    # mlflow CLI, loaded by transformers in a process that cannot import moeops, same logits.
    hf_uri = version.tags[TAG_HF_URI]
    assert hf_uri == f"runs:/{first.stages['register'].run_id}/hf"
    assert version.tags[TAG_HF_ARCHITECTURE] == "Ernie4_5_MoeForCausalLM"
    downloaded = subprocess.run(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "artifacts",
            "download",
            "-u",
            hf_uri,
            "-d",
            str(tmp_path / "hf-download"),
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": sweep_env.tracking_uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert downloaded.returncode == 0, downloaded.stderr
    hf_dir = Path(downloaded.stdout.strip().splitlines()[-1])
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()
    got = load_without_moeops(hf_dir, tokens.tolist(), "def main(")
    assert got["ids"] == loaded.tokenizer.encode("def main(")
    with torch.no_grad():
        torch.testing.assert_close(
            torch.tensor(got["logits"]), loaded.model(tokens)[0], atol=1e-4, rtol=0
        )

    # Round 2: the same model again, now against a champion: the report holds the champion's
    # figures, and a challenger that does not beat it is refused (champion stays at v1).
    second = run_pipeline(
        load_config(base + ["evaluate.compare_dense=false", "force=true"]), [EVALUATE, REGISTER]
    )
    report2 = json.loads(mlflow.artifacts.load_text(second.stages["evaluate"].outputs.report_uri))
    assert set(report2["models"]) == {"moe", "champion"}
    assert report2["models"]["champion"]["val_loss"] == pytest.approx(
        report2["models"]["moe"]["val_loss"]
    )
    reg2 = second.stages["register"].outputs
    assert reg2.model_version == "2" and reg2.promoted is False and reg2.aliases == ["challenger"]
    assert reg2.model_id == reg1.model_id, "the same LoggedModel, registered again: no second copy"
    assert "refused" in client.get_model_version("moeops-sweep-test", "2").tags[TAG_DECISION]
    assert str(client.get_model_version_by_alias("moeops-sweep-test", "champion").version) == "1"
    assert client.get_run(second.stages["register"].run_id).data.tags[TAG_DECISION] == "refused"
