"""The Serve application over real HTTP on loopback, against a real MLflow registry.

One module-scoped deployment of a tiny registered model (v1 champion, v2 challenger)
serves every test; tests that reconfigure it (canary, version switch) run last.
"""
from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from components.config import Config, load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

VERSION_HEADER = "x-moeops-model-version"


@dataclass
class Deployment:
    config: Config
    url: str                 # base URL of the app (no /v1)
    versions: list[str]      # registered versions: [champion, challenger]

    @property
    def name(self) -> str:
        return self.config.registry.model_name


def serving_config(tmp, port: int, extra: tuple[str, ...] = ()) -> Config:
    # own route prefix: other tests (the pipeline's deploy stage) may serve an app at "/" on the same proxy
    return load_config([
        f"paths.root={tmp / 'moeops'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}",
        "experiment=tiny", "model.dim=32", "model.n_layers=1", "model.ffn_dim=64",
        "serve.num_cpus=0.25", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.02",
        "serve.load_retry_s=0.5", "serve.max_body_bytes=4096", "serve.max_prompts=4",
        "serve.max_prompt_tokens=48", "serve.max_tokens=32", "serve.app_name=moeops-test",
        "serve.route_prefix=/serving-test", "serve.auth_token_env=MOEOPS_TEST_NO_TOKEN", f"serve.port={port}", *extra,
    ])


@pytest.fixture(scope="module")
def deployment(ray_session, serve_port, tmp_path_factory):
    from ray import serve

    from serving.launch import deploy, wait_ready
    from serving.tiny_model import register_tiny_models

    tmp = tmp_path_factory.mktemp("serving")
    config = serving_config(tmp, serve_port)
    registrations = register_tiny_models(config, versions=2, work_dir=tmp / "work")
    url = deploy(config)
    wait_ready(url, timeout_s=120)
    yield Deployment(config, url, [r.version for r in registrations])
    serve.delete(config.serve.app_name)


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


# --------------------------------------------------------------------------- basics

def test_probes_models_and_metrics(deployment):
    url = deployment.url
    assert httpx.get(f"{url}/healthz").json()["status"] == "alive"
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    models = httpx.get(f"{url}/v1/models").json()
    ids = {m["id"]: m for m in models["data"]}
    assert ids[deployment.name]["version"] == deployment.versions[0]
    assert ids[deployment.name]["traffic_share"] == 1.0
    complete(url, prompt="def f(", max_tokens=2)
    metrics = httpx.get(f"{url}/metrics").text
    assert "moeops_requests_total" in metrics and "moeops_request_latency_seconds_bucket" in metrics
    assert f'model_version="{deployment.name}/{deployment.versions[0]}"' in metrics
    assert "moeops_batch_size_bucket" in metrics and "moeops_tokens_per_second" in metrics
    assert httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/completions"]["post"]


def test_single_completion(deployment):
    r = complete(deployment.url, model=deployment.name, prompt="def main(", max_tokens=8, temperature=0.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == deployment.name
    assert r.headers[VERSION_HEADER] == f"{deployment.name}/{deployment.versions[0]}"
    assert body["model_version"] == deployment.versions[0]
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_list_of_prompts(deployment):
    prompts = ["import os", "class A:", "x = 1"]
    r = complete(deployment.url, prompt=prompts, max_tokens=4, temperature=0.0)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    # each choice equals what that prompt gets alone (greedy, so batching must not change it)
    for prompt, choice in zip(prompts, choices):
        alone = complete(deployment.url, prompt=prompt, max_tokens=4, temperature=0.0).json()
        assert alone["choices"][0]["text"] == choice["text"]


def test_seeded_output_is_deterministic_even_when_batched(deployment):
    body = dict(prompt="def handler(event):", max_tokens=16, temperature=1.0, seed=1234)
    alone = complete(deployment.url, **body).json()["choices"][0]["text"]
    others = [dict(prompt=f"x{i} = ", max_tokens=16, temperature=1.0, seed=i) for i in range(7)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, deployment.url, **b) for b in [*others[:4], body, *others[4:]]]
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in results)
    assert results[4].json()["choices"][0]["text"] == alone
    batch_sizes = httpx.get(f"{deployment.url}/metrics").text
    assert "moeops_batch_size_count" in batch_sizes
    different_seed = complete(deployment.url, **{**body, "seed": 99}).json()["choices"][0]["text"]
    assert different_seed != alone


def test_streaming_matches_non_streaming(deployment):
    body = dict(prompt="for i in range(", max_tokens=12, temperature=0.7, seed=7)
    expected = complete(deployment.url, **body).json()
    events = []
    with httpx.stream("POST", f"{deployment.url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected["choices"][0]["text"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [expected["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == expected["usage"]


def test_max_tokens_and_stop_sequences(deployment):
    url = deployment.url
    long = complete(url, prompt="def main(", max_tokens=20, temperature=0.0).json()
    assert long["choices"][0]["finish_reason"] == "length" or long["usage"]["completion_tokens"] < 20
    assert long["usage"]["completion_tokens"] <= 20
    text = long["choices"][0]["text"]
    short = complete(url, prompt="def main(", max_tokens=3, temperature=0.0).json()
    assert short["usage"]["completion_tokens"] <= 3
    # a stop sequence taken from the middle of the greedy output cuts the text just before it
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"greedy text too degenerate for a stop test: {text!r}"
    stopped = complete(url, prompt="def main(", max_tokens=20, temperature=0.0, stop=[stop, "\x00never"]).json()
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.find(stop)]
    assert stop not in choice["text"]


def test_score(deployment):
    r = httpx.post(f"{deployment.url}/v1/score", json={"text": "def main():\n    return 0\n"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_logprobs"][0] is None and len(body["token_logprobs"]) == len(body["token_ids"])
    logprobs = body["token_logprobs"][1:]
    assert all(lp <= 0 for lp in logprobs)
    assert math.isclose(body["perplexity"], math.exp(-sum(logprobs) / len(logprobs)), rel_tol=1e-6)
    assert "".join(body["tokens"]) == "def main():\n    return 0\n"
    assert r.headers[VERSION_HEADER].endswith(f"/{deployment.versions[0]}")


def test_official_openai_client(deployment):
    import openai

    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    assert deployment.name in [m.id for m in client.models.list().data]
    completion = client.completions.create(model=deployment.name, prompt="import ", max_tokens=6, seed=3,
                                           temperature=0.5)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=deployment.name, prompt="import ", max_tokens=6, seed=3, temperature=0.5, stream=True)
        if chunk.choices)
    assert streamed == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=deployment.name, prompt="x", max_tokens=10_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


# --------------------------------------------------------------------------- bad input

BAD_REQUESTS = [
    # (case, raw body, expected status, expected param)
    ("malformed json", b'{"prompt": "x", ', 400, None),
    ("non-utf8 body", b'{"prompt": "\xff\xfe"}', 400, None),
    ("body too large", json.dumps({"prompt": "x" * 5000}).encode(), 413, None),
    ("not an object", b'["x"]', 400, None),
    ("unknown field", b'{"prompt": "x", "max_tokns": 3}', 400, "max_tokns"),
    ("missing prompt", b'{"max_tokens": 3}', 400, "prompt"),
    ("wrong type max_tokens", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("bool as int", b'{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
    ("wrong type prompt", b'{"prompt": 5}', 400, "prompt"),
    ("empty prompt", b'{"prompt": ""}', 400, "prompt"),
    ("whitespace prompt", b'{"prompt": "   "}', 400, "prompt"),
    ("empty prompt list", b'{"prompt": []}', 400, "prompt"),
    ("empty prompt in list", b'{"prompt": ["ok", ""]}', 400, "prompt"),
    ("lone surrogate", b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("too many prompts", json.dumps({"prompt": ["a"] * 5}).encode(), 400, "prompt"),
    ("prompt too long", json.dumps({"prompt": "a b c d " * 40}).encode(), 400, "prompt"),
    ("max_tokens zero", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("max_tokens over limit", b'{"prompt": "x", "max_tokens": 33}', 400, "max_tokens"),
    ("temperature out of range", b'{"prompt": "x", "temperature": 2.5}', 400, "temperature"),
    ("top_p zero", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("negative seed", b'{"prompt": "x", "seed": -1}', 400, "seed"),
    ("too many stops", b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ("n > 1", b'{"prompt": "x", "n": 2}', 400, "n"),
    ("unknown model", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
]


@pytest.mark.parametrize("case,raw,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_completion_requests(deployment, case, raw, status, param):
    r = httpx.post(f"{deployment.url}/v1/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param, f"{case}: {error}"
    if param:
        assert param in error["message"]


def test_edge_values_are_served_not_crashed(deployment):
    url = deployment.url
    for body in [dict(prompt="x", temperature=1e-40, max_tokens=3), dict(prompt="x", top_p=1e-30, max_tokens=3),
                 dict(prompt="x", seed=2**63 - 1, max_tokens=3), dict(prompt="héllo ✓ 日本 \U0001F600", max_tokens=3),
                 dict(prompt=["a", "b c", "d"], stop=["\n", "zz"], max_tokens=32)]:
        r = complete(url, **body)
        assert r.status_code == 200, (body, r.text)
        assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
    assert complete(url, prompt="x").json()["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens


def test_bad_score_requests_and_replica_stays_ready(deployment):
    url = deployment.url
    for raw, param in [(b'{"text": ""}', "text"), (b'{"text": 3}', "text"), (b'{"txt": "a"}', "txt"),
                       (json.dumps({"text": "word " * 300}).encode(), None)]:
        r = httpx.post(f"{url}/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413), r.text
        if param:
            assert r.json()["error"]["param"] == param
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert complete(url, prompt="ok", max_tokens=2).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("moeops_requests_total")]
    assert any(all(label in line for label in ('route="/v1/score"', 'status="400"', 'model_version="none"'))
               for line in counted), counted


# --------------------------------------------------------------------------- readiness and auth

def test_unready_until_model_exists_then_auth_protects_all_but_probes(deployment, monkeypatch):
    """A second app whose alias does not exist yet: alive but unready; auth on via the token env var."""
    import openai
    from mlflow import MlflowClient
    from ray import serve

    from components.config import with_overrides
    from serving.launch import deploy, wait_ready

    token = "s3cret-token"
    monkeypatch.setenv("MOEOPS_TEST_TOKEN", token)
    config = with_overrides(deployment.config, {
        "serve.app_name": "moeops-gated", "serve.route_prefix": "/gated",
        "serve.auth_token_env": "MOEOPS_TEST_TOKEN",
        "serve.model_uri": f"models:/{deployment.name}@staging"})
    url = deploy(config)
    try:
        auth = {"authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/healthz").status_code == 200
        unready = httpx.get(f"{url}/readyz")
        assert unready.status_code == 503 and unready.json()["ready"] is False
        assert "staging" in unready.json()["reason"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"

        MlflowClient(config.tracking.uri).set_registered_model_alias(deployment.name, "staging",
                                                                     deployment.versions[1])
        assert wait_ready(url, timeout_s=60)["versions"][deployment.name] == deployment.versions[1]

        for path, method in [("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/completions", "POST"),
                             ("/v1/score", "POST"), ("/docs", "GET")]:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
                r = httpx.request(method, f"{url}{path}", headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
        assert ok.status_code == 200 and ok.headers[VERSION_HEADER].endswith(f"/{deployment.versions[1]}")

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        assert client.completions.create(model=deployment.name, prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        # the main app (no token configured) stays open
        assert httpx.get(f"{deployment.url}/v1/models").status_code == 200
    finally:
        serve.delete("moeops-gated")


# --------------------------------------------------------------------------- canary and switch

def _replica(url: str) -> str:
    return httpx.get(f"{url}/healthz").json()["replica"]


def test_canary_split(deployment):
    from components.config import with_overrides
    from serving.launch import deploy

    replica = _replica(deployment.url)
    fraction, n = 0.3, 240
    deploy(with_overrides(deployment.config, {"serve.canary_fraction": fraction}))
    models = {m["id"]: m for m in httpx.get(f"{deployment.url}/v1/models").json()["data"]}
    challenger = models[f"{deployment.name}@challenger"]
    assert challenger["version"] == deployment.versions[1] and challenger["traffic_share"] == fraction

    def one(i: int) -> str:
        r = complete(deployment.url, prompt=f"v{i}", max_tokens=1)
        assert r.status_code == 200, r.text
        return r.json()["model_version"]

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(one, range(n)))
    share = versions.count(deployment.versions[1]) / n
    tolerance = 4 * math.sqrt(fraction * (1 - fraction) / n)  # 4 sigma of a binomial share
    assert abs(share - fraction) < tolerance, f"challenger share {share:.3f} vs {fraction} ± {tolerance:.3f}"
    assert set(versions) == set(deployment.versions)
    # pinning a version by alias bypasses the split
    pinned = complete(deployment.url, model=f"{deployment.name}@challenger", prompt="x", max_tokens=1)
    assert pinned.json()["model_version"] == deployment.versions[1]
    metrics = httpx.get(f"{deployment.url}/metrics").text
    for version in deployment.versions:
        assert f'moeops_generated_tokens_total{{model_version="{deployment.name}/{version}"' in metrics
    assert _replica(deployment.url) == replica, "reconfiguring must not restart the replica"
    deploy(deployment.config)  # canary off again


def test_int8_quantized_replica_in_place(deployment):
    from components.config import with_overrides
    from serving.launch import deploy

    url, replica = deployment.url, _replica(deployment.url)
    fp32 = httpx.post(f"{url}/v1/score", json={"text": "def main():\n    return 0\n"}).json()["perplexity"]
    deploy(with_overrides(deployment.config, {"serve.quantize": "int8"}))
    try:
        r = complete(url, prompt="def main(", max_tokens=6, seed=1)
        assert r.status_code == 200 and r.headers[VERSION_HEADER].endswith("-int8"), r.headers
        int8 = httpx.post(f"{url}/v1/score", json={"text": "def main():\n    return 0\n"}).json()["perplexity"]
        assert abs(int8 - fp32) / fp32 < 0.2  # dynamic int8 barely moves perplexity
        assert _replica(url) == replica
    finally:
        deploy(deployment.config)
    assert not complete(url, prompt="x", max_tokens=1).headers[VERSION_HEADER].endswith("-int8")


def test_version_switch_under_continuous_requests(deployment):
    from mlflow import MlflowClient

    from serving.launch import deploy

    url, (v1, v2) = deployment.url, deployment.versions
    replica = _replica(url)
    stop = threading.Event()
    results: list[tuple[float, int, str]] = []

    def client_loop(worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = 0
            while not stop.is_set():
                r = http.post(f"{url}/v1/completions", json={"prompt": f"w{worker} {i}", "max_tokens": 4})
                results.append((time.monotonic(), r.status_code, r.headers.get(VERSION_HEADER, r.text)))
                i += 1

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        MlflowClient(deployment.config.tracking.uri).set_registered_model_alias(deployment.name, "champion", v2)
        deploy(deployment.config, revision=v2)  # user_config changes: reconfigure in place
        switched_at = time.monotonic()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failures = [r for r in results if r[1] != 200]
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    served = [version for _, _, version in results]
    assert f"{deployment.name}/{v1}" in served
    after = [version for at, _, version in results if at > switched_at + 0.5]
    assert after and set(after) == {f"{deployment.name}/{v2}"}, set(after)
    assert _replica(url) == replica, "the switch must not restart the replica"


# --------------------------------------------------------------------------- bounded load

def test_bounded_load_32_clients(deployment):
    import asyncio

    from ray import serve

    url, replica = deployment.url, _replica(deployment.url)
    duration_s, clients = 10.0, 32
    statuses: list[int] = []

    async def client(i: int, http: httpx.AsyncClient, deadline: float) -> None:
        n = 0
        while time.monotonic() < deadline:
            r = await http.post(f"{url}/v1/completions",
                                json={"prompt": f"load {i} {n}", "max_tokens": 8, "seed": n})
            statuses.append(r.status_code)
            n += 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            deadline = time.monotonic() + duration_s
            await asyncio.gather(*(client(i, http, deadline) for i in range(clients)))

    asyncio.run(main())
    errors = [s for s in statuses if s != 200]
    assert len(statuses) >= clients and not errors, f"{len(errors)} errors of {len(statuses)}: {set(errors)}"
    assert _replica(url) == replica, "the replica restarted under load"
    status = serve.status().applications[deployment.config.serve.app_name]
    assert status.status == "RUNNING"
    assert httpx.get(f"{url}/readyz").status_code == 200


# --------------------------------------------------------------------------- the deploy stage

def test_deploy_stage_writes_serve_config_and_smoke_tests(deployment, tmp_path):
    import dataclasses

    import yaml
    from mlflow import MlflowClient
    from ray import serve

    from components.config import to_container, with_overrides
    from components.tracking.stages import StageContext
    from pipelines import deploy as deploy_stage
    from pipelines.outputs import DeployOutputs, RegisterOutputs

    registered = RegisterOutputs(model_name=deployment.name, model_version=deployment.versions[0], model_id="",
                                 aliases=["champion"], promoted=True, reason="", previous_champion="")
    config = with_overrides(deployment.config, {"serve.app_name": "moeops-stage", "serve.route_prefix": "/stage"})
    client = MlflowClient(config.tracking.uri)
    experiment_id = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    run_id = client.create_run(experiment_id, run_name="deploy").info.run_id
    ctx = StageContext(name="deploy", config=config, config_dict=to_container(config), run_id=run_id,
                       parent_run_id="", experiment_id=experiment_id, tracking_uri=config.tracking.uri,
                       client=client, inputs={"register": registered}, work_dir=tmp_path)
    try:
        outputs = deploy_stage.run(ctx)
        assert isinstance(outputs, DeployOutputs)
        champion = str(client.get_model_version_by_alias(deployment.name, "champion").version)
        assert outputs.endpoint.endswith("/stage") and outputs.model_version == champion
        written = yaml.safe_load(open(outputs.serve_config_path))
        assert written["applications"][0]["import_path"] == "serving.app:build_app"
        assert written["applications"][0]["deployments"][0]["user_config"]["revision"] == champion
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"serve_config.yaml", "smoke_response.json"} <= artifacts
        smoke = json.loads(open(client.download_artifacts(run_id, "smoke_response.json", str(tmp_path))).read())
        assert smoke["response"]["choices"] and smoke["readyz"]["ready"] is True
        assert deploy_stage.still_serving(config, outputs)
        assert not deploy_stage.still_serving(config, dataclasses.replace(outputs, model_version="999"))
    finally:
        serve.delete("moeops-stage")
    assert not deploy_stage.still_serving(config, outputs)
