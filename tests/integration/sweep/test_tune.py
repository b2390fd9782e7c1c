"""The tune stage on local Ray: nested trial runs, ASHA, resume after the driver dies, best config
reaching the final training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from components.config import load_config
from components.tracking.stages import code_digest, outputs_of_run
from pipelines.outputs import PrepareOutputs
from pipelines.pipeline import run_pipeline
from pipelines.train import SPEC as TRAIN
from pipelines.tune import SPEC as TUNE
from pipelines.tune import SWEEP_TAG, TRIAL_STATUS_TAG, sweep_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def finished_trials_saved(sweep_dir: Path) -> int:
    """Trials TERMINATED in the newest experiment state Tune has saved in ``sweep_dir``."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return 0
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (ValueError, KeyError, OSError):  # caught while Tune rewrites it
        return 0
    return sum(json.loads(trial_state)["status"] == "TERMINATED" for trial_state, _ in trials)


def trial_runs(client: MlflowClient, tune_run_id: str) -> list:
    experiment_id = client.get_run(tune_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{tune_run_id}'")


# a 3-trial sweep with an early stop and the training it feeds: ~60 s (make test-all; the
# end-to-end pipeline test runs the tune stage in make test)
@pytest.mark.slow
def test_sweep_nests_trials_stops_the_bad_one_and_feeds_training(sweep_env):
    # The good point runs first, so ASHA has a figure to cut the diverging one (lr=0.9) against.
    config = load_config(
        sweep_env.overrides
        + [
            f"+inputs.prepare={sweep_env.prepare_run_id}",
            "tune.max_concurrent_trials=1",
            "tune.grace_period=1",
            "tune.points_to_evaluate=[{train.lr: 0.003, model.top_k: 1}, {train.lr: 0.9, "
            "model.top_k: 2}]",
            "train.max_steps=10",
            "train.warmup_steps=2",
        ]
    )
    result = run_pipeline(config, [TUNE, TRAIN])
    tune_out, tune_run = result.stages["tune"].outputs, result.stages["tune"].run_id
    client = MlflowClient(sweep_env.tracking_uri)

    assert tune_out.num_trials == 2
    trials = {r.data.params["train.lr"]: r for r in trial_runs(client, tune_run)}
    assert set(trials) == {"0.003", "0.9"}
    good, bad = trials["0.003"], trials["0.9"]
    for trial in (good, bad):
        assert trial.data.tags[SWEEP_TAG] == client.get_run(tune_run).data.tags[SWEEP_TAG]
        assert "val_loss" in trial.data.metrics and "model.top_k" in trial.data.params
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_loss")]
        assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    assert good.info.status == "FINISHED" and good.data.tags[TRIAL_STATUS_TAG] == "completed"
    assert bad.info.status == "KILLED" and bad.data.tags[TRIAL_STATUS_TAG] == "stopped_early"

    assert tune_out.best_params == {"train.lr": 0.003, "model.top_k": 1}
    assert (
        "system/cpu_utilization_percentage" in client.get_run(tune_run).data.metrics
    )  # MLflow system metrics
    artifacts = {a.path for a in client.list_artifacts(tune_run, "sweep")}
    assert {
        "sweep/trials.csv",
        "sweep/trials.md",
        "sweep/metric_vs_params.png",
        "sweep/best_params.json",
    } <= artifacts

    # The final training ran with the sweep's best config.
    train_run = client.get_run(result.stages["train"].run_id)
    assert train_run.data.params["tuned.train.lr"] == "0.003"
    assert result.stages["train"].outputs.tuned_params == {"train.lr": 0.003, "model.top_k": 1}
    export = Path(result.stages["train"].outputs.export_dir)
    assert json.loads((export / "model_config.json").read_text())["model"]["top_k"] == 1


# a driver killed mid-sweep and a second sweep that restores it: ~50 s
@pytest.mark.slow
def test_sweep_resumes_after_the_driver_dies(sweep_env):
    overrides = sweep_env.overrides + [
        f"+inputs.prepare={sweep_env.prepare_run_id}",
        "tune.scheduler=fifo",
        "tune.search_alg=random",
        "tune.max_concurrent_trials=1",
        "tune.trial_max_steps=5",
        "tune.trial_eval_every=5",
        "tune.seed=7",
        "tune.points_to_evaluate=[{train.lr: 0.002, model.top_k: 1}, {train.lr: 0.004, "
        "model.top_k: 2}]",
    ]
    client = MlflowClient(sweep_env.tracking_uri)
    experiment_id = client.get_experiment_by_name("sweep-tests").experiment_id
    prepared = outputs_of_run(client, sweep_env.prepare_run_id, PrepareOutputs)
    config = load_config(overrides)
    sweep = sweep_name(config, prepared.dataset_digest, code_digest(TUNE))
    sweep_dir = Path(config.paths.root) / "tune" / sweep

    # A separate driver process joins this Ray cluster and runs the sweep; the test kills it
    # (SIGKILL, as a lost head-node process dies) as soon as the sweep's saved experiment state
    # shows a finished trial, which is what a restore starts from.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(REPO)}
    address = ray.get_runtime_context().gcs_address
    started_ms = int(time.time() * 1000)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.tune",
            *overrides,
            "cluster=remote",
            f"cluster.address={address}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 500
        while finished_trials_saved(sweep_dir) < 1:
            assert driver.poll() is None, (
                f"the sweep's driver exited ({driver.returncode}) before a trial finished"
            )
            assert time.monotonic() < deadline, "no trial finished within 500 s"
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    assert driver.returncode == -signal.SIGKILL, (
        "the driver was still running the sweep when killed"
    )

    def sweep_runs(status: str | None = None):
        query = f"tags.`{SWEEP_TAG}` = '{sweep}'"
        runs = client.search_runs([experiment_id], query)
        return [r for r in runs if status is None or r.data.tags.get(TRIAL_STATUS_TAG) == status]

    first_trial = sweep_runs("completed")[0]
    killed = client.search_runs(
        [experiment_id], f"tags.`moeops.stage` = 'tune' and attributes.start_time >= {started_ms}"
    )
    assert killed and not any(r.info.status == "FINISHED" for r in killed), (
        "the dead driver's tune run must not be FINISHED"
    )
    history_before = [
        m.step for m in client.get_metric_history(first_trial.info.run_id, "val_loss")
    ]

    # The same command again restores the sweep: trial 1 is kept, trial 2 finishes.
    result = run_pipeline(load_config(overrides), [TUNE])
    tune_run = result.stages["tune"].run_id
    assert client.get_run(tune_run).data.tags["moeops.sweep_restored"] == "true"
    assert result.stages["tune"].outputs.num_trials == 2
    assert result.stages["tune"].outputs.num_completed == 2
    trials = trial_runs(client, tune_run)
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert first_trial.info.run_id in {t.info.run_id for t in trials}
    history_after = [m.step for m in client.get_metric_history(first_trial.info.run_id, "val_loss")]
    assert history_after == history_before, "the finished trial must not run again"
