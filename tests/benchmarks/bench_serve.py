"""Serving benchmark: the Serve path against the engine in process, continuous batching, int8.

    python tests/benchmarks/bench_serve.py --json serve.json          # full run (~8 min idle, int8
    included)
    python tests/benchmarks/bench_serve.py --quick --json serve.json  # smoke run for the test suite

Starts its own local Ray + Serve on a free loopback port, registers a seeded random model
(``experiment=tiny``) in a fresh sqlite MLflow registry, deploys moeops' app (one replica,
``serve.num_cpus=1``: one torch thread) and, beside it, the same model's
:class:`serving.engine.Engine`
in this process (also one torch thread). Every request decodes a fixed number of tokens
(``ignore_eos``, greedy), so HTTP and in-process runs do the same work.

Figures (all in the JSON, with the raw numbers behind every ratio):

- ``serve_overhead_ms_p50``: one request through HTTP + Serve minus the same request decoded by
  the engine in process, alternated request by request (other processes' load hits both alike),
  concurrency 1; the median of the paired differences. Shown against
  ``serve_floor_ms_p50``: a trivial Serve deployment's p50 over HTTP with the same client (what
  Ray Serve itself costs on this machine), ``serve_floor_fastapi_ms_p50`` (the same with a FastAPI
  ingress parsing a JSON body), ``app_healthz_ms_p50`` (our app's middleware, no engine) and
  ``app_overhead_ms_p50`` (our app's ASGI path in process, without Serve or sockets, over the engine
  alone: the part of the overhead that is ours). CPU milliseconds per request of the engine, the
  replica and Serve's proxy (``*_cpu_ms_per_request_c1``) split it independently of the machine's
  load. ``serve_overhead_vs_bare_serve_ratio``: ``serve_overhead_ms_p50`` over
  ``serve_floor_fastapi_ms_p50`` (goal <= 1.5: our request path costs at most half again what a
  bare FastAPI deployment returning a constant costs).
- ``short_behind_long_latency_ratio``: a 4-token request's latency while 8 x 64-token requests
  decode (the replica's running-sequences gauge shows all 8) over its latency alone, measured in
  alternated pairs (alone, then behind), the median of the pairs' ratios (goal <= 1.5);
  ``short_behind_long_streamed_latency_ratio``: the same with the long requests streamed (each has
  sent its first token).
- ``continuous_vs_static_batching_rps_ratio_c32``: requests/s of 32 closed-loop clients whose
  requests decode 8, 16, 32 or 64 tokens, our deployment (continuous batching) over a static
  batching deployment of the same engine (Serve's ``@serve.batch`` forms a batch of up to 32, the
  engine decodes it to its end, then the next is formed), alternated slices (goal >= 1.5).
- ``decode_tokens_per_s_c32``: generated tokens/s over HTTP at concurrency 32;
  ``decode_vs_inprocess_ratio_c32``: that over the engine's own batched throughput in process
  (the same 32-request batches decoded to the end, back to back; goal >= 0.8).
- ``int8_vs_fp32_speed_ratio``, ``int8_vs_fp32_speed_ratio_compute_bound``,
  ``int8_perplexity_change_pct``: from ``tests/benchmarks/bench_int8.py``'s ``run`` (its full
  figures under ``int8.*``), run after Serve is shut down.
- ``load_1m_start`` / ``load_1m_end`` / ``uptime``: the machine's load (a shared 2-core box).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_int8, beside this file
sys.path.insert(0, str(REPO / "tests"))  # fixtures.tiny_model
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from pipelines.runtime import free_port  # noqa: E402

GOALS = {
    "serve_overhead_ms_p50": "<= 5",
    "short_behind_long_latency_ratio": "<= 1.5",
    "serve_overhead_vs_bare_serve_ratio": "<= 1.5",
    "continuous_vs_static_batching_rps_ratio_c32": ">= 1.5",
    "decode_vs_inprocess_ratio_c32": ">= 0.8",
    "int8_vs_fp32_speed_ratio_compute_bound": ">= 1.5",
    "int8_perplexity_change_pct": "<= 2",
}
OVERHEAD_TOKENS = 16  # one request of the overhead figure
LOAD_TOKENS = 32  # each request of the concurrency-32 load
SHORT_TOKENS, LONG_TOKENS, LONG_REQUESTS = 4, 64, 8
CONCURRENCY = 32
FLOOR_PREFIX, FLOOR_FASTAPI_PREFIX = "/floor", "/floor-fastapi"
FLOOR_ANSWER = {"ok": True}  # what the bare FastAPI deployment returns for any JSON body
STATIC_PREFIX = "/static"
# the mixed load of the batching comparison: request n of a client decodes MIXED_TOKENS[n % 4]
# tokens, so a static batch runs as long as its longest request while continuous batching refills
# the slots of the short ones
MIXED_TOKENS = (8, 16, 32, 64)
# how long Serve's @serve.batch waits to fill a static batch (a closed loop of 32 clients refills
# it within milliseconds)
STATIC_BATCH_WAIT_S = 0.02


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", flush=True)


def log_figures(figures: dict, *keys: str) -> None:
    log(", ".join(f"{key}={figures.get(key, float('nan')):.2f}" for key in keys))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def completion_body(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    """Greedy, exactly ``max_tokens`` tokens: HTTP and in-process runs decode the same."""
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


# ------------------------------------------------------------------------------ in process
def inprocess_request(engine, prompt: str, max_tokens: int) -> int:
    from serving.engine import GenerationParams

    [outs] = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode(prompt), GenerationParams(max_tokens=max_tokens, ignore_eos=True)
            )
        ]
    )
    return outs[-1].completion_tokens


def inprocess_batches(engine, batch: int, max_tokens: int, duration_s: float) -> dict[str, float]:
    """The engine's own batched decoding: batches of ``batch`` requests decoded back to back."""
    from serving.engine import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    tokens, n, started, cpu = 0, 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - started < duration_s:
        seqs = [engine.sequence(engine.encode(f"def task_{n}_{i}("), params) for i in range(batch)]
        tokens += sum(outs[-1].completion_tokens for outs in engine.run_to_completion(seqs))
        n += 1
    return {
        "tokens": float(tokens),
        "requests": float(n * batch),
        "seconds": time.perf_counter() - started,
        "cpu_s": time.thread_time() - cpu,
    }


# ------------------------------------------------------------------------------ CPU time of Serve's
# processes
def serve_pids(app_name: str) -> dict[str, int]:
    """The pids of the app's replica and of Serve's HTTP proxy (Ray's state API, this cluster's
    dashboard)."""
    from ray.util.state import list_actors

    from pipelines.runtime import API_SERVER_ENV

    actors = list_actors(
        address=os.environ.get(API_SERVER_ENV),
        filters=[("state", "=", "ALIVE")],
        detail=True,
        limit=1000,
    )
    pids = {}
    for actor in actors:
        if actor.class_name.startswith(f"ServeReplica:{app_name}:"):
            pids["replica"] = actor.pid
        elif actor.class_name == "ProxyActor":
            pids["proxy"] = actor.pid
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def http_and_inprocess(
    app_url: str, engine, pids: dict[str, int], duration_s: float, slices: int
) -> dict[str, float]:
    """Concurrency-32 load over HTTP and the same work in process, in alternating slices (the
    machine's
    load varies: both see it alike), with the CPU seconds of the replica, the proxy and the
    engine."""
    totals: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        totals[key] = totals.get(key, 0.0) + value

    latencies_p50, latencies_p99 = [], []
    for _ in range(slices):
        before = cpu_of(pids)
        result = asyncio.run(closed_loop(app_url, CONCURRENCY, duration_s / slices, LOAD_TOKENS))
        after = cpu_of(pids)
        for name in pids:
            add(f"{name}_cpu_s", after[name] - before[name])
        for key in ("requests", "tokens", "errors", "seconds"):
            add(key, result[key])
        latencies_p50.append(result["p50_ms"])
        latencies_p99.append(result["p99_ms"])
        local = inprocess_batches(engine, CONCURRENCY, LOAD_TOKENS, duration_s / slices)
        for key, value in local.items():
            add(f"inprocess_{key}", value)
    out = {
        "rps": totals["requests"] / totals["seconds"],
        "tokens_per_s": totals["tokens"] / totals["seconds"],
        "p50_ms": statistics.median(latencies_p50),
        "p99_ms": max(latencies_p99),
        **totals,
        "inprocess_tokens_per_s": totals["inprocess_tokens"] / totals["inprocess_seconds"],
        "inprocess_tokens_per_cpu_s": totals["inprocess_tokens"] / totals["inprocess_cpu_s"],
    }
    if "replica_cpu_s" in totals:
        out["replica_tokens_per_cpu_s"] = totals["tokens"] / totals["replica_cpu_s"]
    if "proxy_cpu_s" in totals:
        out["proxy_cpu_ms_per_request"] = (
            1000 * totals["proxy_cpu_s"] / max(1.0, totals["requests"])
        )
    return out


# ------------------------------------------------------------------------------ over HTTP
def c1_p50_ms(
    http,
    method: str,
    url: str,
    repeats: int,
    body: dict | None = None,
    pids: dict[str, int] | None = None,
) -> tuple[float, float, dict[str, float]]:
    """p50 and least latency of one request at a time (after a few warm-up requests), and the CPU
    ms per request of ``pids``."""
    times, before = [], {}
    for i in range(repeats + 3):
        if i == 3:
            before = cpu_of(pids or {})
        started = time.perf_counter()
        response = http.request(method, url, json=body)
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        if i >= 3:
            times.append(elapsed)
    after = cpu_of(pids or {})
    return (
        statistics.median(times),
        min(times),
        {name: 1000 * (after[name] - before[name]) / repeats for name in before},
    )


def replica_latency(http, app_url: str, route: str = "/v1/completions") -> tuple[float, float]:
    """(sum of seconds, count) of the replica's own request-latency histogram for ``route`` (its
    /metrics)."""
    text = http.get(f"{app_url}/metrics").text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("moeops_request_latency_seconds_") and f'route="{route}"' in line:
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("moeops_request_latency_seconds_sum"):
                total += value
            elif line.startswith("moeops_request_latency_seconds_count"):
                count += value
    return total, count


def paired_overhead(
    http, app_url: str, engine, repeats: int, pids: dict[str, int]
) -> dict[str, float]:
    """HTTP and in-process runs of the same request, alternated; medians and the paired difference.

    The replica's own latency histogram (handler start to response ready) splits the overhead into
    what happens inside the replica's handler (FastAPI handler, engine loop, queues, rendering) and
    what happens around it (client, Serve's proxy, proxy -> replica, ASGI plumbing)."""
    http_ms, local_ms, local_cpu_s = [], [], 0.0
    replica_before, cpu_before = None, {}
    for n in range(repeats + 3):
        prompt = f"def task_{n}("
        started = time.perf_counter()
        response = http.post(
            f"{app_url}/v1/completions", json=completion_body(prompt, OVERHEAD_TOKENS)
        )
        h = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        assert response.json()["usage"]["completion_tokens"] == OVERHEAD_TOKENS, response.text
        started, cpu = time.perf_counter(), time.thread_time()
        inprocess_request(engine, prompt, OVERHEAD_TOKENS)
        local = (time.perf_counter() - started) * 1000
        if n >= 3:
            http_ms.append(h)
            local_ms.append(local)
            local_cpu_s += time.thread_time() - cpu
        if n == 2:
            replica_before = replica_latency(http, app_url)
            cpu_before = cpu_of(pids)
    cpu_after = cpu_of(pids)
    replica_after = replica_latency(http, app_url)
    replica_mean_ms = (
        1000
        * (replica_after[0] - replica_before[0])
        / max(1.0, replica_after[1] - replica_before[1])
    )
    diffs = [h - local for h, local in zip(http_ms, local_ms)]
    return {
        "http_ms_p50_c1": statistics.median(http_ms),
        "inprocess_ms_p50_c1": statistics.median(local_ms),
        "serve_overhead_ms_p50": statistics.median(diffs),
        "serve_overhead_ms_p90": percentile(diffs, 90),
        # the fastest HTTP request over the fastest in-process one: others' load only adds to a
        # request's time (each hop of the HTTP path waits for a core), while a cost of our path
        # itself is in every request (the least paired difference is no good: a pair whose
        # in-process half was held up goes negative)
        "serve_overhead_ms_best": min(http_ms) - min(local_ms),
        "http_ms_mean_c1": statistics.fmean(http_ms),
        "inprocess_ms_mean_c1": statistics.fmean(local_ms),
        "replica_handler_ms_mean_c1": replica_mean_ms,
        # inside the replica's handler beyond the engine's own decode / around the handler
        "overhead_in_handler_ms_mean": replica_mean_ms - statistics.fmean(local_ms),
        "overhead_around_handler_ms_mean": statistics.fmean(http_ms) - replica_mean_ms,
        "overhead_pairs": float(len(diffs)),
        "overhead_tokens": float(OVERHEAD_TOKENS),
        # CPU per request, whatever share of the cores each process got: the engine alone, the
        # replica (engine + our handler + Serve's replica side), Serve's proxy
        "inprocess_cpu_ms_per_request_c1": 1000 * local_cpu_s / len(diffs),
        **{
            f"{name}_cpu_ms_per_request_c1": 1000
            * (cpu_after[name] - cpu_before[name])
            / len(diffs)
            for name in pids
        },
    }


async def asgi_overhead(config, engine, repeats: int) -> dict[str, float]:
    """The app's ASGI path in process (no Serve, no sockets) against the engine alone,
    alternated."""
    import httpx

    from serving.api import build_asgi_app
    from serving.replica import Replica

    # the same Replica class the Serve deployment wraps (serving/app.py), without Serve
    replica = Replica(config, "in-process")
    await replica.start()
    app_ms, local_ms, app_cpu, local_cpu = [], [], 0.0, 0.0
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_asgi_app(replica)), base_url="http://app"
        ) as http:
            for n in range(repeats + 3):
                prompt = f"def task_{n}("
                started, cpu = (
                    time.perf_counter(),
                    time.process_time(),
                )  # all threads: the engine loop's too
                response = await http.post(
                    "/v1/completions", json=completion_body(prompt, OVERHEAD_TOKENS)
                )
                a, a_cpu = (time.perf_counter() - started) * 1000, time.process_time() - cpu
                response.raise_for_status()
                started, cpu = time.perf_counter(), time.process_time()
                inprocess_request(engine, prompt, OVERHEAD_TOKENS)
                if n >= 3:
                    local_ms.append((time.perf_counter() - started) * 1000)
                    local_cpu += time.process_time() - cpu
                    app_ms.append(a)
                    app_cpu += a_cpu
    finally:
        replica.close()
    return {
        "asgi_app_ms_p50_c1": statistics.median(app_ms),
        "app_overhead_ms_p50": statistics.median([a - b for a, b in zip(app_ms, local_ms)]),
        "asgi_app_cpu_ms_per_request_c1": 1000 * app_cpu / len(app_ms),
        "app_overhead_cpu_ms_per_request_c1": 1000 * (app_cpu - local_cpu) / len(app_ms),
    }


async def closed_loop(
    app_url: str, concurrency: int, duration_s: float, max_tokens: int | tuple[int, ...]
) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the previous returns
    (``max_tokens`` a tuple: client w's request n decodes ``max_tokens[(w + n) % len]``)."""
    lengths = max_tokens if isinstance(max_tokens, tuple) else (max_tokens,)
    import httpx

    latencies: list[float] = []
    tokens, errors = 0, 0

    async def client(worker: int, http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal tokens, errors
        n = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = await http.post(
                    f"{app_url}/v1/completions",
                    json=completion_body(
                        f"def task_{worker}_{n}(", lengths[(worker + n) % len(lengths)]
                    ),
                )
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]
            else:
                errors += 1
            n += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(i, http, started + duration_s) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": float(errors),
        "requests": float(len(latencies)),
        "tokens": float(tokens),
        "seconds": elapsed,
    }


async def running_sequences(http, app_url: str) -> float:
    """The replica's running-sequences gauge (its /metrics), all model versions."""
    text = (await http.get(f"{app_url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("moeops_running_sequences")
    )


async def short_behind_long(app_url: str, repeats: int, streamed: bool) -> dict[str, float]:
    """A short request's latency alone, and while ``LONG_REQUESTS`` long ones decode, alternated:
    the ratio is the median of ``repeats`` pairs' ratios.

    The long requests count as decoding once the replica runs all of them (its running-sequences
    gauge; streamed: once each has sent its first token); then the short one is sent."""
    import httpx

    async with httpx.AsyncClient(
        timeout=120, limits=httpx.Limits(max_connections=LONG_REQUESTS + 4)
    ) as http:

        async def short(n: int) -> float:
            started = time.perf_counter()
            response = await http.post(
                f"{app_url}/v1/completions", json=completion_body(f"x = {n}", SHORT_TOKENS)
            )
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            return elapsed * 1000

        async def long(n: int, decoding: asyncio.Event) -> None:
            body = completion_body(f"def long_{n}(", LONG_TOKENS, stream=streamed)
            if not streamed:
                (await http.post(f"{app_url}/v1/completions", json=body)).raise_for_status()
                return
            async with http.stream("POST", f"{app_url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for _ in response.aiter_lines():
                    decoding.set()

        async def all_decoding(events: list[asyncio.Event], longs: list[asyncio.Task]) -> bool:
            """True once all the long requests decode; False if one ended before that."""
            if streamed:
                await asyncio.gather(*(e.wait() for e in events))
                return True
            deadline = time.monotonic() + 60
            while await running_sequences(http, app_url) < LONG_REQUESTS:
                # the 8 x 64 tokens take 0.2-0.5 s: on a loaded machine the requests can reach the
                # replica so far apart that the first ends before the last starts (the pair is
                # then tried again, not waited on for ever)
                if any(task.done() for task in longs):
                    return False
                if time.monotonic() > deadline:
                    raise TimeoutError("the long requests never ran together")
                await asyncio.sleep(0.002)
            return True

        for i in range(2):  # warm-up
            await short(i)
        alone, behind, ratios, long_ms, missed = [], [], [], [], 0
        # alternated: each pair is one short request alone, then one behind the long ones, so
        # both halves of a pair see the machine's load of the same moment
        for r in range(3 * repeats):
            if len(ratios) == repeats:
                break
            short_alone = await short(100 + r)
            events = [asyncio.Event() for _ in range(LONG_REQUESTS)]
            t0 = time.perf_counter()
            longs = [
                asyncio.create_task(long(r * LONG_REQUESTS + i, events[i]))
                for i in range(LONG_REQUESTS)
            ]
            if not await all_decoding(events, longs):
                missed += 1
                await asyncio.gather(*longs)
                continue
            alone.append(short_alone)
            behind.append(await short(1000 + r))
            ratios.append(behind[-1] / alone[-1])
            await asyncio.gather(*longs)
            long_ms.append((time.perf_counter() - t0) * 1000)
    tag = "_streamed" if streamed else ""
    if not ratios:
        raise RuntimeError(f"the long requests never ran together ({missed} tries)")
    return {
        f"short_alone_ms_p50{tag}": statistics.median(alone),
        f"short_behind_long{tag}_ms_p50": statistics.median(behind),
        f"short_behind_long{tag}_latency_ratio": statistics.median(ratios),
        f"short_behind_long{tag}_pairs": float(len(ratios)),
        f"short_behind_long{tag}_pairs_missed": float(missed),
        f"long_batch{tag}_ms_p50": statistics.median(long_ms),
    }


def deploy_floor() -> None:
    """Two trivial deployments on the same proxy: what Ray Serve itself costs per request here."""
    from fastapi import FastAPI
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Floor:
        async def __call__(self, request) -> str:
            return "ok"

    floor_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(floor_api)
    class FloorFastAPI:
        @floor_api.post("/")
        async def constant(self, body: dict) -> dict:
            return FLOOR_ANSWER

    serve.run(Floor.bind(), name="floor", route_prefix=FLOOR_PREFIX)
    serve.run(FloorFastAPI.bind(), name="floor-fastapi", route_prefix=FLOOR_FASTAPI_PREFIX)


def deploy_static_batching(config) -> None:
    """Static batching, the baseline of continuous batching: Serve's own ``@serve.batch`` forms a
    batch of up to ``CONCURRENCY`` requests, the same engine (same model, same slots, one torch
    thread) decodes it to its end, then the next batch is formed. A plain deployment (no FastAPI)
    answering with the completion's token count: its request path is no slower than ours."""
    from ray import serve

    from serving.engine import EngineSettings, GenerationParams

    @serve.deployment(
        ray_actor_options={"num_cpus": float(config.serve.num_cpus)},
        max_ongoing_requests=int(config.serve.max_ongoing_requests),
    )
    class StaticBatching:
        def __init__(self, config):
            import torch

            from components.tracking.registry import load_registered
            from serving.model_store import champion_uri
            from serving.replica import make_engine

            torch.set_num_threads(1)
            loaded, _ = load_registered(champion_uri(config), config.tracking.uri)
            settings = EngineSettings.from_serve(config.serve)
            self.engine = make_engine(loaded, "none", "static", settings)

        @serve.batch(max_batch_size=CONCURRENCY, batch_wait_timeout_s=STATIC_BATCH_WAIT_S)
        async def decode(self, bodies: list[dict]) -> list[dict]:
            engine = self.engine
            seqs = [
                engine.sequence(
                    engine.encode(b["prompt"]),
                    GenerationParams(max_tokens=b["max_tokens"], ignore_eos=True),
                )
                for b in bodies
            ]
            # off the event loop, so the requests of the next batch queue up meanwhile
            results = await asyncio.to_thread(engine.run_to_completion, seqs)
            return [
                {"usage": {"completion_tokens": outs[-1].completion_tokens}} for outs in results
            ]

        async def __call__(self, request) -> dict:
            return await self.decode(await request.json())

    serve.run(StaticBatching.bind(config), name="static-batching", route_prefix=STATIC_PREFIX)


def continuous_vs_static(app_url: str, static_url: str, duration_s: float, slices: int) -> dict:
    """The mixed-length load at concurrency 32 on our app (continuous batching) and on the static
    batching deployment, in alternating slices."""
    totals = {
        f"{key}_{arm}": 0.0
        for key in ("requests", "tokens", "errors", "seconds")
        for arm in ("continuous", "static")
    }
    for _ in range(slices):
        for arm, url in (("continuous", app_url), ("static", static_url)):
            result = asyncio.run(closed_loop(url, CONCURRENCY, duration_s / slices, MIXED_TOKENS))
            for key in ("requests", "tokens", "errors", "seconds"):
                totals[f"{key}_{arm}"] += result[key]
    out = {f"{key}_c{CONCURRENCY}_mixed": value for key, value in totals.items()}
    for arm in ("continuous", "static"):
        out[f"rps_c{CONCURRENCY}_{arm}"] = totals[f"requests_{arm}"] / totals[f"seconds_{arm}"]
        out[f"tokens_per_s_c{CONCURRENCY}_{arm}"] = (
            totals[f"tokens_{arm}"] / totals[f"seconds_{arm}"]
        )
    out[f"continuous_vs_static_batching_rps_ratio_c{CONCURRENCY}"] = out[
        f"rps_c{CONCURRENCY}_continuous"
    ] / max(out[f"rps_c{CONCURRENCY}_static"], 1e-9)
    return out


# ------------------------------------------------------------------------------ run
def machine_load() -> tuple[float, str]:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return os.getloadavg()[0], uptime


def run_serve(quick: bool) -> dict[str, float | str]:
    import httpx
    import ray
    import torch
    from ray import serve

    torch.set_num_threads(1)  # what the replica gets (serve.num_cpus=1)

    from components.config import load_config
    from components.tracking.registry import load_registered
    from fixtures.tiny_model import register_tiny_models
    from pipelines.runtime import ensure_ray
    from serving.deploy.launch import deploy, wait_ready
    from serving.engine import EngineSettings
    from serving.replica import make_engine

    duration = 3.0 if quick else 15.0
    repeats = 10 if quick else 60
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    config = load_config(
        [
            f"paths.root={tmp / 'moeops'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}",
            "experiment=tiny",
            f"serve.port={free_port()}",
            "serve.num_cpus=1",
            "serve.app_name=bench",
            "serve.quantize=none",
            f"serve.max_num_seqs={CONCURRENCY}",
            "serve.max_queued_sequences=64",
            "serve.max_ongoing_requests=128",
            f"serve.max_tokens={LONG_TOKENS}",
            "serve.auth_token_env=MOEOPS_BENCH_NO_TOKEN",
            "cluster.num_cpus=4",
        ]
    )
    c = config.model
    out: dict[str, float | str] = {
        "model": f"{c.name} dim={c.dim} layers={c.n_layers} experts={c.num_experts} "
        f"top_k={c.top_k}",
        "max_num_seqs": float(config.serve.max_num_seqs),
        "replica_num_cpus": float(config.serve.num_cpus),
        "load_duration_s": duration,
    }
    register_tiny_models(config, versions=1, work_dir=tmp / "work")
    loaded, _ = load_registered(
        f"models:/{config.registry.model_name}@{config.registry.champion_alias}",
        config.tracking.uri,
    )
    engine = make_engine(loaded, "none", "inprocess", EngineSettings.from_serve(config.serve))
    out.update(asyncio.run(asgi_overhead(config, engine, repeats)))
    log(
        f"the app's ASGI path in process: {out['asgi_app_ms_p50_c1']:.2f} ms, "
        f"{out['app_overhead_ms_p50']:.2f} ms over the engine alone (CPU per request "
        f"{out['app_overhead_cpu_ms_per_request_c1']:.2f} ms more)"
    )
    ensure_ray(config)
    try:
        app_url = deploy(config)
        wait_ready(app_url, timeout_s=300)
        deploy_floor()
        base = app_url.rsplit("/", 1)[0] if config.serve.route_prefix != "/" else app_url
        log(f"deployed at {app_url}")

        with httpx.Client(timeout=60) as http:
            pids = serve_pids(config.serve.app_name)
            for key, method, url, app, body in (
                ("serve_floor", "GET", base + FLOOR_PREFIX, "floor", None),
                (
                    "serve_floor_fastapi",
                    "POST",
                    base + FLOOR_FASTAPI_PREFIX + "/",
                    "floor-fastapi",
                    completion_body("def f(", OVERHEAD_TOKENS),
                ),
                ("app_healthz", "GET", f"{app_url}/healthz", config.serve.app_name, None),
            ):
                # the replica's CPU per request here is Ray Serve's replica side (+ a trivial
                # handler)
                p50, least, cpu = c1_p50_ms(
                    http,
                    method,
                    url,
                    repeats,
                    body,
                    {"replica": serve_pids(app)["replica"], "proxy": pids["proxy"]},
                )
                out[f"{key}_ms_p50"] = p50
                out[f"{key}_ms_min"] = least
                out.update(
                    {f"{key}_{name}_cpu_ms_per_request": value for name, value in cpu.items()}
                )
            out.update(paired_overhead(http, app_url, engine, repeats, pids))
        log_figures(
            out,
            "serve_floor_ms_p50",
            "serve_floor_fastapi_ms_p50",
            "app_healthz_ms_p50",
            "http_ms_p50_c1",
            "inprocess_ms_p50_c1",
            "serve_overhead_ms_p50",
            "overhead_in_handler_ms_mean",
            "overhead_around_handler_ms_mean",
            "inprocess_cpu_ms_per_request_c1",
            "replica_cpu_ms_per_request_c1",
            "proxy_cpu_ms_per_request_c1",
        )

        out.update(
            {
                "short_tokens": float(SHORT_TOKENS),
                "long_tokens": float(LONG_TOKENS),
                "long_requests": float(LONG_REQUESTS),
            }
        )
        for streamed in (False, True):
            out.update(asyncio.run(short_behind_long(app_url, 5 if quick else 10, streamed)))
            tag = "_streamed" if streamed else ""
            log_figures(
                out,
                f"short_alone_ms_p50{tag}",
                f"short_behind_long{tag}_ms_p50",
                f"short_behind_long{tag}_latency_ratio",
            )

        asyncio.run(closed_loop(app_url, CONCURRENCY, 1.0, LOAD_TOKENS))  # warm at this load
        batched = http_and_inprocess(app_url, engine, pids, duration, 2 if quick else 5)
        deploy_static_batching(config)
        static_url = base + STATIC_PREFIX
        asyncio.run(closed_loop(static_url, CONCURRENCY, 1.0, MIXED_TOKENS))  # warm
        # quick: the same 6 s per arm in four alternated slices, not two (finer alternation spreads
        # the shared machine's load over both arms alike; two slices gave 1.7-2.4 at load 17-24)
        out.update(continuous_vs_static(app_url, static_url, 2 * duration, 4 if quick else 5))
    finally:
        serve.shutdown()
        ray.shutdown()
    out.update(
        {
            f"{key}_c{CONCURRENCY}": value
            for key, value in batched.items()
            if not key.startswith("inprocess_")
        }
    )
    log(
        f"c={CONCURRENCY} x {LOAD_TOKENS} tokens: {batched['rps']:6.1f} req/s, "
        f"{batched['tokens_per_s']:7.0f} tok/s, p50 {batched['p50_ms']:6.0f} ms, "
        f"p99 {batched['p99_ms']:6.0f} ms, errors {batched['errors']:.0f}"
    )
    log(
        f"mixed lengths {MIXED_TOKENS} at c={CONCURRENCY}: continuous "
        f"{out['rps_c32_continuous']:.1f} req/s, static {out['rps_c32_static']:.1f} req/s "
        f"(ratio {out['continuous_vs_static_batching_rps_ratio_c32']:.2f})"
    )
    out.update(
        {
            f"inprocess_{key[len('inprocess_') :]}_b{CONCURRENCY}": value
            for key, value in batched.items()
            if key.startswith("inprocess_")
        }
    )
    out["load_tokens"] = float(LOAD_TOKENS)
    # our overhead per request over what a bare Serve deployment with a FastAPI ingress costs
    out["serve_overhead_vs_bare_serve_ratio"] = out["serve_overhead_ms_p50"] / max(
        out["serve_floor_fastapi_ms_p50"], 1e-9
    )
    # the same from the fastest requests (what the quick test floors: the p50 one grew from 1.5
    # at load 1 to 6.3 at load 24 on the 2 cores, as each hop of the HTTP path waited longer)
    out["serve_overhead_best_vs_bare_serve_ratio"] = out["serve_overhead_ms_best"] / max(
        out["serve_floor_fastapi_ms_min"], 1e-9
    )
    out["decode_tokens_per_s_c32"] = batched["tokens_per_s"]
    out["decode_vs_inprocess_ratio_c32"] = (
        batched["tokens_per_s"] / batched["inprocess_tokens_per_s"]
    )
    if "replica_tokens_per_cpu_s" in batched:
        # per CPU second: what the replica spends beyond the engine, whatever share of the cores it
        # got
        out["decode_vs_inprocess_cpu_ratio_c32"] = (
            batched["replica_tokens_per_cpu_s"] / batched["inprocess_tokens_per_cpu_s"]
        )
    log_figures(
        out,
        "inprocess_tokens_per_s_b32",
        "decode_vs_inprocess_ratio_c32",
        "decode_vs_inprocess_cpu_ratio_c32",
        "serve_overhead_vs_bare_serve_ratio",
        "serve_overhead_best_vs_bare_serve_ratio",
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (int8 at its quick sizes)"
    )
    parser.add_argument(
        "--no-int8",
        action="store_true",
        help="leave out bench_int8.py's figures (the test suite runs its quick run on its own)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    load_start, uptime_start = machine_load()
    figures: dict = {
        "benchmark": "bench_serve",
        "goals": GOALS,
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "load_1m_start": load_start,
        "uptime_start": uptime_start,
    }
    figures.update(run_serve(args.quick))

    if not args.no_int8:
        import bench_int8  # tests/benchmarks/, beside this file

        int8 = bench_int8.run(quick=args.quick)
        figures.update({f"int8.{key}": value for key, value in int8.items()})
        for key in (
            "int8_vs_fp32_speed_ratio",
            "int8_vs_fp32_speed_ratio_compute_bound",
            "int8_perplexity_change_pct",
        ):
            figures[key] = int8[key]
    figures["load_1m_end"], figures["uptime"] = machine_load()
    figures["wall_s"] = time.perf_counter() - t0
    figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    Path(args.json_out).write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(
        json.dumps(
            {
                k: figures[k]
                for k in (
                    *(goal for goal in GOALS if goal in figures),
                    "serve_floor_ms_p50",
                    "decode_tokens_per_s_c32",
                    "load_1m_start",
                    "load_1m_end",
                )
            },
            indent=2,
        ),
        flush=True,
    )
    return figures


if __name__ == "__main__":
    main()
