"""Autoscaling on the local cluster: 1 -> 2 replicas under load and back, with no failed request.

One deployment with tight autoscaling settings (load pushed every 0.5 s, decisions after 0.5 s up
and 2 s down) so both changes happen within seconds. The new replica must take its first request
only after its warm-up: each replica reports when it became ready (model loaded and warmed up) and
when its first HTTP request arrived (``/healthz``), and every response names the replica that served
it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from components.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

APP = "moeops-autoscale"
REPLICA_HEADER = "x-moeops-replica"
CLIENTS = 6  # concurrent clients under load: 3x the per-replica target of 2


@pytest.fixture(scope="module")
def autoscaled(ray_session, serve_port, tmp_path_factory, new_mlflow_store):
    from ray import serve

    from fixtures.tiny_model import register_tiny_models
    from serving.deploy.launch import deploy, wait_ready

    tmp = tmp_path_factory.mktemp("autoscale")
    config = load_config(
        [
            f"paths.root={tmp / 'moeops'}",
            f"tracking.uri={new_mlflow_store(tmp / 'mlflow.db')}",
            f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}",
            "experiment=tiny",
            "model.dim=32",
            "model.n_layers=1",
            "model.ffn_dim=64",
            "serve.num_cpus=0.25",
            "serve.max_num_seqs=8",
            "serve.max_ongoing_requests=16",
            f"serve.app_name={APP}",
            "serve.route_prefix=/autoscale-test",
            f"serve.port={serve_port}",
            "serve.auth_token_env=MOEOPS_TEST_NO_TOKEN",
            "serve.autoscaling.enabled=true",
            "serve.autoscaling.min_replicas=1",
            "serve.autoscaling.max_replicas=2",
            "serve.autoscaling.target_ongoing_requests=2",
            "serve.autoscaling.upscale_delay_s=0.5",
            "serve.autoscaling.downscale_delay_s=2",
            "serve.autoscaling.look_back_period_s=2",
            "serve.autoscaling.metrics_interval_s=0.5",
        ]
    )
    register_tiny_models(config, versions=1, work_dir=tmp / "work")
    url = deploy(config)
    wait_ready(url, timeout_s=180)
    yield url
    serve.delete(APP)


def _replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications[APP]
    return {
        str(getattr(state, "value", state)): count
        for state, count in app.deployments["CompletionServer"].replica_states.items()
    }


def _wait(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, (
            f"{what}: not after {timeout_s:.0f}s ({_replica_states()})"
        )
        time.sleep(0.2)
    return time.monotonic() - start


def test_scale_up_and_down_without_failed_requests(autoscaled):
    url = autoscaled
    assert _replica_states() == {"RUNNING": 1}
    first = httpx.get(f"{url}/healthz").json()["replica"]
    results: list[tuple[float, int, str]] = []  # (time, status, replica or error text)
    heavy, running = threading.Event(), threading.Event()
    heavy.set()
    running.set()

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while running.is_set():
                if i > 0 and not heavy.is_set():  # under light load only client 0 keeps sending
                    time.sleep(0.05)
                    continue
                tokens = 32 if heavy.is_set() else 4  # serve.max_tokens of experiment=tiny: 32
                try:
                    r = http.post(
                        f"{url}/v1/completions",
                        json={"prompt": f"c{i} {n}", "max_tokens": tokens, "ignore_eos": True},
                    )
                    results.append(
                        (
                            time.monotonic(),
                            r.status_code,
                            r.headers.get(REPLICA_HEADER, r.text[:200]),
                        )
                    )
                except httpx.HTTPError as err:
                    results.append((time.monotonic(), 0, f"{type(err).__name__}: {err}"))
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    load_started = time.time()
    for t in threads:
        t.start()
    try:
        up_s = _wait(lambda: _replica_states() == {"RUNNING": 2}, 180, "scale up to 2 replicas")
        _wait(lambda: len({r[2] for r in results if r[1] == 200}) == 2, 60, "both replicas serving")
        second = next(r[2] for r in results if r[1] == 200 and r[2] != first)
        # the new replica says when it became ready (model loaded, warm-up run) and when its first
        # request arrived; /healthz reaches either replica, so ask until the new one answers
        health = {}
        for _ in range(100):
            health = httpx.get(f"{url}/healthz").json()
            if health["replica"] == second:
                break
        assert health["replica"] == second, "the new replica never answered /healthz"
        heavy.clear()  # load drops to one client with short requests: Serve scales back to 1
        down_s = _wait(lambda: _replica_states() == {"RUNNING": 1}, 120, "scale down to 1 replica")
        time.sleep(1.0)  # requests keep flowing after the change
    finally:
        running.clear()
        heavy.set()
        for t in threads:
            t.join()

    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:3]}"
    served = Counter(r[2] for r in results)
    assert served[first] > 0 and served[second] > 0, served
    print(
        f"autoscale: up in {up_s:.1f}s, down in {down_s:.1f}s, {len(results)} requests, "
        f"per replica {dict(served)}"
    )
    assert health["ready_at"] is not None and health["first_request_at"] is not None, health
    assert health["first_request_at"] >= health["ready_at"], (
        f"the new replica took a request before warm-up: {health}"
    )
    assert health["ready_at"] > load_started, "the 'new' replica was ready before the load began"
    assert httpx.get(f"{url}/readyz").status_code == 200
