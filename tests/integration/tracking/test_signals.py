"""A pipeline process stopped by a signal leaves no MLflow run RUNNING.

The signals come from outside, as a user's ``kill``, Kubernetes or Ctrl-C would send them: the
tests start real processes and signal them once they are at work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]

BLOCKING_PIPELINE = textwrap.dedent('''
    """A one-stage pipeline whose stage works until it is stopped (the real CLI path)."""
    import sys, time
    from dataclasses import dataclass
    from pathlib import Path
    from typing import ClassVar

    from components.tracking.outputs import StageOutputs
    from components.tracking.stages import StageSpec
    from pipelines._cli import pipeline_main

    @dataclass(frozen=True)
    class Prepared(StageOutputs):
        stage: ClassVar[str] = "prepare"
        rows: int

    def work(ctx):
        Path(ctx.config.paths.root, "working").write_text(ctx.run_id)
        while True:
            time.sleep(0.1)

    # a script outside the project has no importable name: its stage keys its code by the CLI's
    def stages(config):
        return [StageSpec("prepare", ("data",), (), work, Prepared, module="pipelines._cli")]

    main = pipeline_main(stages, "tests.blocking")
    main()
''')


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def runs_of(uri: str) -> dict[str, object]:
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.data.tags.get("moeops.stage", "parent"): r for r in runs}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_stage_and_parent_runs_killed(signum, tmp_path, mlflow_uri):
    script = tmp_path / "blocking.py"
    script.write_text(BLOCKING_PIPELINE)
    root = tmp_path / "moeops"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            f"paths.root={root}",
            f"tracking.uri={mlflow_uri}",
            "experiment=tiny",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (root / "working").exists(), 120, proc, "the stage started")
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "the open MLflow runs are marked KILLED" in stderr
    runs = runs_of(mlflow_uri)
    assert {name: run.info.status for name, run in runs.items()} == {
        "prepare": "KILLED",
        "parent": "KILLED",
    }
    assert runs["prepare"].info.run_id == (root / "working").read_text()


# a real sweep interrupted by SIGINT while a trial trains: ~15 s
@pytest.mark.slow
def test_ctrl_c_during_tune_ends_the_pipeline(ray_session, tmp_path, mlflow_uri):
    """``python -m pipelines.run`` gets SIGINT while a trial trains: Tune must not swallow it (its
    own
    handler would stop the sweep and let the pipeline go on to train); every run ends KILLED."""
    from components.config import load_config
    from pipelines.pipeline import run_pipeline
    from pipelines.prepare import SPEC as PREPARE

    overrides = [
        f"paths.root={tmp_path / 'moeops'}",
        f"tracking.uri={mlflow_uri}",
        f"tracking.artifact_location={(tmp_path / 'mlartifacts').as_uri()}",
        "experiment=tiny",
        "data.max_files=20",
        "data.max_bytes=300000",
        "data.vocab_size=512",
        "model.dim=32",
        "model.ffn_dim=64",
        "train.expert_parallel_size=1",
        "tune.trial_num_workers=1",
        "tune.search_alg=random",
        "tune.scheduler=fifo",
        "tune.max_concurrent_trials=1",
        "tune.trial_max_steps=100000",
        "tune.trial_eval_every=100000",
    ]  # trials outlast the test
    run_pipeline(
        load_config(overrides), [PREPARE]
    )  # reused by the pipeline below: it starts at tune
    client = MlflowClient(mlflow_uri)
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.run",
            *overrides,
            "cluster=remote",
            f"cluster.address={address}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def stage_runs(stage: str):
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, f"tags.`moeops.stage` = '{stage}'")

    try:
        # a trial run exists once Tune runs the trial: well inside Tuner.fit
        wait_for(lambda: stage_runs("tune-trial"), 300, proc, "a tune trial started")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "interrupted (SIGINT)" in stderr
    (tune_run,) = stage_runs("tune")
    assert tune_run.info.status == "KILLED"
    assert client.get_run(tune_run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    assert {r.info.status for r in stage_runs("tune-trial")} == {"KILLED"}
    assert not stage_runs("train"), "the pipeline went on after the interrupted sweep"


# a blocking deploy of a real model, then SIGTERM: ~17 s
@pytest.mark.slow
def test_serving_deploy_stopped_with_sigterm_ends_its_runs(
    ray_session, serve_port, tmp_path, mlflow_uri
):
    """``python -m pipelines.deploy serve.block=true`` (what ``make serve`` runs), stopped with
    SIGTERM."""
    from ray import serve

    from components.config import load_config
    from components.tracking.stages import StageSpec
    from fixtures.tiny_model import register_tiny_models
    from pipelines.outputs import RegisterOutputs
    from pipelines.pipeline import run_pipeline

    app = "moeops-signal-test"
    overrides = [
        f"paths.root={tmp_path / 'moeops'}",
        f"tracking.uri={mlflow_uri}",
        f"tracking.artifact_location={(tmp_path / 'mlartifacts').as_uri()}",
        "experiment=tiny",
        "model.dim=32",
        "model.n_layers=1",
        "model.ffn_dim=64",
        "serve.num_cpus=0.25",
        f"serve.port={serve_port}",
        f"serve.app_name={app}",
        "serve.route_prefix=/signal-test",
        "serve.auth_token_env=MOEOPS_TEST_NO_TOKEN",
    ]
    config = load_config(overrides)
    (registered,) = register_tiny_models(config, versions=1, work_dir=tmp_path / "tiny")
    # the deploy stage reads the latest finished register run: record one for the tiny model
    recorded = RegisterOutputs(
        model_name=registered.model_name,
        model_version=registered.version,
        model_id=registered.model_id,
        aliases=list(registered.aliases),
        promoted=True,
        reason=registered.reason,
        previous_champion="",
    )
    run_pipeline(
        config, [StageSpec("register", ("registry",), (), lambda ctx: recorded, RegisterOutputs)]
    )

    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.deploy",
            *overrides,
            "serve.block=true",
            "cluster=remote",
            f"cluster.address={address}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            if "until Ctrl-C" in line:
                break
            assert time.monotonic() < deadline, "deploy did not start serving in time"
        assert lines and "until Ctrl-C" in lines[-1], "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        serve.delete(app)
    assert proc.returncode == 0, "".join(lines)[-2000:] + output[-2000:]
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    deploys = client.search_runs([experiment.experiment_id], "tags.`moeops.stage` = 'deploy'")
    # README: a blocking deploy stopped with SIGTERM ends FINISHED (serving until told to stop is
    # its job), its parent with it; never KILLED, never RUNNING
    assert len(deploys) == 1 and deploys[0].info.status == "FINISHED"
    parent = client.get_run(deploys[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
