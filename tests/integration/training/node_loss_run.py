"""A training run on a three-node Ray cluster on this machine that loses a node mid-run.

Run by ``test_train_distributed.py::test_node_loss_finishes_from_the_latest_checkpoint`` in its own
process (the test session already has a Ray): ``python node_loss_run.py ARGS.json``, where
ARGS.json holds ``overrides`` (Hydra), ``manifest_uri``, ``name``, ``after_step`` and ``workdir``.

The cluster: a head node without CPUs (the driver and Ray Train's controller live there) and two
worker nodes with 2 CPUs each; the two training workers (1 CPU each) are packed onto one of
them. A Ray Train callback installed here notices the checkpoint of ``after_step`` (it runs in the
controller once the checkpoint is registered) and asks the driver to remove the node its workers
run on; it holds the controller until the node is gone, so the failure always happens before the
run can finish. Ray Train then restarts the workers on the surviving node, from that checkpoint.
Prints one line ``RESULT <json>``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
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


def remove_node_on_request(callback_dir: Path, address: str):
    """A Ray Train callback: after the first checkpoint at or past ``after_step``, write the node id
    of the training workers to ``callback_dir/remove`` and wait for ``callback_dir/removed``."""
    from ray.train import UserCallback

    class RemoveWorkersNode(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            from ray.util.state import list_actors

            from pipelines.runtime import API_SERVER_ENV

            request, done = callback_dir / "remove", callback_dir / "removed"
            after_step = int((callback_dir / "after_step").read_text())
            if (
                checkpoint is None
                or not metrics
                or request.exists()
                or int(metrics[0]["step"]) < after_step
            ):
                return
            workers = list_actors(
                address=address,
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            )
            if not workers:
                # (the symptom when the state API answered for another cluster: see main())
                raise RuntimeError(
                    f"the state API at {os.environ.get(API_SERVER_ENV) or address} lists no "
                    "ALIVE RayTrainWorker while training reports"
                )
            request.write_text(
                json.dumps({"node_id": workers[0].node_id, "step": int(metrics[0]["step"])})
            )
            deadline = time.monotonic() + 120
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    return RemoveWorkersNode()


def start_cluster(api_server_env: str, free_port):
    """A head without CPUs and two 2-CPU worker nodes; returns (cluster, worker nodes). Retried when
    Ray's fixed 30 s node start-up wait runs out on a loaded machine
    (``tests/fixtures/ray_start.py``)."""
    from ray.cluster_utils import Cluster

    from tests.fixtures.ray_start import start_with_retries

    started: list = []

    def start():
        # The state API of *this* cluster for every client in it (the fault callback's list_actors,
        # Train's placement-group cleaner), set before the nodes start so their processes inherit
        # it.
        # Ray's state client prefers RAY_API_SERVER_ADDRESS over the address it is given, and the
        # test
        # process exports its own session cluster's dashboard there (tests/conftest.py): inherited,
        # it
        # made list_actors answer for the wrong cluster (no workers -> "list index out of range" in
        # the
        # controller) and would let the cleaner see this run's controller as dead and remove its
        # placement group.
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
    callback_dir = Path(args["workdir"])
    (callback_dir / "after_step").write_text(str(args["after_step"]))

    started = time.monotonic()
    cluster, workers = start_cluster(API_SERVER_ENV, free_port)
    # RAY_ADDRESS for Ray Train's helper actors that connect with address="auto": this cluster,
    # not whichever other Ray on the machine started last
    ray.init(
        address=cluster.address,
        runtime_env={"env_vars": {**WORKER_ENV, "RAY_ADDRESS": cluster.address}},
    )
    print(f"[node-loss] cluster up in {time.monotonic() - started:.1f}s", flush=True)

    removed: dict = {}

    def remover() -> None:
        request = callback_dir / "remove"
        while not request.exists():
            time.sleep(0.1)
        wanted = json.loads(request.read_text())
        node = next((n for n in workers if n.node_id == wanted["node_id"]), None)
        if (
            node is None
        ):  # not one of this cluster's worker nodes: let the callback go on, the test fails
            print(
                f"[node-loss] node {wanted['node_id']} is not a worker node of this cluster",
                flush=True,
            )
            (callback_dir / "removed").write_text("not found")
            return
        print(
            f"[node-loss] removing node {wanted['node_id'][:12]} after the step-{wanted['step']} "
            "checkpoint "
            f"({time.monotonic() - started:.1f}s)",
            flush=True,
        )
        cluster.remove_node(node, allow_graceful=False)
        removed.update(wanted)
        (callback_dir / "removed").write_text("done")

    threading.Thread(target=remover, daemon=True).start()
    try:
        config = load_config(args["overrides"])
        result = run_training(
            config,
            args["manifest_uri"],
            mlflow_run_id=None,
            name=args["name"],
            callbacks=[remove_node_on_request(callback_dir, cluster.address)],
        )
        print(f"[node-loss] training finished ({time.monotonic() - started:.1f}s)", flush=True)
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(
            "RESULT "
            + json.dumps(
                {
                    "metrics": result.metrics,
                    "removed": removed,
                    "alive_nodes": alive,
                    "worker_nodes": [n.node_id for n in workers],
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
