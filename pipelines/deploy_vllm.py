"""The deploy stage with ``serve.engine=vllm``: Ray Serve LLM (vLLM) serves the version's Hugging
Face export on GPU replicas (serving/llm_app.py; docs/serving.md, "Two engines").

Everything that can fail without a cluster is checked before Ray starts: the config (GPU
replicas, validated at load), the bearer-token refusal, the registry alias and the version's HF
directory, and that ``ray.serve.llm`` imports (vLLM installed). The Serve config file is logged
first (``serve deploy`` / RayService take it as is).
"""

from __future__ import annotations

import json
import time

import httpx
import yaml

from components.tracking.stages import StageContext
from pipelines.outputs import DeployOutputs
from serving.deploy.config import resolved_model_uri
from serving.llm_app import (
    build_llm_app,
    check_auth,
    deploy_llm_app,
    llm_serve_config,
    llm_serving_args,
    served_versions,
    wait_models,
)

SMOKE_MAX_TOKENS = 8


def run(ctx: StageContext) -> DeployOutputs:
    from pipelines.runtime import ensure_ray

    config = ctx.config
    check_auth(config)
    versions = served_versions(config)
    champion = versions[0]
    config_file = ctx.work_dir / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(llm_serve_config(config, versions), sort_keys=False))
    ctx.log_artifact(config_file)
    for v in versions:
        print(f"[deploy] vllm: {v.model_id} = {v.info.model_uri} from {v.source}", flush=True)
    app = build_llm_app(llm_serving_args(config, versions))  # fails here without vLLM

    ensure_ray(config)
    started = time.perf_counter()
    endpoint = deploy_llm_app(config, app)
    models = wait_models(endpoint, [v.model_id for v in versions], config.serve.ready_timeout_s)
    deploy_s = time.perf_counter() - started

    body = {
        "model": champion.model_id,
        "prompt": config.serve.smoke_prompt,
        "max_tokens": SMOKE_MAX_TOKENS,
        "temperature": 0.0,
    }
    started = time.perf_counter()
    response = httpx.post(f"{endpoint}/v1/completions", json=body, timeout=120)
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"smoke completion failed: HTTP {response.status_code}: {response.text}")
    smoke = {"models": models, "request": body, "response": response.json()}
    ctx.log_text(json.dumps(smoke, indent=2), "smoke_response.json")
    ctx.log_metrics({"deploy_s": deploy_s, "smoke_latency_ms": latency_ms})
    ctx.set_tags(
        {
            "moeops.endpoint": endpoint,
            "moeops.served_version": champion.info.version,
            "moeops.serve_engine": "vllm",
        }
    )
    print(f"[deploy] {endpoint}/v1/completions ready (vLLM) with {champion.info.model_uri}")
    if config.serve.block:
        from pipelines.deploy import block_until_interrupted

        block_until_interrupted(endpoint)
    return DeployOutputs(
        endpoint=endpoint,
        model_uri=resolved_model_uri(config),
        model_version=champion.info.version,
        serve_config_path=str(config_file),
    )
