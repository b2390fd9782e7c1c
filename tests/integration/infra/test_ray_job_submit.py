"""The cluster path for real: a separate Ray head started with `ray start --head`, the tiny pipeline
submitted with `ray job submit` (working dir + infra/runtime_env.yaml, exactly as docs/cluster.md
says), its MLflow records checked, its Serve endpoint queried, then that head torn down.

The head is not the session's `ray_session`: this test must not touch the shared Ray. For the same
reason it does not run `ray stop` (which stops every Ray on the machine, the test session's too);
it ends exactly the processes it started, by process group and session directory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fixtures.tiny import SMALL
from pipelines.runtime import API_SERVER_ENV, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
RAY = str(Path(sys.executable).parent / "ray")
STAGES = ["prepare", "tune", "train", "evaluate", "register", "deploy"]
JOB_TIMEOUT_S = 600
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class RayHead:
    """`ray start --head --block` in its own process group, with the job server (dashboard) on
    loopback."""

    def __init__(self, env: dict[str, str]):
        # Token auth, as on a real cluster (and independent of any ~/.ray/auth_token on this
        # machine).
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        env = {**env, **self.auth_env}
        # Short path: Ray's unix sockets live under it and must fit in 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        command = [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--port={self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=4",
            "--num-gpus=0",
            "--object-store-memory=400000000",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
        ]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {self.process.returncode}: {self.start_log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # up, and asking for the token
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray dashboard not up after {timeout_s}s: {self.start_log()}")

    def start_log(self) -> str:
        return (Path(self.temp_dir) / "ray-start.log").read_text()[-3000:]

    def stop(self) -> None:
        """SIGTERM everything this head started, SIGKILL what is left after a grace period; nothing
        else."""
        ours = self._our_pids()  # now, before parents die and their children are re-parented
        # a throwaway cluster: a short grace (with 20 s, a teardown at load 20 took 25 s, so some
        # of the head's processes were still there, or unreaped, 20 s after SIGTERM)
        for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            for pid in ours:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                self.process.poll()  # reap `ray start` so it does not linger as a zombie
                ours = [pid for pid in ours if _alive(pid)]
                if not ours:
                    break
                time.sleep(0.5)
            # children started while shutting down (a restarted worker) are ours too
            ours = [pid for pid in sorted(set(ours) | set(self._our_pids())) if _alive(pid)]
            if not ours:
                break
        self.log.close()

    def _our_pids(self) -> list[int]:
        """Descendants of `ray start` (workers rename themselves and start their own sessions,
        so neither the process group nor the command line finds them) and any process naming
        our temp dir."""
        parent_of: dict[int, int] = {}
        named: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            pid = int(entry.name)
            parent_of[pid] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
            if self.temp_dir.encode() in cmdline:
                named.add(pid)
        ours = {self.process.pid}
        while True:
            children = {pid for pid, parent in parent_of.items() if parent in ours} - ours
            if not children:
                break
            ours |= children
        # Never this process or its ancestors (make, the CI shell): a recycled pid of `ray start`
        # must not turn the test's own parents into "descendants".
        protected, pid = set(), os.getpid()
        while pid > 1 and pid not in protected:
            protected.add(pid)
            pid = parent_of.get(pid, 1)
        return sorted((ours | named) - protected)


def _alive(pid: int) -> bool:
    """Running, not a zombie: an exited process whose new parent has not reaped it yet (a
    container's init may never do so) keeps its /proc entry, and waiting on it spent the whole
    20 s grace period of every teardown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # field 3, the state, after "(comm)"


def client_env(head: RayHead) -> dict[str, str]:
    """What a user's shell holds to talk to the cluster: its token, not its tracking URI."""
    # (not the test session's cluster: RAY_API_SERVER_ADDRESS would override --address)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", API_SERVER_ENV)
    }
    return {**env, **head.auth_env}


@pytest.fixture
def ray_head(tmp_path):
    env = dict(os.environ)
    # The job's `python` must be this venv's; the head's environment is what jobs inherit, which
    # is how a cluster passes MLFLOW_TRACKING_URI and credentials without writing them to a file.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key in ("RAY_ADDRESS", "MOEOPS_HOME", API_SERVER_ENV):
        env.pop(key, None)
    head = RayHead(env)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def ray_cli(head: RayHead, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args],
        cwd=REPO,
        env=client_env(head),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


NO_AGENT = "No available agent to submit job"  # the job server's 500 before its agent registered


def submit(head: RayHead, entrypoint: list[str], agent_wait_s: float = 120) -> str:
    """`ray job submit --no-wait`; retried while the head's job agent is not up yet (the dashboard
    answers before the agent registers: on the loaded 2-core machine that took over 30 s)."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        submission_id = f"moeops-test-{int(time.time())}"
        result = ray_cli(
            head,
            "job",
            "submit",
            "--address",
            head.dashboard,
            "--submission-id",
            submission_id,
            "--no-wait",
            "--working-dir",
            ".",
            "--runtime-env",
            "infra/runtime_env.yaml",
            "--",
            *entrypoint,
        )
        if result.returncode == 0 or NO_AGENT not in result.stderr + result.stdout:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0, result.stdout + result.stderr
    return submission_id


def job_api(head: RayHead, path: str, method: str = "GET") -> dict:
    """The job server's REST API (what `ray job status/logs/stop` call), with the cluster token."""
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{path}",
        method=method,
        headers={"Authorization": f"Bearer {head.auth_env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_job(head: RayHead, submission_id: str) -> tuple[str, str]:
    """Poll the job until it ends; its final status and logs."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = job_api(head, submission_id)["status"]
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)  # a local REST call: polling often costs nothing, waiting 3 s did
        status = job_api(head, submission_id)["status"]
    if status not in TERMINAL:
        job_api(head, f"{submission_id}/stop", method="POST")
    return status, job_api(head, f"{submission_id}/logs")["logs"]


# a second Ray cluster (`ray start --head`) and a whole pipeline through the job API: ~100 s
@pytest.mark.slow
def test_tiny_pipeline_via_ray_job_submit(ray_head, tmp_path):
    root = tmp_path / "moeops"
    serve_port = free_port()
    entrypoint = [
        "python",
        "-m",
        "pipelines.run",
        *SMALL,  # experiment=tiny at the smallest data and model sizes (fixtures/tiny.py)
        "cluster=remote",
        f"paths.root={root}",
        f"serve.port={serve_port}",
        "run_name=ray-job-submit",
        "stages=[" + ",".join(STAGES) + "]",
        # every stage, fewer models: the sweep and the comparison are tested in depth elsewhere
        "tune.num_samples=1",
        "evaluate.compare_dense=false",
        # and smaller ones: one worker per trial and for the training (expert parallelism over two
        # workers is test_train_distributed's and test_pipeline_e2e's), a third of tiny's steps
        "tune.trial_num_workers=1",
        "tune.trial_max_steps=5",
        "train.num_workers=1",
        "train.expert_parallel_size=1",
        "train.max_steps=10",
        "train.warmup_steps=2",
        "train.eval_every=5",
        "train.checkpoint_every=5",
    ]
    submission_id = submit(ray_head, entrypoint)
    status, logs = wait_for_job(ray_head, submission_id)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "joining cluster at" in logs  # cluster=remote joined our head, not a fresh local Ray

    # The tracking URI reached the job through the head's environment only.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("moeops")
    assert experiment is not None, "the job wrote no MLflow experiment"
    parents = client.search_runs([experiment.experiment_id], "tags.`moeops.kind` = 'pipeline'")
    assert [run.info.run_name for run in parents] == ["ray-job-submit"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["cluster.mode"] == "remote"
    assert parent.data.params["paths.root"] == str(root)
    resources = json.loads(parent.data.tags["moeops.ray.resources"])
    assert resources["CPU"] == 4.0  # the head we started

    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_stage = {run.data.tags["moeops.stage"]: run for run in children}
    assert sorted(by_stage) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children)
    assert by_stage["train"].data.metrics["val_loss"] > 0
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{by_stage['tune'].info.run_id}'"
    )
    assert len(trials) == 1 and "val_loss" in trials[0].data.metrics  # a trial ran on our cluster
    outputs = by_stage["register"].data.tags
    version = client.get_model_version(
        outputs["moeops.out.model_name"], outputs["moeops.out.model_version"]
    )
    assert version.status == "READY"

    # The deploy stage left the model served by the cluster.
    endpoint = by_stage["deploy"].data.tags["moeops.out.endpoint"]
    request = urllib.request.Request(
        f"{endpoint}/v1/completions",
        json.dumps({"prompt": "def ", "max_tokens": 4, "seed": 1}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert body["usage"]["completion_tokens"] >= 1
