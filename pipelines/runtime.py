"""Starting or joining Ray: the one place batch stages get their cluster from."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from components.config import Config

# Remote tasks, Train workers and Tune trials must not change directory or phone home.
WORKER_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


# Ray's documented variable naming the dashboard (state API) a client talks to
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for Ray's dashboard, Serve, test servers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Keep a Python SIGTERM handler installed before ``ray.init`` (the pipeline's, which ends
    MLflow
    runs as KILLED): ``ray.init`` replaces it with one that exits at once. Ray's own cleanup of a
    local cluster still runs, from its ``atexit`` hook, when the interrupted pipeline exits."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def ensure_ray(config: Config) -> None:
    """Reuse an initialised Ray (tests, Hydra multirun); else start or join one per
    ``cluster.*``."""
    if ray.is_initialized():
        return
    # A submitted job's runtime env is already in this process' environment, and Ray refuses a
    # second runtime env that sets the same variables: add only what is missing.
    missing = {key: value for key, value in WORKER_ENV.items() if key not in os.environ}
    os.environ.update(missing)
    cluster = config.cluster
    runtime_env = {"env_vars": missing} if missing else None
    if cluster.mode == "remote":
        address = cluster.address or os.environ.get("RAY_ADDRESS") or "auto"
        print(f"[ray] joining cluster at {address}", flush=True)
        with keep_sigterm_handler():
            ray.init(address=address, namespace=cluster.namespace, runtime_env=runtime_env)
        return
    print(f"[ray] starting local Ray: {cluster.num_cpus} CPUs, {cluster.num_gpus} GPUs", flush=True)
    # Under `ray job submit` RAY_ADDRESS points at the cluster; a local start must not join it.
    os.environ.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    # Ray's state API clients inside the cluster (Train's placement-group cleaner) otherwise find
    # "the" cluster by scanning the machine's processes, and fail when another Ray runs on the same
    # machine. Set before ray.init, so the raylet, and every worker it starts, inherit it.
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
    with keep_sigterm_handler():
        ray.init(
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            object_store_memory=cluster.object_store_memory_mb * 1024**2,
            # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs
            # to
            # see a dead controller (an ASHA-stopped trial, a killed worker); without it the dead
            # run's
            # placement group keeps its CPUs forever and later runs wait on them.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            namespace=cluster.namespace,
            runtime_env=runtime_env,
            # Private, kept on purpose: a local cluster must live on loopback only, and ray.init has
            # no public parameter or environment variable for the node's IP (Ray otherwise picks the
            # machine's outbound interface). The public route, `ray start --head --node-ip-address`,
            # starts a detached cluster that outlives this process and needs `ray stop`, which
            # would stop every Ray cluster of the user on the machine.
            _node_ip_address="127.0.0.1",
        )


def cluster_tags() -> dict[str, str]:
    if not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    return {
        "moeops.ray.address": context.gcs_address,
        "moeops.ray.resources": json.dumps(
            {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
            sort_keys=True,
        ),
        "moeops.ray.job_id": context.get_job_id(),
    }
