"""The quality benchmark's --quick run (issue 16): it runs end to end on a tiny budget, and every
figure it reports is the one its logged curves give."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.benchmark, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from bench_quality import Curve, tokens_to_reach  # noqa: E402


def test_tokens_to_reach_interpolates_between_logged_points():
    curve = Curve("moe", 3e-3, 0, tokens=[100, 200, 300], val_loss=[5.0, 4.0, 3.0])
    curve.wall_s = [1.0, 2.0, 3.0]
    assert tokens_to_reach(curve, 4.5) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 5.5) == 100.0  # already below at the first point
    assert tokens_to_reach(curve, 3.0, "wall_s") == pytest.approx(3.0)
    assert math.isnan(tokens_to_reach(curve, 2.0))  # never reached


def test_bench_quality_quick(tmp_path):
    out = tmp_path / "bench-quality.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/benchmarks/bench_quality.py"),
            "--quick",
            "--jobs=1",
            f"--root={tmp_path / 'root'}",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert len(result["per_seed"]) == len(settings["seeds"]) == 2
    assert len(settings["init_scales"]) == 2  # the FFN init is swept with the lr
    assert len(result["sweep"]) == (
        len(settings["lrs"]) * len(settings["init_scales"]) * len(settings["seeds"])
    )
    for row, (moe, dense) in zip(result["per_seed"], result["curves"]):
        # both models saw the same tokens, logged at the same points, each at its own best lr
        assert moe["tokens"] == dense["tokens"] and moe["tokens"][-1] == row["tokens"]
        assert len(moe["step_s"]) == len(dense["step_s"]) == settings["steps"]
        assert (moe["lr"], dense["lr"]) == (settings["moe_lr"], settings["dense_lr"])
        assert (moe["ffn_out_init_scale"], dense["ffn_out_init_scale"]) == (
            settings["moe_ffn_out_init_scale"],
            settings["dense_ffn_out_init_scale"],
        )
        # each model's chosen setting has the lowest mean final loss of the sweep
        for which, key in (("moe", "moe_val_loss"), ("dense", "dense_val_loss")):
            means = {}
            for entry in result["sweep"]:
                means.setdefault((entry["lr"], entry["ffn_out_init_scale"]), []).append(entry[key])
            best = min(means, key=lambda k: sum(means[k]) / len(means[k]))
            assert best == (settings[f"{which}_lr"], settings[f"{which}_ffn_out_init_scale"])
        # every figure from the curves
        gap = moe["val_loss"][-1] - dense["val_loss"][-1]
        assert row["moe_minus_dense_val_loss"] == pytest.approx(gap)
        reached = [t for t, v in zip(moe["tokens"], moe["val_loss"]) if v <= dense["val_loss"][-1]]
        ratio = row["tokens_to_dense_final_loss_ratio"]
        if reached:
            assert 0 < ratio * dense["tokens"][-1] <= reached[0]
        else:
            assert math.isnan(ratio)
        assert row["dropped_fraction"] == pytest.approx(
            sum(moe["dropped_fraction"]) / len(moe["dropped_fraction"])
        )
        # busiest expert over the mean: at most num_experts / top_k (moe_tiny: 64 / 8)
        assert 1.0 <= row["expert_load_max_over_mean"] <= 8.0
        assert row["moe_step_time_vs_dense"] > 0
    mean = sum(r["moe_minus_dense_val_loss"] for r in result["per_seed"]) / 2
    assert result["moe_minus_dense_val_loss"] == pytest.approx(mean)
    assert result["spread"]["moe_minus_dense_val_loss"]["n"] == 2

    # the curves and the plot are in the MLflow run
    client = MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}")
    run_id = result["mlflow_run_id"]
    moe = result["curves"][0][0]
    history = client.get_metric_history(run_id, f"moe_seed{moe['seed']}/val_loss")
    assert [m.step for m in history] == moe["tokens"]
    assert [m.value for m in history] == pytest.approx(moe["val_loss"])
    assert "loss_vs_tokens.png" in {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).data.metrics["moe_minus_dense_val_loss"] == pytest.approx(
        result["moe_minus_dense_val_loss"]
    )
