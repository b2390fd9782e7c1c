"""The ``deploy`` stage: serve the registry's champion over HTTP with Ray Serve.

    python -m pipelines.deploy                       # after register; endpoint up while the process
    lives
    python -m pipelines.deploy serve.block=true      # keep serving until Ctrl-C

Writes the equivalent Serve config file (``serve deploy serve_config.yaml``, RayService
``serveConfigV2``) as an artifact, deploys with ``serve.run`` (non-blocking), waits for
``/readyz``, and sends one real completion request whose response is logged as evidence.
A redeploy after the champion alias moved changes only ``user_config`` (its ``revision``
is the champion's version): a rolling update whose replacements take traffic once warm, so no
request is dropped (``serve deploy`` of the logged config file reconfigures in place).
"""

from __future__ import annotations

import json
import time

import httpx
import yaml

from components.config import Config
from components.tracking.registry import find_version
from components.tracking.stages import StageContext, StageSpec
from pipelines._cli import stage_main
from pipelines.outputs import DeployOutputs, RegisterOutputs
from serving.deploy.config import resolved_model_uri, serve_config
from serving.middleware import token_from_env

SMOKE_MAX_TOKENS = 8


def run(ctx: StageContext) -> DeployOutputs:
    from pipelines.runtime import ensure_ray
    from serving.deploy.launch import deploy, wait_ready

    config = ctx.config
    if config.serve.engine == "vllm":  # Ray Serve LLM on GPU replicas (serving/deploy/llm_app.py)
        from pipelines import deploy_vllm

        return deploy_vllm.run(ctx)
    model_uri = resolved_model_uri(config)
    registered = ctx.input(RegisterOutputs)
    champion = find_version(model_uri, ctx.tracking_uri)
    # e.g. the first challenger lost to its dense baseline: say why there is no champion
    if champion is None:
        raise LookupError(
            f"nothing to serve: {model_uri} does not exist yet. The register stage registered "
            f"version {registered.model_version} without promoting it ({registered.reason}). "
            f"Serve it anyway with serve.model_uri={registered.model_uri}, or promote a first "
            "version regardless of its dense baseline with registry.require_dense_win=false."
        )
    print(
        f"[deploy] serving {model_uri} = version {champion.version} "
        f"(register stage produced version {registered.model_version})",
        flush=True,
    )

    config_file = ctx.work_dir / "serve_config.yaml"
    config_file.write_text(
        yaml.safe_dump(serve_config(config, model_uri, revision=champion.version), sort_keys=False)
    )
    ctx.log_artifact(config_file)

    ensure_ray(config)
    started = time.perf_counter()
    endpoint = deploy(config, model_uri, revision=champion.version)
    ready = wait_ready(endpoint, config.serve.ready_timeout_s, expect_version=champion.version)
    deploy_s = time.perf_counter() - started

    smoke = smoke_request(config, endpoint)
    ctx.log_text(json.dumps({"readyz": ready, **smoke}, indent=2), "smoke_response.json")
    ctx.log_metrics({"deploy_s": deploy_s, "smoke_latency_ms": smoke["latency_ms"]})
    ctx.set_tags({"moeops.endpoint": endpoint, "moeops.served_version": champion.version})
    print(
        f"[deploy] {endpoint}/v1/completions ready with {champion.name}/{champion.version}; "
        f"smoke completion: {smoke['response']['choices'][0]['text']!r}",
        flush=True,
    )

    if config.serve.block:
        block_until_interrupted(endpoint)
    return DeployOutputs(
        endpoint=endpoint,
        model_uri=model_uri,
        model_version=champion.version,
        serve_config_path=str(config_file),
    )


def auth_headers(config: Config) -> dict[str, str]:
    token = token_from_env(config.serve.auth_token_env)
    return {"authorization": f"Bearer {token}"} if token else {}


def smoke_request(config: Config, endpoint: str) -> dict:
    """One real completion over HTTP; raises with the server's answer if it is not a 200."""
    body = {"prompt": config.serve.smoke_prompt, "max_tokens": SMOKE_MAX_TOKENS, "seed": 0}
    started = time.perf_counter()
    response = httpx.post(
        f"{endpoint}/v1/completions", json=body, headers=auth_headers(config), timeout=60
    )
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(
            f"smoke completion failed: HTTP {response.status_code}: {response.text[:500]}"
        )
    return {
        "request": body,
        "response": response.json(),
        "latency_ms": latency_ms,
        "model_version_header": response.headers.get("x-moeops-model-version", ""),
    }


def block_until_interrupted(endpoint: str) -> None:
    try:
        # inside the try: a signal sent as soon as this line is read may arrive before the loop
        print(f"[deploy] serving at {endpoint} until Ctrl-C (serve.block=true)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[deploy] stopping", flush=True)


def still_serving(config: Config, outputs: DeployOutputs) -> bool:
    """A cached deploy is reused only while its endpoint is ready and serves the recorded
    version."""
    endpoint = outputs.endpoint
    if not endpoint:
        return False
    try:
        response = httpx.get(f"{endpoint}/readyz", timeout=3)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    return outputs.model_version in response.json().get("versions", {}).values()


SPEC = StageSpec(
    name="deploy",
    config_keys=("serve", "registry"),
    upstream=(RegisterOutputs,),
    fn=run,
    outputs=DeployOutputs,
    still_valid=still_serving,
)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
