"""The command lines users type: --help, and bad configs failing before Ray or MLflow start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ENTRY_POINTS = ["run", "prepare", "tune", "train", "evaluate", "register", "deploy"]


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd)},
    )


def test_help_lists_groups_and_keys(tmp_path):
    result = run_cli("run", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for group in (
        "data:",
        "storage:",
        "model:",
        "train:",
        "tune:",
        "serve:",
        "tracking:",
        "cluster:",
        "experiment:",
    ):
        assert group in result.stdout
    assert "top_k" in result.stdout


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_bad_config_fails_before_any_work(module, tmp_path):
    result = run_cli(module, "model.top_k=17", "serve.canary_fraction=2", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.top_k=17: must be between 1 and model.num_experts (16)" in result.stderr
    assert "serve.canary_fraction=2.0: must be in [0, 1]" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was started or written: no MLflow store, no Ray session, no state dir.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".moeops" / "stages").exists()
    assert "[ray]" not in result.stdout


def test_unknown_key_fails_at_composition(tmp_path):
    result = run_cli("run", "model.expertz=4", cwd=tmp_path)
    assert result.returncode != 0
    assert "model.expertz" in result.stderr + result.stdout
    assert not (tmp_path / "mlflow.db").exists()
