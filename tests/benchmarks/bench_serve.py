"""Serving benchmark: dynamic batching on vs off, Serve overhead, int8 vs fp32.

    python tests/benchmarks/bench_serve.py --json serve.json          # full run (~2-3 min)
    python tests/benchmarks/bench_serve.py --quick --json serve.json  # smoke run for tests

Starts its own local Ray + Serve on a free loopback port, registers a tiny random model in
a fresh sqlite MLflow registry, and drives the app with N concurrent HTTP clients
(closed loop, each sends its next request when the previous one returns). Batching "off"
is the same deployment reconfigured in place with ``max_batch_size=1``.

Figures (all in the JSON): ``rps_c{N}_{batched,unbatched}``, ``p50_ms_c{N}_*``, ``p99_ms_c{N}_*``,
``errors_c{N}_*``, ``batched_vs_unbatched_rps_ratio_c{N}``, ``serve_overhead_ms_p50`` (median of
paired differences: one request over HTTP through Serve minus the same generation called in
process, alternated, concurrency 1; includes the batcher's wait), ``int8_vs_fp32_speed_ratio``
(generated tokens/s, batch of 8, in process, runs alternated) and ``int8_perplexity_change_pct``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from pipelines.runtime import free_port  # noqa: E402

# long enough that decoding, not the HTTP path, dominates a request (as in LLM serving benchmarks)
MAX_TOKENS = 32
SCORE_TEXT = "def main(argv):\n    parser = argparse.ArgumentParser()\n    return parser.parse_args(argv)\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def closed_loop(url: str, concurrency: int, duration_s: float) -> dict[str, float]:
    """``concurrency`` clients for ``duration_s``; requests/s, latency percentiles and errors."""
    import httpx

    latencies: list[float] = []
    errors = 0

    async def client(worker: int, http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal errors
        n = 0
        while time.monotonic() < deadline:
            body = {"prompt": f"def task_{worker}_{n}(", "max_tokens": MAX_TOKENS, "temperature": 0.8,
                    "seed": n, "stop": ["\x00"]}
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/completions", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            n += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.monotonic()
        deadline = started + duration_s
        await asyncio.gather(*(client(i, http, deadline) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "errors": float(errors), "requests": float(len(latencies))}


def paired_overhead_ms(url: str, engine, repeats: int) -> tuple[float, float, float]:
    """(HTTP p50, in-process p50, p50 of per-pair differences) at concurrency 1.

    The two are interleaved request by request so that load from other processes on the
    machine hits both alike; the overhead is the median of paired differences.
    """
    import httpx

    from serving.generation import SamplingParams

    http_ms, local_ms = [], []
    with httpx.Client(timeout=60) as http:
        for n in range(repeats):
            prompt = f"def task_0_{n}("
            started = time.perf_counter()
            response = http.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                                "temperature": 0.8, "seed": n, "stop": ["\x00"]})
            http_ms.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            started = time.perf_counter()
            engine.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=n, stop=("\x00",)))
            local_ms.append((time.perf_counter() - started) * 1000)
    diffs = [h - l for h, l in zip(http_ms, local_ms)]
    return statistics.median(http_ms), statistics.median(local_ms), statistics.median(diffs)


def decode_seconds(engine, batch: int) -> tuple[float, int]:
    from serving.generation import SamplingParams

    prompts = [engine.encode(f"def task_{i}(") for i in range(batch)]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=("\x00",))] * batch
    started = time.perf_counter()
    decoding = engine.start(prompts, params)
    while not decoding.done:
        decoding.step()
    return time.perf_counter() - started, decoding.generated_tokens


def int8_vs_fp32_tokens_per_s(fp32, int8, batch: int, repeats: int) -> tuple[float, float]:
    """Median tokens/s of each, runs alternated so machine load affects both alike."""
    speeds: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(repeats):
        for name, engine in (("fp32", fp32), ("int8", int8)):
            seconds, tokens = decode_seconds(engine, batch)
            speeds[name].append(tokens / seconds)
    return statistics.median(speeds["fp32"]), statistics.median(speeds["int8"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load point")
    args = parser.parse_args()
    duration = args.duration or (1.5 if args.quick else 10.0)
    concurrencies = (1, 8, 32)

    import ray
    import torch
    from ray import serve

    # the replica decodes with one thread (serve.num_cpus=1); the in-process baseline must too
    torch.set_num_threads(1)

    from components.config import load_config, with_overrides
    from components.tracking.registry import load_registered
    from pipelines.runtime import ensure_ray
    from serving.app import make_engine
    from serving.launch import deploy, wait_ready
    from serving.tiny_model import register_tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    config = load_config([
        f"paths.root={tmp / 'moeops'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}", "experiment=tiny",
        f"serve.port={free_port()}", "serve.num_cpus=1", "serve.max_batch_size=32",
        "serve.batch_wait_timeout_s=0.01", "serve.max_ongoing_requests=128", "serve.app_name=bench",
        "serve.auth_token_env=MOEOPS_BENCH_NO_TOKEN", "cluster.num_cpus=4",
        "serve.max_prompt_tokens=32", f"serve.max_tokens={MAX_TOKENS}",
    ])
    figures: dict[str, float | str] = {"quick": str(args.quick), "duration_s": duration, "max_tokens": MAX_TOKENS,
                                       "model": f"{config.model.name} dim={config.model.dim} "
                                                f"layers={config.model.n_layers} experts={config.model.num_experts}"}
    t0 = time.perf_counter()
    register_tiny_models(config, versions=1, work_dir=tmp / "work")
    loaded, _ = load_registered(f"models:/{config.registry.model_name}@champion", config.tracking.uri)
    fp32, int8 = make_engine(loaded, "none"), make_engine(loaded, "int8")
    repeats = 10 if args.quick else 40
    ensure_ray(config)
    try:
        url = deploy(config)
        wait_ready(url, timeout_s=180)
        for label, batch_size in (("batched", config.serve.max_batch_size), ("unbatched", 1)):
            deploy(with_overrides(config, {"serve.max_batch_size": batch_size}))  # reconfigure in place
            asyncio.run(closed_loop(url, 4, 0.5))  # warm the path
            for c in concurrencies:
                result = asyncio.run(closed_loop(url, c, duration))
                for key, value in result.items():
                    figures[f"{key}_c{c}_{label}"] = round(value, 3)
                print(f"[bench] {label:9s} c={c:2d}: {result['rps']:7.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
                      f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors']:.0f}", flush=True)
        for c in concurrencies:
            figures[f"batched_vs_unbatched_rps_ratio_c{c}"] = round(
                figures[f"rps_c{c}_batched"] / max(figures[f"rps_c{c}_unbatched"], 1e-9), 3)
        deploy(config)  # batching back on for the overhead figure (c=1, as deployed)
        http_p50, local_p50, overhead = paired_overhead_ms(url, fp32, repeats)
    finally:
        serve.shutdown()
        ray.shutdown()

    figures["http_p50_ms_c1"] = round(http_p50, 3)
    figures["in_process_p50_ms_c1"] = round(local_p50, 3)
    figures["serve_overhead_ms_p50"] = round(overhead, 3)
    figures["batch_wait_timeout_ms"] = config.serve.batch_wait_timeout_s * 1000  # part of the c=1 overhead
    speed_fp32, speed_int8 = int8_vs_fp32_tokens_per_s(fp32, int8, 8, 3 if args.quick else 7)
    figures["fp32_tokens_per_s_b8"] = round(speed_fp32, 1)
    figures["int8_tokens_per_s_b8"] = round(speed_int8, 1)
    figures["int8_vs_fp32_speed_ratio"] = round(speed_int8 / speed_fp32, 3)
    ppl_fp32 = fp32.score(fp32.encode(SCORE_TEXT)).perplexity
    ppl_int8 = int8.score(int8.encode(SCORE_TEXT)).perplexity
    figures["fp32_perplexity"] = round(ppl_fp32, 4)
    figures["int8_perplexity"] = round(ppl_int8, 4)
    figures["int8_perplexity_change_pct"] = round(100 * (ppl_int8 - ppl_fp32) / ppl_fp32, 3)
    figures["wall_s"] = round(time.perf_counter() - t0, 1)

    Path(args.json).write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(json.dumps({k: figures[k] for k in ("batched_vs_unbatched_rps_ratio_c32", "p99_ms_c32_batched",
                                              "serve_overhead_ms_p50", "int8_vs_fp32_speed_ratio")}, indent=2))


if __name__ == "__main__":
    main()
