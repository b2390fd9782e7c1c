"""Ray Train with two gloo CPU workers on the tiny config, real MLflow store, real checkpoints.

One uninterrupted expert-parallel run (EP=2) is the reference; the other runs are compared to it:
a run stopped half-way and resumed, and runs whose worker process is killed from outside the
training code: a watcher thread of this process (``fixtures.faults``) finds a worker pid through
Ray's public state API and SIGKILLs it, once at a random step and once while a checkpoint directory
is being written. The half-way EP=2 checkpoint is then loaded at EP=1 (resharding).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from components.config import load_config
from fixtures.tiny import SMALL_MODEL

pytestmark = pytest.mark.integration

MAX_STEPS = 6
TINY = [
    *SMALL_MODEL,
    "train.num_workers=2",
    "train.expert_parallel_size=2",
    "tune.trial_num_workers=2",
    "train.batch_size=4",
    f"train.max_steps={MAX_STEPS}",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=3",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_session, small_dataset, new_mlflow_store):
    """The session's prepared small dataset, an MLflow store and an experiment shared by this
    module's runs."""
    root = tmp_path_factory.mktemp("train-dist")
    uri = new_mlflow_store(root / "mlflow.db")
    base = [
        *small_dataset.overrides,
        *TINY,
        f"paths.root={root}",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={(root / 'mlartifacts').as_uri()}",
    ]
    manifest = small_dataset.manifest
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(
        "train-tests", artifact_location=(root / "mlartifacts").as_uri()
    )
    return {
        "root": root,
        "base": base,
        "manifest": manifest,
        "client": client,
        "experiment_id": experiment_id,
    }


def new_run(ws, name: str) -> str:
    return ws["client"].create_run(ws["experiment_id"], run_name=name).info.run_id


def train(ws, name: str, overrides=(), resume_from=None, run_id=None):
    from components.training.ray_runner import run_training

    config = load_config([*ws["base"], *overrides])
    run_id = run_id or new_run(ws, name)
    result = run_training(
        config, ws["manifest"].uri, mlflow_run_id=run_id, name=name, resume_from=resume_from
    )
    return result, run_id


def loss_history(ws, run_id: str) -> dict[int, float]:
    history = ws["client"].get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"duplicate steps logged: {sorted(steps)}"
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def reference(workspace):
    result, run_id = train(workspace, "reference")
    return result, run_id, loss_history(workspace, run_id)


def test_loss_falls_and_everything_is_logged(workspace, reference):
    result, run_id, losses = reference
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] < losses[1] - 0.05
    assert result.metrics["steps"] == MAX_STEPS and result.metrics["val_loss"] < 7.0
    metrics = workspace["client"].get_run(run_id).data.metrics
    for key in (
        "aux_loss",
        "z_loss",
        "tokens_per_s",
        "moe/load_max_over_mean",
        "moe/dropped_fraction",
        "data_wait_s",
        "compute_s",
        "comm_s",
        "comm/a2a_exposed_s",
        "val_loss",
        "data/warm_hit_rate",
        "data/bytes_cold",
        "data/bytes_warm",
        "data/bytes_hot",
        "expert_frac/l0/e3",
        "grad_norm",
    ):
        assert key in metrics, key
    assert metrics["tokens_per_s"] > 0 and metrics["data/bytes_hot"] > 0
    # the stage's result carries the MoE figures of the last logging interval
    assert 1.0 <= result.metrics["moe/load_max_over_mean"] <= 8.0
    assert 0.0 <= result.metrics["moe/dropped_fraction"] < 1.0
    # EP=2 on gloo: the all-to-all is timed (wall time of its futures), so the fraction is a
    # number (NaN only where nothing is measured: a single rank)
    exposed = result.metrics["comm/exposed_fraction"]
    assert 0.0 <= exposed <= 1.0, exposed
    assert result.metrics["skipped_steps"] == 0.0
    # the export holds every expert, whatever the training EP size
    from components.model.export import load_export

    loaded = load_export(result.export_dir)
    assert (
        loaded.model.layers[0].moe.experts.w1.shape[0]
        == load_config(workspace["base"]).model.num_experts
    )
    flow = json.loads(Path(result.flow_report_path).read_text())
    assert {entry["rank"] for entry in flow} == {0, 1}
    ckpt_files = {p.name for p in Path(result.checkpoint_path).iterdir()}
    assert {
        "meta.json",
        "shared.pt",
        "experts-000-of-002.pt",
        "experts-001-of-002.pt",
        "rank-00000.pt",
        "rank-00001.pt",
        "flow_report.json",
    } <= ckpt_files


@pytest.fixture(scope="module")
def stopped(workspace):
    """The reference run stopped after step 3 (same schedule: it still spans MAX_STEPS)."""
    result, run_id = train(workspace, "stopped", ["train.stop_at_step=3"])
    return result, run_id


def test_resume_after_stop_reproduces_the_curve(workspace, reference, stopped):
    _, _, expected = reference
    first, first_run = stopped
    assert first.metrics["steps"] == 3
    # same name: Ray Train finds the run's latest checkpoint and continues from it
    second, second_run = train(workspace, "stopped")
    assert second.metrics["start_step"] == 3 and second.metrics["steps"] == MAX_STEPS
    curve = {**loss_history(workspace, first_run), **loss_history(workspace, second_run)}
    assert sorted(loss_history(workspace, second_run)) == [4, 5, 6]
    for step in range(1, MAX_STEPS + 1):
        assert curve[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    assert_same_batches(reference[0], second)


def assert_same_batches(a, b) -> None:
    """Both runs' data-flow reports fingerprint the same batches at every step, per rank too."""
    from components.data.flow import batch_entries, first_difference, load_report

    flow_a, flow_b = load_report(a.flow_report_path), load_report(b.flow_report_path)
    assert first_difference(flow_a, flow_b) is None
    assert sorted(
        (e["step"], e["rank"], e["fingerprint"]) for e in batch_entries(flow_a)
    ) == sorted((e["step"], e["rank"], e["fingerprint"]) for e in batch_entries(flow_b))
    assert len(batch_entries(flow_b)) == 2 * MAX_STEPS


# every rank's files in a finished EP=2 checkpoint of two workers
CHECKPOINT_FILES = {
    "meta.json",
    "shared.pt",
    "experts-000-of-002.pt",
    "experts-001-of-002.pt",
    "rank-00000.pt",
    "rank-00001.pt",
    "flow_report.json",
}


# each kill is a second training run with a restart (~35 s at a random step, ~45 s during a
# checkpoint write, which needs a checkpoint every step): make test-all runs them
@pytest.mark.parametrize(
    "moment",
    [
        pytest.param("random-step", marks=pytest.mark.slow),
        pytest.param("checkpoint-write", marks=pytest.mark.slow),
        pytest.param("async-checkpoint-upload", marks=pytest.mark.slow),
    ],
)
def test_killed_worker_resumes_from_checkpoint(workspace, reference, moment):
    """A watcher thread (not the training code, not a Ray Train callback) SIGKILLs a worker process
    it found through Ray's state API: at a random step it sees rank 0 log, or while a checkpoint
    directory in storage holds only part of the ranks' files: written synchronously
    (``checkpoint-write``) or uploaded in the background while training goes on
    (``async-checkpoint-upload``: ``train.async_checkpoint=true``, Ray Train's ASYNC upload mode).
    The run restarts from its latest registered checkpoint, a complete one from before the
    half-written directory (which Ray Train never registered), and ends on the reference's loss."""
    import random

    import ray

    from fixtures.faults import CheckpointWrite, FaultWatcher, at_step, kill_a_worker, train_workers

    _, _, expected = reference
    # this cluster's address, explicitly: other Ray instances may run on the machine
    address = ray.get_runtime_context().gcs_address
    name = f"killed-{moment}"
    run_id = new_run(workspace, name)
    overrides: list[str] = []
    if moment == "random-step":
        # not the last two steps: the strike must land while the run still trains
        step = random.SystemRandom().randint(1, MAX_STEPS - 2)
        when = at_step(workspace["client"].tracking_uri, run_id, step)
        strike, poll_s = kill_a_worker(address), 0.05
        print(f"[faults] killing a worker once step {step} is logged")
    else:
        # a checkpoint every step: six writes to catch in flight (same curve: checkpoints and the
        # evaluation before each do not touch the training state)
        overrides = ["train.checkpoint_every=1", f"train.keep_checkpoints={MAX_STEPS}"]
        if moment == "async-checkpoint-upload":
            overrides.append("train.async_checkpoint=true")
        write = CheckpointWrite(
            Path(workspace["root"]) / "checkpoints" / name,
            CHECKPOINT_FILES,
            address,
            2,
            # async: not the first checkpoint, so that the upload races an earlier, finished one
            after_step=1 if moment == "async-checkpoint-upload" else 0,
        )
        when, strike, poll_s = write.when, write.kill_one, 0.0005
    before = {w.actor_id for w in train_workers(address, alive_only=False)}
    with FaultWatcher(when, strike, poll_s) as watcher:
        result, _ = train(workspace, name, overrides, run_id=run_id)
    struck = watcher.struck
    assert struck is not None, f"the fault was never injected (watcher errors: {watcher.errors})"
    print(f"[faults] {moment}: {struck.reason}, killed pid {struck.detail['pid']}")
    # the strike landed mid-run: the workers were started again (a second worker group)
    started = [w for w in train_workers(address, alive_only=False) if w.actor_id not in before]
    assert len(started) >= 4, f"{len(started)} workers started: the kill came after the run ended"
    assert struck.detail["pid"] in {w.pid for w in started}
    assert result.metrics["steps"] == MAX_STEPS
    # the final attempt started from a registered checkpoint before the strike
    assert result.metrics["start_step"] < MAX_STEPS
    losses = loss_history(workspace, run_id)  # no step logged twice across attempts
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] == pytest.approx(expected[MAX_STEPS], rel=1e-6)
    assert result.metrics["train_loss"] == pytest.approx(expected[MAX_STEPS], rel=1e-6)
    assert_same_batches(reference[0], result)  # the restarted attempt's report covers every step
    if moment != "random-step":
        partial = struck.reason.split()[0]
        print(
            f"[faults] at the strike: registered {write.registered_at_strike}, complete "
            f"{sorted(write.complete_at_strike)}; resumed at step "
            f"{result.metrics['start_step']:.0f}"
        )
        # the half-written checkpoint was never registered; everything registered was complete
        assert partial not in write.registered_at_strike
        assert set(write.registered_at_strike) <= write.complete_at_strike
        # the restarted attempt began at the last checkpoint registered before the strike (or
        # one whose upload finished in the moment between): complete, and older than the partial
        start = int(result.metrics["start_step"])
        assert start < int(partial.removeprefix("step_"))
        if start:
            assert f"step_{start:07d}" in write.complete_at_strike
        registered = [int(n.removeprefix("step_")) for n in write.registered_at_strike]
        assert start >= max(registered, default=0)
        # the partial directory was written again, whole, when the run came back to that step
        assert CHECKPOINT_FILES <= {p.name for p in (write.run_dir / partial).iterdir()}


def test_ep2_checkpoint_reshards_to_ep1(workspace, stopped):
    from components.model.transformer import Transformer
    from components.training.checkpoint import load_checkpoint, load_full_model_state
    from components.training.optim import build_optimizer, build_scheduler
    from components.training.parallel import build_groups

    first, _ = stopped
    ckpt_dir = Path(first.checkpoint_path)
    assert (ckpt_dir / "experts-001-of-002.pt").exists()

    # in this process: one rank, all experts; weights identical to the two shards side by side
    config = load_config(workspace["base"])
    model = Transformer(config.model, workspace["manifest"].vocab_size)
    optimizer = build_optimizer(model, config.train)
    restored = load_checkpoint(
        ckpt_dir,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.train),
        scaler=None,
        groups=build_groups(1),
    )
    assert restored.step == 3 and restored.meta["expert_parallel_size"] == 2
    assert {"experts-000-of-002.pt", "experts-001-of-002.pt"} <= set(
        restored.files_read
    )  # resharding: both
    shards = [
        torch.load(ckpt_dir / f"experts-00{i}-of-002.pt", weights_only=True) for i in range(2)
    ]
    checked = 0
    for name, param in model.named_parameters():
        if ".moe.experts." in name:
            assert param.shape[0] == config.model.num_experts
            assert torch.equal(
                param.detach(), torch.cat([shards[0]["model"][name], shards[1]["model"][name]])
            )
            assert torch.equal(
                optimizer.state[param]["exp_avg"],
                torch.cat([s["optimizer"][name]["exp_avg"] for s in shards]),
            )
            checked += 1
    assert checked == 3 * config.model.n_layers  # w1, w2, w3 per MoE layer
    assert set(load_full_model_state(ckpt_dir)) == set(model.state_dict())


# a cluster of its own (three nodes, started in a subprocess) plus two worker-group starts: 1.5-3
# minutes on the 2 cores whatever the model size, so `make test-all` (CI) runs it, `make test` not
@pytest.mark.slow
def test_node_loss_finishes_from_the_latest_checkpoint(workspace, reference, tmp_path):
    """Three Ray nodes on this machine (its own cluster, in a subprocess); a watcher thread there
    removes the node holding both training workers once rank 0 has logged a random step; the run
    ends on the other node with the reference's loss."""
    import os
    import random
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    _, _, expected = reference
    # not the last two steps: the node must go while the run still trains
    after_step = random.SystemRandom().randint(1, MAX_STEPS - 2)
    run_id = new_run(workspace, "node-loss")
    args = tmp_path / "args.json"
    # a short path for Ray's sockets (Unix socket paths are limited to ~107 bytes), removed here
    ray_tmpdir = tempfile.mkdtemp(prefix="moeops-nl-", dir="/tmp")
    args.write_text(
        json.dumps(
            {
                "overrides": workspace["base"],
                "manifest_uri": workspace["manifest"].uri,
                "name": "node-loss",
                "after_step": after_step,
                "mlflow_run_id": run_id,
                "ray_tmpdir": ray_tmpdir,
            }
        )
    )
    repo = Path(__file__).resolve().parents[3]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    # its own cluster, also for the state API (the session's dashboard is exported in this process)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    # its own session: on a timeout the whole group goes (the driver and its three nodes' Ray
    # processes)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("node_loss_run.py")), str(args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=repo,
        start_new_session=True,
    )
    try:
        # generous: ~2.5 min at load 16 on the 2 cores; three Ray nodes and two worker-group starts
        # under a heavier load take longer, and the budget is only spent when something hangs
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"the node-loss run did not finish in 600 s\n{stdout[-4000:]}\n{stderr[-4000:]}"
        )
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n{stdout[-4000:]}\n{stderr[-4000:]}"
    )
    out = json.loads(lines[-1][len("RESULT ") :])
    removed = out["removed"].get("node_id")
    assert removed, (
        f"no node was removed (step {after_step}; watcher errors {out['watcher_errors']})"
    )
    assert removed in out["worker_nodes"] and removed not in out["alive_nodes"]
    # the workers started again, on the surviving node: the strike landed while the run trained
    survivors = [n for n in out["train_worker_nodes"] if n != removed]
    assert len(survivors) == 2, out["train_worker_nodes"]
    metrics = out["metrics"]
    # the last attempt began at a registered checkpoint (step 0 or 3) and finished the run
    assert metrics["start_step"] in (0, 3) and metrics["steps"] == MAX_STEPS
    assert metrics["train_loss"] == pytest.approx(expected[MAX_STEPS], rel=1e-6)
    losses = loss_history(workspace, run_id)  # no step logged twice across attempts
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] == pytest.approx(expected[MAX_STEPS], rel=1e-6)
