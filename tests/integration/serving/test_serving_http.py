"""The Serve application over real HTTP on loopback, against a real MLflow registry.

One module-scoped deployment of a tiny registered model (v1 champion, v2 challenger)
serves every test: every OpenAI request shape (completions and chat) with its effect, the
engine's scheduling seen from outside (a short request is not held behind long ones, a client
that goes away stops its sequences, the queue limit answers 429), bad input, auth, canary,
version switch and a bounded load. Tests that reconfigure it (canary, int8, switch) run last.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from components.config import Config, load_config

# the first test also pays for the module's deployment (Ray, Serve, registry, warm-up): slow on a
# loaded box
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

VERSION_HEADER = "x-moeops-model-version"
REPLICA_HEADER = "x-moeops-replica"
MAX_TOKENS = 448  # serve.max_tokens of this deployment
LONG = 400  # max_tokens of the "long" requests (each holds its slot for LONG decode steps)


@dataclass
class Deployment:
    config: Config
    url: str  # base URL of the app (no /v1)
    versions: list[str]  # registered versions: [champion, challenger]

    @property
    def name(self) -> str:
        return self.config.registry.model_name


def serving_config(tmp, port: int, extra: tuple[str, ...] = ()) -> Config:
    # own route prefix: other tests (the pipeline's deploy stage) may serve an app at "/" on the
    # same proxy
    return load_config(
        [
            f"paths.root={tmp / 'moeops'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}",
            "experiment=tiny",
            "model.dim=32",
            "model.n_layers=1",
            "model.ffn_dim=64",
            "model.max_seq_len=512",
            "serve.num_cpus=0.25",
            "serve.max_num_seqs=16",
            "serve.max_queued_sequences=64",
            "serve.load_retry_s=0.5",
            "serve.max_body_bytes=4096",
            "serve.max_prompts=4",
            "serve.max_prompt_tokens=64",
            "serve.max_tokens=448",
            "serve.app_name=moeops-test",
            "serve.route_prefix=/serving-test",
            "serve.auth_token_env=MOEOPS_TEST_NO_TOKEN",
            f"serve.port={port}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def deployment(ray_session, serve_port, tmp_path_factory, new_mlflow_store):
    from ray import serve

    from fixtures.tiny_model import register_tiny_models

    tmp = tmp_path_factory.mktemp("serving")
    new_mlflow_store(tmp / "mlflow.db")  # serving_config's store: an empty one, migrated
    config = serving_config(tmp, serve_port)
    registrations = register_tiny_models(config, versions=2, work_dir=tmp / "work")
    # declaratively (the Serve config file through Serve's REST API): the tests that change
    # settings then reconfigure the one replica in place instead of replacing it
    url = apply(config)
    yield Deployment(config, url, [r.version for r in registrations])
    serve.delete(config.serve.app_name)


def apply(config: Config, revision: str = "", base: Config | None = None) -> str:
    """``serve deploy`` of ``config``'s Serve config file, ``args`` those of ``base`` (the first
    deployment's); returns once the replica serves it."""
    import os

    from pipelines.runtime import API_SERVER_ENV
    from serving.deploy.launch import apply_config

    dashboard = os.environ[API_SERVER_ENV]
    return apply_config(config, dashboard, revision=revision, args_from=base)


def replica_identity(url: str) -> tuple[str, int]:
    health = httpx.get(f"{url}/healthz").json()
    return health["replica"], health["pid"]


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def _sse_chunks(url: str, route: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response (checks it ends with [DONE])."""
    events = []
    with httpx.stream("POST", f"{url}{route}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def metric(url: str, name: str) -> float:
    """Sum of a series of the replica's /metrics (one replica here), over its label sets."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(rf"{re.escape(name)}(\{{| )", line)
    )


def wait_for(predicate, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll until ``predicate()``; returns the seconds it took (fails the test on timeout)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not true after {timeout_s}s"
        time.sleep(interval_s)
    return time.monotonic() - start


def ids_of(logprobs_tokens: list[str]) -> list[int]:
    """Token ids from logprobs' tokens named "token_id:<id>" (return_tokens_as_token_ids)."""
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def token_ids(url: str, text: str) -> list[int]:
    """How the served tokenizer encodes ``text``: echoed back with its tokens named by id."""
    r = complete(
        url, prompt=text, max_tokens=0, echo=True, logprobs=0, return_tokens_as_token_ids=True
    )
    assert r.status_code == 200, r.text
    return ids_of(r.json()["choices"][0]["logprobs"]["tokens"])


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
    for series in (
        "moeops_time_to_first_token_seconds_bucket",
        "moeops_inter_token_latency_seconds_bucket",
        "moeops_generated_tokens_total",
        "moeops_queue_depth",
        "moeops_running_sequences",
        "moeops_ready 1.0",
    ):
        assert series in metrics, series
    assert httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/completions"]["post"]


def test_single_completion(deployment):
    r = complete(
        deployment.url, model=deployment.name, prompt="def main(", max_tokens=8, temperature=0.0
    )
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
        futures = [
            pool.submit(complete, deployment.url, **b) for b in [*others[:4], body, *others[4:]]
        ]
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in results)
    assert results[4].json()["choices"][0]["text"] == alone
    different_seed = complete(deployment.url, **{**body, "seed": 99}).json()["choices"][0]["text"]
    assert different_seed != alone


def test_streaming_matches_non_streaming(deployment):
    body = dict(prompt="for i in range(", max_tokens=12, temperature=0.7, seed=7)
    expected = complete(deployment.url, **body).json()
    events = []
    with httpx.stream(
        "POST",
        f"{deployment.url}/v1/completions",
        timeout=60,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected["choices"][0]["text"]
    finals = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finals == [expected["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == expected["usage"] and chunks[-1]["choices"] == []
    # without stream_options.include_usage no chunk carries usage
    plain = _sse_chunks(deployment.url, "/v1/completions", {**body, "stream": True})
    assert plain and all(c.get("usage") is None for c in plain)
    assert "".join(c["choices"][0]["text"] for c in plain) == expected["choices"][0]["text"]


def test_max_tokens_and_stop_sequences(deployment):
    url = deployment.url
    long = complete(url, prompt="def main(", max_tokens=20, temperature=0.0).json()
    assert (
        long["choices"][0]["finish_reason"] == "length" or long["usage"]["completion_tokens"] < 20
    )
    assert long["usage"]["completion_tokens"] <= 20
    text = long["choices"][0]["text"]
    short = complete(url, prompt="def main(", max_tokens=3, temperature=0.0).json()
    assert short["usage"]["completion_tokens"] <= 3
    # a stop sequence taken from the middle of the greedy output cuts the text just before it
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"greedy text too degenerate for a stop test: {text!r}"
    for stops in ([stop, "\x00never"], stop):  # a list, or one string
        stopped = complete(
            url, prompt="def main(", max_tokens=20, temperature=0.0, stop=stops
        ).json()
        choice = stopped["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
        assert choice["text"] == text[: text.find(stop)]
        assert stop not in choice["text"]


def test_score(deployment):
    r = httpx.post(f"{deployment.url}/v1/score", json={"text": "def main():\n    return 0\n"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_logprobs"][0] is None and len(body["token_logprobs"]) == len(
        body["token_ids"]
    )
    logprobs = body["token_logprobs"][1:]
    assert all(lp <= 0 for lp in logprobs)
    assert math.isclose(body["perplexity"], math.exp(-sum(logprobs) / len(logprobs)), rel_tol=1e-6)
    assert "".join(body["tokens"]) == "def main():\n    return 0\n"
    assert r.headers[VERSION_HEADER].endswith(f"/{deployment.versions[0]}")


def test_official_openai_client(deployment):
    import openai

    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    assert deployment.name in [m.id for m in client.models.list().data]
    completion = client.completions.create(
        model=deployment.name, prompt="import ", max_tokens=6, seed=3, temperature=0.5
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=deployment.name,
            prompt="import ",
            max_tokens=6,
            seed=3,
            temperature=0.5,
            stream=True,
        )
        if chunk.choices
    )
    assert streamed == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=deployment.name, prompt="x", max_tokens=10_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


# --------------------------------------------------------------------------- every request shape,
# with its effect


def test_langchain_defaults_and_nulls_mean_default(deployment):
    url = deployment.url
    # what langchain_openai.OpenAI sends by default (prompts batched as a list)
    langchain = {
        "model": deployment.name,
        "prompt": ["def add(a, b):", "import os"],
        "temperature": 0.7,
        "top_p": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "n": 1,
        "logit_bias": {},
        "seed": None,
        "logprobs": None,
        "max_tokens": 8,
        "stream": False,
        "user": "langchain-user",
    }
    r = complete(url, **langchain)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    # every optional field as null is the same request as leaving it out
    from serving.schemas import ChatCompletionRequest, CompletionRequest

    plain = dict(prompt="def main(", max_tokens=8, seed=5)
    nulls = {field: None for field in CompletionRequest.model_fields if field not in plain}
    a, b = complete(url, **plain), complete(url, **plain, **nulls)
    assert b.status_code == 200, b.text
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    messages = [{"role": "user", "content": "hi"}]
    chat_nulls = {
        field: None
        for field in ChatCompletionRequest.model_fields
        if field not in ("messages", "seed", "max_tokens")
    }
    a = chat(url, messages=messages, seed=5, max_tokens=8)
    b = chat(url, messages=messages, seed=5, max_tokens=8, **chat_nulls)
    assert b.status_code == 200, b.text
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]


def test_n_choices_per_prompt(deployment):
    url = deployment.url
    r = complete(
        url,
        prompt=["def f(", "x = ["],
        n=2,
        max_tokens=8,
        temperature=1.0,
        seed=21,
        ignore_eos=True,
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] != choices[1]["text"], "the n choices of a seeded request must differ"
    # choice 0 of a seeded request is what n=1 with that seed gives
    single = complete(
        url, prompt="def f(", max_tokens=8, temperature=1.0, seed=21, ignore_eos=True
    ).json()
    assert single["choices"][0]["text"] == choices[0]["text"]
    assert r.json()["usage"]["completion_tokens"] == 4 * 8


def test_best_of_returns_the_most_likely_candidates(deployment):
    url = deployment.url
    body = dict(prompt="class A:", max_tokens=8, temperature=1.0, seed=33, ignore_eos=True)
    candidates = complete(url, n=3, logprobs=0, **body).json()["choices"]
    means = [
        sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])
        for c in candidates
    ]
    best = complete(url, n=1, best_of=3, **body).json()
    assert len(best["choices"]) == 1 and best["choices"][0]["logprobs"] is None
    assert best["choices"][0]["text"] == candidates[means.index(max(means))]["text"]
    assert best["usage"]["completion_tokens"] == 3 * 8  # every candidate is generated (and billed)


def test_logprobs_are_numbers_top_n(deployment):
    url = deployment.url
    r = complete(
        url, prompt="def main(", max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    for _token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert isinstance(value, float) and value <= 0
        assert 3 <= len(top) <= 4 and all(isinstance(v, float) and v <= 0 for v in top.values())
        # greedy: the chosen token is the most likely one
        assert math.isclose(value, max(top.values()), abs_tol=1e-5)
    streamed = _sse_chunks(
        url,
        "/v1/completions",
        dict(
            prompt="def main(",
            max_tokens=6,
            temperature=0.0,
            logprobs=3,
            ignore_eos=True,
            stream=True,
        ),
    )
    tokens = [t for c in streamed for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == lp["tokens"]


def test_echo(deployment):
    url = deployment.url
    greedy = complete(url, prompt="def main(", max_tokens=4, temperature=0.0).json()["choices"][0][
        "text"
    ]
    echoed = complete(url, prompt="def main(", max_tokens=4, temperature=0.0, echo=True).json()
    assert echoed["choices"][0]["text"] == "def main(" + greedy
    only = complete(url, prompt="def main(", max_tokens=0, echo=True).json()
    assert only["choices"][0]["text"] == "def main(" and only["usage"]["completion_tokens"] == 0
    scored = complete(
        url,
        prompt="def main(",
        max_tokens=2,
        temperature=0.0,
        echo=True,
        logprobs=1,
        ignore_eos=True,
    ).json()
    lp, prompt_tokens = scored["choices"][0]["logprobs"], scored["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == prompt_tokens + 2
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == scored["choices"][0]["text"]
    # the prompt part equals what /v1/score reports
    score = httpx.post(f"{url}/v1/score", json={"text": "def main("}).json()
    assert all(
        math.isclose(a, b, abs_tol=1e-4)
        for a, b in zip(lp["token_logprobs"][1:prompt_tokens], score["token_logprobs"][1:])
    )


def test_token_id_prompts(deployment):
    url = deployment.url
    texts = ["def main(", "import os"]
    ids = [token_ids(url, t) for t in texts]
    by_text = complete(url, prompt=texts, max_tokens=6, temperature=0.0).json()["choices"]
    one = complete(url, prompt=ids[0], max_tokens=6, temperature=0.0).json()
    assert one["choices"][0]["text"] == by_text[0]["text"]
    assert one["usage"]["prompt_tokens"] == len(ids[0])
    many = complete(url, prompt=ids, max_tokens=6, temperature=0.0, echo=True).json()["choices"]
    assert [c["text"] for c in many] == [t + c["text"] for t, c in zip(texts, by_text)]


def _chosen_and_tops(choice: dict) -> tuple[list[int], list[dict[int, float]]]:
    lp = choice["logprobs"]
    tops = [
        {int(k.removeprefix("token_id:")): v for k, v in top.items()} for top in lp["top_logprobs"]
    ]
    return ids_of(lp["tokens"]), tops


def test_penalties_change_output_as_specified(deployment):
    """Greedy with penalties picks, at every step, the token of highest raw logit minus
    frequency_penalty * count - presence_penalty * (count > 0) over the tokens generated so far
    (OpenAI's definition); checked against the raw top-20 logprobs the response reports."""
    url = deployment.url
    body = dict(
        prompt="def main(",
        max_tokens=24,
        temperature=0.0,
        ignore_eos=True,
        logprobs=20,
        return_tokens_as_token_ids=True,
    )
    plain_ids, _ = _chosen_and_tops(complete(url, **body).json()["choices"][0])
    assert len(set(plain_ids)) < len(plain_ids), (
        "greedy text of the random model should repeat tokens"
    )
    for freq, presence in ((1.5, 0.0), (0.0, 2.0), (0.7, 0.7)):
        r = complete(url, frequency_penalty=freq, presence_penalty=presence, **body)
        assert r.status_code == 200, r.text
        chosen, tops = _chosen_and_tops(r.json()["choices"][0])
        assert chosen != plain_ids, (freq, presence)
        counts: dict[int, int] = {}
        for token, top in zip(chosen, tops):

            def adjusted(t: int, top=top, freq=freq, counts=counts, presence=presence) -> float:
                return top[t] - freq * counts.get(t, 0) - presence * (counts.get(t, 0) > 0)

            assert all(adjusted(token) >= adjusted(t) - 1e-4 for t in top), (
                freq,
                presence,
                token,
                top,
            )
            counts[token] = counts.get(token, 0) + 1
    # negative penalties (allowed down to -2) encourage repetition
    r = complete(url, frequency_penalty=-2.0, **body)
    chosen, _ = _chosen_and_tops(r.json()["choices"][0])
    assert len(set(chosen)) <= len(set(plain_ids))


def test_logit_bias(deployment):
    url = deployment.url
    body = dict(
        prompt="def main(",
        max_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        logprobs=1,
        return_tokens_as_token_ids=True,
    )
    plain = ids_of(complete(url, **body).json()["choices"][0]["logprobs"]["tokens"])
    banned = complete(url, logit_bias={str(plain[0]): -100}, **body).json()
    assert plain[0] not in ids_of(banned["choices"][0]["logprobs"]["tokens"])
    forced_id = token_ids(url, "x")[0]
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        forced = complete(url, **{**body, **sampling}, logit_bias={str(forced_id): 100}).json()
        assert ids_of(forced["choices"][0]["logprobs"]["tokens"]) == [forced_id] * 6
    # chat takes it too
    forced = chat(
        url,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0.0,
        ignore_eos=True,
        logit_bias={str(forced_id): 100},
    ).json()
    assert forced["choices"][0]["message"]["content"] == "x" * 4


def test_unsupported_features_say_so(deployment):
    url = deployment.url
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        (
            "/v1/chat/completions",
            {"messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"messages": messages, "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ]
    for route, body, param in cases:
        r = httpx.post(f"{url}{route}", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and "not supported" in error["message"], error


BAD_CHAT = [
    (
        "unknown field",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokns": 3},
        "max_tokns",
    ),
    (
        "unknown message field",
        {"messages": [{"role": "user", "content": "hi", "mood": "ok"}]},
        "messages[0].mood",
    ),
    ("missing messages", {"max_tokens": 3}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    # rendered with the chat template, over serve.max_prompt_tokens
    ("messages too long", {"messages": [{"role": "user", "content": "a b c d " * 40}]}, "messages"),
    (
        "max_tokens over limit",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS + 1},
        "max_tokens",
    ),
    (
        "top_logprobs without logprobs",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        "top_logprobs",
    ),
]


@pytest.mark.parametrize("case,body,param", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_requests(deployment, case, body, param):
    r = chat(deployment.url, **body)
    assert r.status_code == 400, f"{case}: {r.status_code} {r.text}"
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], f"{case}: {error}"


# --------------------------------------------------------------------------- chat completions

CHAT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "def add(a, b):"},
]
# docs/serving.md's chat template, written out: what the model is asked to continue
CHAT_PROMPT = "### System:\nYou are terse.\n\n### User:\ndef add(a, b):\n\n### Assistant:\n"


def test_chat_with_the_official_client(deployment):
    import openai

    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    args = dict(
        model=deployment.name, messages=CHAT_MESSAGES, max_tokens=12, temperature=0.8, seed=4
    )
    single = client.chat.completions.create(**args)
    [choice] = single.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert single.usage.prompt_tokens == len(token_ids(deployment.url, CHAT_PROMPT))
    assert single.usage.total_tokens == single.usage.prompt_tokens + single.usage.completion_tokens
    assert single.system_fingerprint == f"{deployment.name}/{deployment.versions[0]}"
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [choice.finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == single.usage.completion_tokens
    )
    two = client.chat.completions.create(**{**args, "n": 2})
    assert [c.index for c in two.choices] == [0, 1] and two.choices[
        0
    ].message.content == choice.message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=deployment.name, messages=[], max_tokens=2)


def test_chat_renders_the_documented_template(deployment):
    """A greedy chat answer is the greedy completion of the rendered prompt, cut where a new turn
    starts."""
    url = deployment.url
    answer = chat(url, messages=CHAT_MESSAGES, max_tokens=24, temperature=0.0).json()
    completion = complete(
        url, prompt=CHAT_PROMPT, max_tokens=24, temperature=0.0, stop=["\n### "]
    ).json()
    assert answer["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert answer["usage"] == completion["usage"]
    # an assistant message last is continued, not closed
    cont = chat(
        url,
        messages=[*CHAT_MESSAGES, {"role": "assistant", "content": "return"}],
        max_tokens=6,
        temperature=0.0,
    ).json()
    prefix = complete(
        url, prompt=CHAT_PROMPT + "return", max_tokens=6, temperature=0.0, stop=["\n### "]
    ).json()
    assert cont["choices"][0]["message"]["content"] == prefix["choices"][0]["text"]


def test_chat_logprobs(deployment):
    r = chat(
        deployment.url,
        messages=CHAT_MESSAGES,
        max_tokens=5,
        temperature=0.0,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
        max_completion_tokens=5,
    )
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 2
        assert math.isclose(
            item["logprob"], item["top_logprobs"][0]["logprob"], abs_tol=1e-5
        )  # greedy


# --------------------------------------------------------------------------- the engine seen over
# HTTP


# --------------------------------------------------------------------------- the newer routes:
# responses, tokenize (issue 17), and every response against its declared model (issue 19)


def test_responses_with_the_official_client(deployment):
    import openai

    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    response = client.responses.create(
        model=deployment.name,
        input="def add(a, b):",
        instructions="You write Python.",
        max_output_tokens=8,
        temperature=0.0,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.usage.output_tokens >= 1
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":  # cut by max_output_tokens, as OpenAI reports it
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == 8
    # the instructions are a system turn of the chat template: the same prompt as chat's
    chat_usage = chat(
        deployment.url,
        messages=[
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "def add(a, b):"},
        ],
        max_tokens=8,
        temperature=0.0,
    ).json()
    assert response.usage.input_tokens == chat_usage["usage"]["prompt_tokens"]
    assert response.output_text == chat_usage["choices"][0]["message"]["content"]

    events = list(
        client.responses.create(
            model=deployment.name,
            input=[
                {"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "input_text", "text": "def add(a, b):"}]},
            ],
            max_output_tokens=8,
            temperature=0.0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{response.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text == events[-1].response.output_text
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=deployment.name, input="x", previous_response_id="resp_1")
    assert err.value.body["param"] == "previous_response_id"
    assert "stores no responses" in err.value.body["message"]


def test_tokenize_round_trip(deployment):
    url = deployment.url
    text = "def main():\n    return 42\n"
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) >= 2
    assert tokens["max_model_len"] == deployment.config.model.max_seq_len
    assert "".join(tokens["token_strs"]) == text
    # the ids are the ones generation uses: echo with logprobs names the same tokens
    echoed = complete(url, prompt=tokens["tokens"], max_tokens=0, echo=True, logprobs=0).json()
    assert echoed["choices"][0]["text"] == text
    back = httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": "hi"}]
    chat_tokens = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    usage = chat(url, messages=messages, max_tokens=1).json()["usage"]
    assert chat_tokens["count"] == usage["prompt_tokens"]
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize(
    "route,body",
    [
        ("/v1/responses", {"input": "x", "max_output_tokens": 2, "reasoning": {}, "foo": 1}),
        ("/tokenize", {"prompt": "x", "add_special_tokens": True, "bogus": 1}),
        ("/detokenize", {"tokens": [1], "bogus": 1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "bogus": 1, "other": 2}),
    ],
)
def test_unknown_fields_are_named(deployment, route, body):
    response = httpx.post(f"{deployment.url}{route}", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_field"
    known = set(body) - {"reasoning", "foo", "bogus", "other"}
    unknown = sorted(set(body) - known)
    assert error["param"] in unknown
    for name in unknown:
        assert repr(name) in error["message"]


def test_every_route_answers_its_declared_model(deployment):
    """Each route's response (and each streamed chunk) parses as the pydantic model its route
    declares in the OpenAPI schema: the handlers return those models, never loose dicts."""
    from serving import schemas

    url = deployment.url
    openapi = httpx.get(f"{url}/openapi.json").json()

    def declared(path: str, method: str) -> type:
        ref = openapi["paths"][path][method]["responses"]["200"]["content"]["application/json"]
        return getattr(schemas, ref["schema"]["$ref"].rsplit("/", 1)[1])

    messages = [{"role": "user", "content": "def f("}]
    calls = [
        ("get", "/healthz", None),
        ("get", "/readyz", None),
        ("get", "/v1/models", None),
        ("post", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2}),
        (
            "post",
            "/v1/completions",
            {"prompt": "a b", "max_tokens": 0, "echo": True, "logprobs": 1},
        ),
        ("post", "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "logprobs": True}),
        ("post", "/v1/responses", {"input": "def f(", "max_output_tokens": 3}),
        ("post", "/v1/score", {"text": "def f(x): return x"}),
        ("post", "/tokenize", {"prompt": "def f("}),
        ("post", "/detokenize", {"tokens": [5, 6]}),
    ]
    for method, path, body in calls:
        response = httpx.request(method, f"{url}{path}", json=body, timeout=60)
        assert response.status_code == 200, (path, response.text)
        declared(path, method).model_validate_json(response.content)  # raises on any mismatch
    checked = {path for _, path, _ in calls}
    served = {p for p in openapi["paths"] if p != "/metrics"}
    assert served == checked, f"routes without a response check: {served - checked}"
    chunk_models = {
        "/v1/completions": schemas.CompletionStreamResponse,
        "/v1/chat/completions": schemas.ChatCompletionStreamResponse,
        "/v1/responses": schemas.ResponseEvent,
    }
    for path, body in [
        ("/v1/completions", {"prompt": "a", "max_tokens": 3, "logprobs": 1}),
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 3}),
        ("/v1/responses", {"input": "a", "max_output_tokens": 3}),
    ]:
        body = {**body, "stream": True}
        if path != "/v1/responses":
            body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as stream:
            data = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert data, path
        for payload in data:
            if payload != "[DONE]":
                chunk_models[path].model_validate_json(payload)


def _running(url: str) -> float:
    return metric(url, "moeops_running_sequences")


def _long_request(url: str, http: httpx.Client, **extra) -> httpx.Response:
    return http.post(
        f"{url}/v1/completions",
        json={
            "prompt": "def long(",
            "max_tokens": LONG,
            "ignore_eos": True,
            "temperature": 0.0,
            **extra,
        },
    )


def test_short_request_is_not_held_behind_long_ones(deployment):
    """Continuous batching: a short request that arrives while 8 long ones decode joins the running
    batch
    and finishes first (a static batch would hold it until the long ones end)."""
    url = deployment.url
    finished: dict[str, float] = {}

    def long_one(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            r = _long_request(url, http)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == LONG, r.text
            finished[f"long{i}"] = time.monotonic()

    threads = [threading.Thread(target=long_one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: _running(url) >= 8, timeout_s=60)
        r = complete(url, prompt="x", max_tokens=4, ignore_eos=True)
        finished["short"] = time.monotonic()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert len([k for k in finished if k.startswith("long")]) == 0, (
            "a long request ended before the short one"
        )
    finally:
        for t in threads:
            t.join()
    assert len(finished) == 9 and finished["short"] < min(
        v for k, v in finished.items() if k != "short"
    )


def test_disconnected_stream_stops_its_sequence(deployment):
    """A client that goes away mid-stream: its sequence is aborted (running count back to 0 within a
    second) long before max_tokens, and the replica keeps serving."""
    url = deployment.url
    wait_for(lambda: _running(url) == 0, timeout_s=30)
    tokens_before = metric(url, "moeops_generated_tokens_total")
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST",
            f"{url}/v1/completions",
            json={"prompt": "def long(", "max_tokens": LONG, "ignore_eos": True, "stream": True},
        ) as r:
            received = 0
            for line in r.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    assert _running(url) == 1
                    break  # leaving httpx's line iterator closes the connection: the client is gone
    took = wait_for(lambda: _running(url) == 0, timeout_s=5)
    print(f"[abort] stream dropped: sequence gone after {took:.3f}s")
    assert took < 1.0, f"the sequence ran on for {took:.2f}s after its client left"
    time.sleep(0.3)
    generated = metric(url, "moeops_generated_tokens_total") - tokens_before
    assert generated < LONG, f"{generated} tokens generated for a stream dropped after 3 chunks"
    assert complete(url, prompt="x", max_tokens=2).status_code == 200


def test_disconnected_non_streamed_request_stops_its_sequences(deployment):
    url = deployment.url
    wait_for(lambda: _running(url) == 0, timeout_s=30)
    tokens_before = metric(url, "moeops_generated_tokens_total")
    with httpx.Client(timeout=httpx.Timeout(60, read=0.3)) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes the connection)
            _long_request(url, http, prompt=["def a(", "def b("], n=2)
    took = wait_for(lambda: _running(url) == 0, timeout_s=5)
    print(f"[abort] request dropped: sequences gone after {took:.3f}s")
    assert took < 1.0, f"the sequences ran on for {took:.2f}s after their client left"
    time.sleep(0.3)
    generated = metric(url, "moeops_generated_tokens_total") - tokens_before
    assert generated < 4 * LONG, f"{generated} tokens generated for 4 sequences dropped after 0.3 s"


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
    ("max_tokens zero without echo", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (
        "max_tokens over limit",
        json.dumps({"prompt": "x", "max_tokens": MAX_TOKENS + 1}).encode(),
        400,
        "max_tokens",
    ),
    ("temperature out of range", b'{"prompt": "x", "temperature": 2.5}', 400, "temperature"),
    ("top_p zero", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("seed over int64", b'{"prompt": "x", "seed": 9223372036854775808}', 400, "seed"),
    ("too many stops", b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ("n zero", b'{"prompt": "x", "n": 0}', 400, "n"),
    ("n over serve.max_n", b'{"prompt": "x", "n": 5}', 400, "n"),
    ("best_of below n", b'{"prompt": "x", "n": 3, "best_of": 2}', 400, "best_of"),
    (
        "best_of with stream",
        b'{"prompt": "x", "n": 1, "best_of": 2, "stream": true}',
        400,
        "best_of",
    ),
    ("logprobs over serve.max_logprobs", b'{"prompt": "x", "logprobs": 21}', 400, "logprobs"),
    ("token id outside vocabulary", b'{"prompt": [1, 999999]}', 400, "prompt"),
    ("negative token id", b'{"prompt": [[1, 2], [-3]]}', 400, "prompt"),
    (
        "logit_bias key not a token id",
        b'{"prompt": "x", "logit_bias": {"abc": 1}}',
        400,
        "logit_bias",
    ),
    ("logit_bias out of range", b'{"prompt": "x", "logit_bias": {"5": 101}}', 400, "logit_bias"),
    (
        "stream_options without stream",
        b'{"prompt": "x", "stream_options": {"include_usage": true}}',
        400,
        "stream_options",
    ),
    (
        "unknown stream_options field",
        b'{"prompt": "x", "stream": true, "stream_options": {"usage": true}}',
        400,
        "stream_options.usage",
    ),
    ("unknown model", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
]


@pytest.mark.parametrize("case,raw,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_completion_requests(deployment, case, raw, status, param):
    r = httpx.post(
        f"{deployment.url}/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param, f"{case}: {error}"
    if param:
        assert param in error["message"]


def test_edge_values_are_served_not_crashed(deployment):
    url = deployment.url
    for body in [
        dict(prompt="x", temperature=1e-40, max_tokens=3),
        dict(prompt="x", top_p=1e-30, max_tokens=3),
        dict(prompt="x", seed=2**63 - 1, max_tokens=3),
        dict(prompt="héllo ✓ 日本 \U0001f600", max_tokens=3),
        dict(prompt=["a", "b c", "d"], stop=["\n", "zz"], max_tokens=32),
    ]:
        r = complete(url, **body)
        assert r.status_code == 200, (body, r.text)
        assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
    assert (
        complete(url, prompt="x").json()["usage"]["completion_tokens"] <= 16
    )  # OpenAI's default max_tokens


def test_bad_score_requests_and_replica_stays_ready(deployment):
    url = deployment.url
    for raw, param in [
        (b'{"text": ""}', "text"),
        (b'{"text": 3}', "text"),
        (b'{"txt": "a"}', "txt"),
        (json.dumps({"text": "word " * 300}).encode(), None),
    ]:
        r = httpx.post(f"{url}/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413), r.text
        if param:
            assert r.json()["error"]["param"] == param
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert complete(url, prompt="ok", max_tokens=2).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("moeops_requests_total")]
    assert any(
        all(
            label in line for label in ('route="/v1/score"', 'status="400"', 'model_version="none"')
        )
        for line in counted
    ), counted


# --------------------------------------------------------------------------- readiness and auth


def test_unready_until_model_exists_then_auth_protects_all_but_probes(deployment, monkeypatch):
    """A second app whose alias does not exist yet: alive but unready; auth on via the token env
    var."""
    import openai
    from mlflow import MlflowClient
    from ray import serve

    from components.config import with_overrides
    from serving.deploy.launch import deploy, wait_ready

    token = "s3cret-token"
    monkeypatch.setenv("MOEOPS_TEST_TOKEN", token)
    config = with_overrides(
        deployment.config,
        {
            "serve.app_name": "moeops-gated",
            "serve.route_prefix": "/gated",
            "serve.auth_token_env": "MOEOPS_TEST_TOKEN",
            "serve.model_uri": f"models:/{deployment.name}@staging",
        },
    )
    url = deploy(config)
    try:
        auth = {"authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/healthz").status_code == 200
        unready = httpx.get(f"{url}/readyz")
        assert unready.status_code == 503 and unready.json()["ready"] is False
        assert "staging" in unready.json()["reason"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"

        MlflowClient(config.tracking.uri).set_registered_model_alias(
            deployment.name, "staging", deployment.versions[1]
        )
        assert wait_ready(url, timeout_s=60)["versions"][deployment.name] == deployment.versions[1]

        for path, method in [
            ("/v1/models", "GET"),
            ("/metrics", "GET"),
            ("/v1/completions", "POST"),
            ("/v1/score", "POST"),
            ("/docs", "GET"),
        ]:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
                r = httpx.request(method, f"{url}{path}", headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200
        ok = httpx.post(
            f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth
        )
        assert ok.status_code == 200 and ok.headers[VERSION_HEADER].endswith(
            f"/{deployment.versions[1]}"
        )

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        assert client.completions.create(model=deployment.name, prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        # the main app (no token configured) stays open
        assert httpx.get(f"{deployment.url}/v1/models").status_code == 200
    finally:
        serve.delete("moeops-gated")


# --------------------------------------------------------------------------- canary and switch


def test_canary_split(deployment):
    from components.config import with_overrides

    fraction, n = 0.3, 240
    before = replica_identity(deployment.url)
    apply(
        with_overrides(deployment.config, {"serve.canary_fraction": fraction}),
        base=deployment.config,
    )
    # in place: the same replica loaded the challenger beside the champion
    assert replica_identity(deployment.url) == before
    models = {m["id"]: m for m in httpx.get(f"{deployment.url}/v1/models").json()["data"]}
    challenger = models[f"{deployment.name}@challenger"]
    assert (
        challenger["version"] == deployment.versions[1] and challenger["traffic_share"] == fraction
    )

    def one(i: int) -> str:
        r = complete(deployment.url, prompt=f"v{i}", max_tokens=1)
        assert r.status_code == 200, r.text
        return r.json()["model_version"]

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(one, range(n)))
    share = versions.count(deployment.versions[1]) / n
    tolerance = 4 * math.sqrt(fraction * (1 - fraction) / n)  # 4 sigma of a binomial share
    assert abs(share - fraction) < tolerance, (
        f"challenger share {share:.3f} vs {fraction} ± {tolerance:.3f}"
    )
    assert set(versions) == set(deployment.versions)
    # pinning a version by alias bypasses the split
    pinned = complete(
        deployment.url, model=f"{deployment.name}@challenger", prompt="x", max_tokens=1
    )
    assert pinned.json()["model_version"] == deployment.versions[1]
    metrics = httpx.get(f"{deployment.url}/metrics").text
    for version in deployment.versions:
        assert (
            f'moeops_generated_tokens_total{{model_version="{deployment.name}/{version}"' in metrics
        )
    apply(deployment.config, base=deployment.config)  # canary off again
    assert replica_identity(deployment.url) == before


def _stream_until(url: str, stop: threading.Event, body: dict) -> int:
    """Stream a completion until ``stop`` is set, then go away (closing the connection); returns
    chunks read."""
    chunks = 0
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if stop.is_set() or line == "data: [DONE]":
                break
    return chunks


def test_queue_limit_answers_429_and_replica_stays_ready(deployment):
    """serve.max_queued_sequences: a request beyond it gets 429 with Retry-After, /readyz stays 200,
    and the replica serves again once the queue drains."""
    from components.config import with_overrides

    url = deployment.url
    apply(
        with_overrides(deployment.config, {"serve.max_queued_sequences": 4}), base=deployment.config
    )
    stop = threading.Event()
    long = {"max_tokens": LONG, "ignore_eos": True, "n": 4}
    pool = ThreadPoolExecutor(2)
    try:
        # 4 prompts x n=4 fill the 16 slots; 8 more sequences wait (a request into an empty queue is
        # taken)
        filling = pool.submit(_stream_until, url, stop, {**long, "prompt": ["a", "b", "c", "d"]})
        wait_for(lambda: _running(url) == 16, timeout_s=60)
        waiting = pool.submit(_stream_until, url, stop, {**long, "prompt": ["e", "f"]})
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["queued_sequences"] == 8, timeout_s=30)
        rejected = complete(url, prompt="x", max_tokens=2)
        assert rejected.status_code == 429, rejected.text
        assert rejected.headers["retry-after"] == str(deployment.config.serve.retry_after_s)
        assert rejected.json()["error"]["code"] == "queue_full"
        streamed = httpx.post(
            f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}
        )
        assert streamed.status_code == 429 and "retry-after" in streamed.headers
        assert (
            chat(url, messages=[{"role": "user", "content": "x"}], max_tokens=2).status_code == 429
        )
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert not filling.done() and not waiting.done(), (
            "the long requests ended before the checks"
        )
        stop.set()  # both clients go away: their 24 sequences are aborted
        assert filling.result() < LONG * 16 and waiting.result() < LONG * 8
        wait_for(lambda: _running(url) == 0, timeout_s=5)
        assert complete(url, prompt="x", max_tokens=2).status_code == 200
        rejections = [
            line
            for line in httpx.get(f"{url}/metrics").text.splitlines()
            if line.startswith("moeops_errors_total")
            and 'code="queue_full"' in line
            and 'status="429"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in rejections) >= 3, rejections
    finally:
        stop.set()
        pool.shutdown(wait=True)
        apply(deployment.config, base=deployment.config)


def test_int8_quantized_replica(deployment):
    from components.config import with_overrides

    url = deployment.url
    fp32 = httpx.post(f"{url}/v1/score", json={"text": "def main():\n    return 0\n"}).json()[
        "perplexity"
    ]
    apply(with_overrides(deployment.config, {"serve.quantize": "int8"}), base=deployment.config)
    try:
        r = complete(url, prompt="def main(", max_tokens=6, seed=1)
        assert r.status_code == 200 and r.headers[VERSION_HEADER].endswith("-int8"), r.headers
        int8 = httpx.post(f"{url}/v1/score", json={"text": "def main():\n    return 0\n"}).json()[
            "perplexity"
        ]
        assert abs(int8 - fp32) / fp32 < 0.2  # dynamic int8 barely moves perplexity
    finally:
        apply(deployment.config, base=deployment.config)
    assert not complete(url, prompt="x", max_tokens=1).headers[VERSION_HEADER].endswith("-int8")


def test_version_switch_under_continuous_requests(deployment):
    from mlflow import MlflowClient

    url, (v1, v2) = deployment.url, deployment.versions
    stop = threading.Event()
    results: list[tuple[float, int, str]] = []

    def client_loop(worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = 0
            while not stop.is_set():
                r = http.post(
                    f"{url}/v1/completions", json={"prompt": f"w{worker} {i}", "max_tokens": 4}
                )
                results.append(
                    (time.monotonic(), r.status_code, r.headers.get(VERSION_HEADER, r.text))
                )
                i += 1

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        MlflowClient(deployment.config.tracking.uri).set_registered_model_alias(
            deployment.name, "champion", v2
        )
        # in place: the replica loads v2 beside v1 and switches once it is warm; requests that
        # started on v1 finish on it
        apply(deployment.config, revision=v2, base=deployment.config)
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


# --------------------------------------------------------------------------- bounded load


def test_bounded_load_32_clients_mixed(deployment):
    """32 clients for 10 s of mixed requests (completions, chat, responses, streamed, n=2,
    logprobs) on loopback: zero errors, every response complete, and the same replica process
    throughout. (10 s: each client sends several requests of every shape; longer adds time, not
    checks.)"""
    from ray import serve

    url, before = deployment.url, replica_identity(deployment.url)
    duration_s, clients = 10.0, 32
    statuses: list[tuple[str, int]] = []
    incomplete: list[str] = []

    def shape(i: int, n: int) -> tuple[str, dict]:
        kind = (i + n) % 5
        if kind == 4:
            return "/v1/responses", {"input": f"r{i}", "max_output_tokens": 8, "stream": True}
        if kind == 0:
            return "/v1/completions", {"prompt": f"load {i} {n}", "max_tokens": 8, "seed": n}
        if kind == 1:
            return "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"load {i} {n}"}],
                "max_tokens": 8,
                "seed": n,
            }
        if kind == 2:
            return "/v1/completions", {
                "prompt": [f"a{i}", f"b{n}"],
                "n": 2,
                "max_tokens": 6,
                "logprobs": 2,
                "frequency_penalty": 0.5,
            }
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"s{i}"}],
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def client(i: int, http: httpx.AsyncClient, deadline: float) -> None:
        n = 0
        while time.monotonic() < deadline:
            route, body = shape(i, n)
            r = await http.post(f"{url}{route}", json=body)
            statuses.append((route, r.status_code))
            ends = (
                ("event: response.completed", "event: response.incomplete")
                if route == "/v1/responses"
                else ("data: [DONE]",)
            )
            tail = r.text[-4000:]
            if r.status_code == 200 and body.get("stream") and not any(e in tail for e in ends):
                incomplete.append(r.text[-200:])
            elif r.status_code == 200 and not body.get("stream") and not r.json()["choices"]:
                incomplete.append(r.text[:200])
            n += 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            deadline = time.monotonic() + duration_s
            await asyncio.gather(*(client(i, http, deadline) for i in range(clients)))

    asyncio.run(main())
    errors = [s for s in statuses if s[1] != 200]
    assert len(statuses) >= 4 * clients and not errors, (
        f"{len(errors)} errors of {len(statuses)}: {set(errors)}"
    )
    assert not incomplete, incomplete[:3]
    assert {route for route, _ in statuses} == {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
    }
    assert replica_identity(url) == before, "the replica restarted under load"
    status = serve.status().applications[deployment.config.serve.app_name]
    assert status.status == "RUNNING"
    assert httpx.get(f"{url}/readyz").status_code == 200
    print(
        f"bounded load: {len(statuses)} requests in {duration_s:.0f}s from {clients} clients "
        f"({len(statuses) / duration_s:.1f} req/s)"
    )


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

    registered = RegisterOutputs(
        model_name=deployment.name,
        model_version=deployment.versions[0],
        model_id="",
        aliases=["champion"],
        promoted=True,
        reason="",
        previous_champion="",
    )
    config = with_overrides(
        deployment.config, {"serve.app_name": "moeops-stage", "serve.route_prefix": "/stage"}
    )
    client = MlflowClient(config.tracking.uri)
    experiment_id = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    run_id = client.create_run(experiment_id, run_name="deploy").info.run_id
    ctx = StageContext(
        name="deploy",
        config=config,
        config_dict=to_container(config),
        run_id=run_id,
        parent_run_id="",
        experiment_id=experiment_id,
        tracking_uri=config.tracking.uri,
        client=client,
        inputs={"register": registered},
        work_dir=tmp_path,
    )
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
        smoke = json.loads(
            open(client.download_artifacts(run_id, "smoke_response.json", str(tmp_path))).read()
        )
        assert smoke["response"]["choices"] and smoke["readyz"]["ready"] is True
        assert deploy_stage.still_serving(config, outputs)
        assert not deploy_stage.still_serving(
            config, dataclasses.replace(outputs, model_version="999")
        )
    finally:
        serve.delete("moeops-stage")
    assert not deploy_stage.still_serving(config, outputs)


# --------------------------------------------------------------------------- the replica's log


def test_replica_log_has_no_per_request_errors(deployment):
    """After every request of this module (streamed, cancelled, rejected, reconfigured) the logs
    of every replica the module started, live or stopped, hold no "Future exception was never
    retrieved" (asyncio's note of a dropped error). Ray's state API lists the replica actors of
    every state and serves a stopped actor's log files as well as a live one's."""
    import ray
    from ray.util.state import get_log, list_actors

    address = ray.get_runtime_context().gcs_address  # this cluster: other Rays may run here
    apps = (deployment.config.serve.app_name, "moeops-gated", "moeops-stage")
    replicas = [
        a
        for a in list_actors(address=address, limit=10_000, detail=True)
        if any(a.class_name.startswith(f"ServeReplica:{app}:") for app in apps)
    ]
    started = {a.class_name.split(":")[1] for a in replicas}
    assert started == set(apps), f"replicas found only for {started}"
    for actor in replicas:
        for suffix in ("err", "out"):
            text = "".join(
                get_log(address=address, actor_id=actor.actor_id, suffix=suffix, tail=-1)
            )
            assert "never retrieved" not in text, (
                actor.state,
                text[text.find("never retrieved") - 2000 :][:4000],
            )
    print(f"replica logs read: {sorted((a.class_name, a.state) for a in replicas)}")
    assert httpx.get(f"{deployment.url}/readyz").status_code == 200
