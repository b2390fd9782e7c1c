"""The registry against a real sqlite MLflow store: round-trip logits, tags, and the promotion
gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from components.config import load_config
from components.data.tokenizer import TextTokenizer
from components.model.export import save_export
from components.model.transformer import Transformer
from components.tracking import mlflow_utils
from components.tracking.registry import (
    TAG_DECISION,
    TAG_REASON,
    find_version,
    load_registered,
    log_and_register,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    texts = ["def main():\n    return 0\n", "import os\nclass Config:\n    pass\n"] * 50
    tok = TextTokenizer.train(texts, vocab_size=300)
    return Path(tok.save(str(tmp_path_factory.mktemp("tok") / "tokenizer.json")))


def make_export(config, tokenizer_file: Path, out: Path, seed: int) -> tuple[Path, Transformer]:
    torch.manual_seed(seed)
    vocab = TextTokenizer.load(str(tokenizer_file)).vocab_size
    model = Transformer(config.model, vocab).eval()
    return save_export(model.state_dict(), config.model, vocab, tokenizer_file, out), model


def register(config, export_dir: Path, val_loss: float, *, champion_metric=None):
    client = MlflowClient(config.tracking.uri)
    exp_id = mlflow_utils.ensure_experiment(
        client, "registry-test", config.tracking.artifact_location
    )
    run_id = client.create_run(exp_id, run_name="register").info.run_id
    reg = log_and_register(
        export_dir,
        run_id=run_id,
        tracking_uri=config.tracking.uri,
        registry=config.registry,
        metrics={"val_loss": val_loss, "perplexity": 2.0},
        tags={
            "moeops.dataset_digest": "d" * 64,
            "moeops.git_commit": "abc123",
            "moeops.training_run_id": "train-run-1",
        },
        champion_metric=champion_metric,
        params={"model.dim": 64},
        step=7,
    )
    return reg, run_id


def test_round_trip_tags_and_gate_both_ways(root_overrides, tmp_path, tokenizer_file, monkeypatch):
    config = load_config(root_overrides + ["experiment=tiny", "registry.min_improvement=0.05"])
    uri, name = config.tracking.uri, config.registry.model_name
    client = MlflowClient(uri)
    first_dir, first_model = make_export(config, tokenizer_file, tmp_path / "v1", seed=0)

    # First version: no champion yet -> promoted.
    reg1, run1 = register(config, first_dir, val_loss=3.0)
    assert reg1.promoted and reg1.version == "1"
    assert set(reg1.aliases) == {"champion", "challenger"}

    # Same logits from the registry as from the model that was exported.
    loaded, info = load_registered(f"models:/{name}@champion", uri, dst_dir=tmp_path / "dl")
    assert info.version == "1" and info["run_id"] == run1
    tokens = torch.randint(0, loaded.vocab_size, (2, 16))
    with torch.no_grad():
        expected, _ = first_model(tokens)
        actual, _ = loaded.model(tokens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    # The version was created from the run's LoggedModel (params and step recorded on it), and
    # MLflow links the model to the version: run -> model -> version.
    mv = client.get_model_version(name, "1")
    assert mv.source == f"models:/{reg1.model_id}"
    logged = client.get_logged_model(reg1.model_id)
    assert logged.source_run_id == run1 and logged.params["model.dim"] == "64"
    assert [
        (v["name"], str(v["version"])) for v in json.loads(logged.tags["mlflow.modelVersions"])
    ] == [(name, "1")]
    assert [(o.model_id, o.step) for o in client.get_run(run1).outputs.model_outputs] == [
        (reg1.model_id, 7)
    ]

    # Tags trace the version back to the data and the training run; the decision is recorded.
    assert mv.tags["moeops.dataset_digest"] == "d" * 64
    assert mv.tags["moeops.training_run_id"] == "train-run-1"
    assert mv.tags["moeops.metric.val_loss"] == "3"
    assert mv.tags[TAG_DECISION] == "promoted"
    assert client.get_run(run1).data.tags[TAG_DECISION] == "promoted"

    # The logged model: safetensors + config + tokenizer as artifacts, no pickled torch module,
    # a signature, an input example and pinned requirements.
    model_dir = Path(loaded.export_dir).parents[1]
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {
        "artifacts/export/model.safetensors",
        "artifacts/export/model_config.json",
        "artifacts/export/tokenizer.json",
    } <= files
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "signature:" in mlmodel and "saved_input_example_info" in mlmodel
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and any(
        r.startswith("mlflow==") for r in requirements
    )
    assert not any(f.endswith((".pt", ".pth", ".bin")) for f in files)
    # ...and it serves as a plain MLflow pyfunc too: prompts in, completions out.
    import mlflow.pyfunc
    import pandas as pd

    # MLflow puts the model's copy of the code first on sys.path and imports `components` from it;
    # put this process's own back after, or later tests (and processes they spawn) run that copy
    monkeypatch.setattr(sys, "path", list(sys.path))
    ours = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "components"}
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
        out = pyfunc.predict(
            pd.DataFrame({"prompt": ["def main(", "import os"]}), params={"max_new_tokens": 4}
        )
    finally:
        for module in [n for n in sys.modules if n.split(".")[0] == "components"]:
            del sys.modules[module]
        sys.modules.update(ours)
    assert list(out.columns) == ["completion"] and len(out) == 2

    # A worse challenger is refused: challenger moves, champion stays.
    second_dir, _ = make_export(config, tokenizer_file, tmp_path / "v2", seed=1)
    reg2, run2 = register(config, second_dir, val_loss=3.5)
    assert not reg2.promoted and reg2.aliases == ["challenger"]
    assert find_version(f"models:/{name}@champion", uri).version == "1"
    mv2 = client.get_model_version(name, "2")
    assert mv2.tags[TAG_DECISION] == "refused" and "refused" in mv2.tags[TAG_REASON]
    assert client.get_run(run2).data.tags[TAG_DECISION] == "refused"

    # Better, but by less than registry.min_improvement: refused too.
    reg3, _ = register(config, second_dir, val_loss=2.98)
    assert not reg3.promoted

    # Better by the margin (measured against the champion on the same data): promoted.
    reg4, _ = register(config, second_dir, val_loss=2.5, champion_metric=3.0)
    assert reg4.promoted and set(reg4.aliases) == {"champion", "challenger"}
    assert find_version(f"models:/{name}@champion", uri).version == reg4.version
    assert "challenger" not in client.get_model_version(name, "2").aliases


def test_load_registered_names_what_is_missing(mlflow_uri):
    with pytest.raises(LookupError, match="models:/nope@champion"):
        load_registered("models:/nope@champion", mlflow_uri)
    with pytest.raises(ValueError, match="expected models:/"):
        load_registered("runs:/abc/model", mlflow_uri)
