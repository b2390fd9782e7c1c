"""A training run on a three-node Ray cluster on this machine that loses a node mid-run.

Run by ``test_train_distributed.py::test_node_loss_finishes_from_the_latest_checkpoint`` in its own
process (the test session already has a Ray): ``python node_loss_run.py ARGS.json``, where
ARGS.json holds ``overrides`` (Hydra), ``manifest_uri``, ``name``, ``after_step`` (the step to
strike at, chosen at random by the test), ``mlflow_run_id`` and ``workdir``.

The cluster: a head node without CPUs (the driver and Ray Train's controller live there) and two
worker nodes with 2 CPUs each; the two training workers (1 CPU each) are packed onto one of
them. A watcher thread of this driver process, outside the training code (``fixtures.faults``),
polls the MLflow run for the step rank 0 has logged; once it reaches ``after_step`` it finds the
workers' node through Ray's public state API and removes that node (its raylet and every worker
on it are killed). Ray Train then restarts the workers on the surviving node, from the latest
registered checkpoint. Prints one line ``RESULT <json>``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Before Ray is imported: a private temp dir (sockets, session files, the "current cluster"
# address file) so nothing touches another Ray on this machine, and loopback addresses for every
# node (Ray resolves "the node's IP" to 127.0.0.1 when clusters are "not enabled").
# (the caller may name it in ARGS.json as ``ray_tmpdir``, to remove it should this process be
# killed)
os.environ["RAY_TMPDIR"] = json.loads(Path(sys.argv[1]).read_text()).get(
    "ray_tmpdir"
) or tempfile.mkdtemp(prefix="moeops-nl-", dir="/tmp")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_cluster(api_server_env: str, free_port):
    """A head without CPUs and two 2-CPU worker nodes; returns (cluster, worker nodes). Retried when
    Ray's fixed 30 s node start-up wait runs out on a loaded machine
    (``tests/fixtures/ray_start.py``)."""
    from ray.cluster_utils import Cluster

    from tests.fixtures.ray_start import start_with_retries

    started: list = []

    def start():
        # The state API of *this* cluster for every client in it (the fault watcher's list_actors,
        # Train's placement-group cleaner), set before the nodes start so their processes inherit
        # it. Ray's state client prefers RAY_API_SERVER_ADDRESS over the address it is given, and
        # the test process exports its own session cluster's dashboard there (tests/conftest.py):
        # inherited, it made list_actors answer for the wrong cluster and would let the cleaner
        # see this run's controller as dead and remove its placement group.
        dashboard_port = free_port()
        os.environ[api_server_env] = f"http://127.0.0.1:{dashboard_port}"
        started.clear()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "object_store_memory": 100 * 1024**2,
            },
        )
        started.append(cluster)
        workers = [
            cluster.add_node(num_cpus=2, object_store_memory=100 * 1024**2) for _ in range(2)
        ]
        cluster.wait_for_nodes(timeout=120)
        return cluster, workers

    def cleanup():
        if started:
            started[0].shutdown()

    return start_with_retries(start, cleanup, log=lambda line: print(line, flush=True))


def main(args_path: str) -> None:
    import ray

    from components.config import load_config
    from components.training.ray_runner import run_training
    from pipelines.runtime import API_SERVER_ENV, WORKER_ENV, free_port

    args = json.loads(Path(args_path).read_text())

    started = time.monotonic()
    cluster, workers = start_cluster(API_SERVER_ENV, free_port)
    # RAY_ADDRESS for Ray Train's helper actors that connect with address="auto": this cluster,
    # not whichever other Ray on the machine started last
    ray.init(
        address=cluster.address,
        runtime_env={"env_vars": {**WORKER_ENV, "RAY_ADDRESS": cluster.address}},
    )
    print(f"[node-loss] cluster up in {time.monotonic() - started:.1f}s", flush=True)

    from tests.fixtures.faults import FaultWatcher, at_step, train_workers

    config = load_config(args["overrides"])

    def remove_workers_node(reason: str) -> dict:
        alive = train_workers(cluster.address)
        if not alive:
            # (the symptom when the state API answers for another cluster: see start_cluster)
            raise RuntimeError("the state API lists no ALIVE training worker while it trains")
        wanted = alive[0].node_id
        node = next((n for n in workers if n.node_id == wanted), None)
        if node is None:  # not one of this cluster's worker nodes: the test fails on "removed"
            print(f"[node-loss] node {wanted} is not a worker node of this cluster", flush=True)
            return {}
        print(
            f"[node-loss] removing node {wanted[:12]} ({reason}, "
            f"{time.monotonic() - started:.1f}s)",
            flush=True,
        )
        cluster.remove_node(node, allow_graceful=False)
        return {"node_id": wanted, "reason": reason}

    watcher = FaultWatcher(
        at_step(config.tracking.uri, args["mlflow_run_id"], int(args["after_step"])),
        remove_workers_node,
    )
    try:
        with watcher:
            result = run_training(
                config,
                args["manifest_uri"],
                mlflow_run_id=args["mlflow_run_id"],
                name=args["name"],
            )
        print(f"[node-loss] training finished ({time.monotonic() - started:.1f}s)", flush=True)
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        struck = watcher.struck
        print(
            "RESULT "
            + json.dumps(
                {
                    "metrics": result.metrics,
                    "removed": struck.detail if struck else {},
                    "watcher_errors": watcher.errors,
                    "alive_nodes": alive,
                    "worker_nodes": [n.node_id for n in workers],
                    # every training worker actor the run started, dead ones included
                    "train_worker_nodes": [
                        w.node_id for w in train_workers(cluster.address, alive_only=False)
                    ],
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
