"""``python -m pipelines.export``: a registered version (alias or number) -> an HF directory
that transformers loads in a process without moeops, with moeops' logits; refusals by name."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from components.config import load_config
from components.model.export import load_export
from components.tracking.hf_artifact import TAG_HF_EXPORT, log_version_hf, registered_hf
from components.tracking.registry import download_export, get_version
from fixtures.hf_loader import load_many_without_moeops
from fixtures.tiny_model import register_tiny_models
from infra.gpu_check_hf import import_transformers
from pipelines.export import main as export_main

ROOT = Path(__file__).resolve().parents[3]


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.export", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_names_the_arguments():
    out = _export_cli("--help")
    assert out.returncode == 0
    assert "models:/<name>@<alias>" in out.stdout and "--tracking-uri" in out.stdout


# a registered model, two exports (one through the CLI's subprocess, one through its main() here)
# and one transformers subprocess loading both: ~15 s (the register test checks the same directory
# through `mlflow artifacts download` in make test)
@pytest.mark.slow
@pytest.mark.skipif(import_transformers() is None, reason="transformers not installed")
def test_alias_and_version_export_load_without_moeops(root_overrides, mlflow_uri, tmp_path, capsys):
    config = load_config(root_overrides + ["model=moe_tiny", "model.shared_expert=true"])
    register_tiny_models(config, versions=2, work_dir=tmp_path / "tiny", vocab_size=300)

    out = _export_cli("models:/moeops-moe@champion", str(tmp_path / "champion"))
    assert out.returncode == 0, out.stderr
    assert "models:/moeops-moe/1" in out.stdout and "Ernie4_5_MoeForCausalLM" in out.stdout
    # the same entry point in process (the subprocess above covers `python -m`): a version number
    # and an explicit --tracking-uri
    assert (
        export_main(["models:/moeops-moe/2", str(tmp_path / "v2"), "--tracking-uri", mlflow_uri])
        == 0
    ), capsys.readouterr().err
    assert "models:/moeops-moe/2" in capsys.readouterr().out

    jobs, ours = [], []
    for ref, hf_dir in (("models:/moeops-moe/1", "champion"), ("models:/moeops-moe/2", "v2")):
        export_dir, _ = download_export(ref, mlflow_uri, tmp_path / f"moeops-{hf_dir}")
        loaded = load_export(export_dir)
        tokens = [loaded.tokenizer.encode("def main():\n    return 0")[:12]]
        jobs.append((tmp_path / hf_dir, tokens, "import os\n"))
        with torch.no_grad():
            ours.append(
                (loaded.model(torch.tensor(tokens))[0], loaded.tokenizer.encode("import os\n"))
            )
    for got, (logits, ids) in zip(load_many_without_moeops(jobs), ours, strict=True):
        assert got["architecture"] == "Ernie4_5_MoeForCausalLM"
        assert got["ids"] == ids
        torch.testing.assert_close(torch.tensor(got["logits"]), logits, atol=1e-4, rtol=0)
    files = sorted(p.name for p in (tmp_path / "champion").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        files
    )


def test_refusals_exit_2_with_the_reason(root_overrides, mlflow_uri, tmp_path, capsys):
    config = load_config(root_overrides + ["model=moe_tiny"])
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, top_k=1, bias_balancing=True)
    )
    (reg,) = register_tiny_models(config, versions=1, work_dir=tmp_path / "tiny", vocab_size=300)
    # what the register stage records for such a version: a refusal tag, no hf/ artifact
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.get_experiment_by_name("moeops").experiment_id).info.run_id
    logged = log_version_hf(client, run_id, reg.model_name, reg.version, mlflow_uri)
    assert "model.bias_balancing=True with model.top_k=1" in logged.refused
    info = get_version(reg.model_uri, mlflow_uri)
    assert info.tags[TAG_HF_EXPORT].startswith("refused: ") and registered_hf(info) is None
    assert client.list_artifacts(run_id) == []
    out = _export_cli("models:/moeops-moe@champion", str(tmp_path / "out"))
    assert out.returncode == 2
    assert "model.bias_balancing=True with model.top_k=1" in out.stderr
    assert not (tmp_path / "out").exists()
    # the other refusals through main() in process (the subprocess above covers `python -m`)
    capsys.readouterr()
    assert export_main(["models:/moeops-moe@nosuchalias", str(tmp_path / "out")]) == 2
    assert "models:/moeops-moe@nosuchalias" in capsys.readouterr().err
    assert export_main(["runs:/abc/model", str(tmp_path / "out")]) == 2
    assert "models:/<name>/<version>" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
