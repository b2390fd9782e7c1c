"""``serve.engine=vllm``: the registry's version served by vLLM through Ray Serve LLM (driver side).

    python -m pipelines.deploy serve=gpu serve.engine=vllm

The deploy stage resolves the alias (``serve.model_uri``, default the champion) to its version
and that version's Hugging Face directory (the register stage's ``hf/`` artifact,
``components.tracking.hf_artifact``), then builds a Ray Serve LLM application from it:
``ray.serve.llm:build_openai_app`` with one ``LLMConfig`` per served version. The application
is written as a Serve config file first (:func:`llm_serve_config`: ``import_path`` + ``args``),
the declarative form ``serve deploy`` and a RayService take, which needs nothing imported on
the driver; :func:`build_llm_app` turns the same ``args`` into an Application with the public
``ray.serve.llm`` API, which needs vLLM installed (``pip install 'moeops[vllm]'``, GPU nodes).

What carries over from ``serve.engine=moeops`` and what does not (docs/serving.md):

* registry alias -> version: resolved here, on the driver, once per deploy (moeops' replicas
  resolve it themselves and switch in place on ``reconfigure``); model id = registry name.
* ``serve.route_prefix``, host/port, proxy location, replicas or autoscaling,
  ``max_ongoing_requests``: the same.
* canary: Ray Serve LLM routes on the request's ``model`` only, with no weighted split. With
  ``serve.canary_fraction > 0`` the challenger is served as a second model,
  ``<name>@<challenger alias>`` (the name moeops pins it by); clients choose it explicitly.
* bearer-token auth: Ray Serve LLM 2.60 has no hook for it, so a deploy with the token variable
  set is refused rather than served open (put an authenticating gateway in front).
* the chat format: the export's Jinja ``chat_template`` (same text); moeops' turn stop
  ``"\\n### "`` is not a server default in vLLM: clients pass ``stop`` themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import Config
from components.tracking.hf_artifact import export_registered_hf, registered_hf
from components.tracking.registry import VersionInfo, find_version, get_version, parse_model_uri
from serving.deploy.config import autoscaling_config, serve_file
from serving.deploy.wait import poll_json
from serving.middleware import token_from_env
from serving.model_store import challenger_uri, resolved_model_uri

IMPORT_PATH = "ray.serve.llm:build_openai_app"
# object stores a Ray Serve LLM replica downloads a model directory from itself (CloudMirrorConfig)
REMOTE_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")


class VllmUnavailable(RuntimeError):
    """``ray.serve.llm`` cannot be imported here (vLLM is not installed)."""


@dataclass(frozen=True)
class ServedVersion:
    """One model of the Ray Serve LLM app: its model id and where replicas load it from."""

    model_id: str
    info: VersionInfo
    source: str | dict[str, str]  # a local directory, or {"bucket_uri": "s3://..."}


def check_auth(config: Config) -> None:
    """Refuse to deploy vLLM open while a bearer token is configured (no auth hook in Ray Serve
    LLM 2.60)."""
    if token_from_env(config.serve.auth_token_env):
        raise ValueError(
            f"serve.engine='vllm': ${config.serve.auth_token_env} holds a bearer token, but Ray "
            "Serve LLM has no authentication hook, so the endpoint would be open; put an "
            "authenticating gateway in front and deploy with serve.auth_token_env='' (or unset "
            "the variable), or use serve.engine=moeops"
        )


def model_source(info: VersionInfo, tracking_uri: str, local_root: Path) -> str | dict[str, str]:
    """Where replicas load a version's HF directory from: the object store it was logged to
    (replicas download it), else a directory on this machine (single node, or a path every node
    shares), downloaded from the registry or exported from the version's moeops artifact."""
    logged = registered_hf(info)
    if logged is not None and logged.location.startswith(REMOTE_SCHEMES):
        return {"bucket_uri": logged.location}
    if logged is not None:
        local = logged.location.removeprefix("file://")
        if Path(local, "config.json").is_file():
            return local
    target = local_root / f"{info.name}-v{info.version}"
    if (target / "config.json").is_file():
        return str(target)
    if logged is not None:
        import mlflow

        downloaded = mlflow.artifacts.download_artifacts(
            artifact_uri=logged.uri,
            dst_path=str(local_root / f"{info.name}-v{info.version}-download"),
            tracking_uri=tracking_uri,
        )
        return downloaded
    # a version registered before the register stage logged HF directories
    out, _ = export_registered_hf(info.model_uri, tracking_uri, target)
    return str(out)


def served_versions(config: Config, model_uri: str | None = None) -> list[ServedVersion]:
    """The champion (``serve.model_uri``) and, with ``serve.canary_fraction > 0``, the challenger
    when its alias exists and names another version."""
    tracking_uri = config.tracking.uri
    local_root = Path(config.paths.root) / "hf"
    uri = resolved_model_uri(config, model_uri)
    name, _, _ = parse_model_uri(uri)
    champion = get_version(uri, tracking_uri)
    served = [ServedVersion(name, champion, model_source(champion, tracking_uri, local_root))]
    if config.serve.canary_fraction > 0:
        challenger = find_version(challenger_uri(config), tracking_uri)
        if challenger is not None and challenger.version != champion.version:
            served.append(
                ServedVersion(
                    f"{name}@{config.registry.challenger_alias}",
                    challenger,
                    model_source(challenger, tracking_uri, local_root),
                )
            )
    return served


def llm_config(config: Config, version: ServedVersion) -> dict[str, Any]:
    """One ``ray.serve.llm.LLMConfig`` as a plain dict (its field names, checked by the test
    against Ray's own model)."""
    s = config.serve
    deployment: dict[str, Any] = {"max_ongoing_requests": int(s.max_ongoing_requests)}
    a = s.autoscaling
    if a.enabled:
        deployment["autoscaling_config"] = autoscaling_config(a)
    else:
        deployment["num_replicas"] = int(s.num_replicas)
    return {
        "model_loading_config": {"model_id": version.model_id, "model_source": version.source},
        "engine_kwargs": {
            # the GPUs of one replica (validated: a whole number >= 1)
            "tensor_parallel_size": int(s.num_gpus),
            "max_model_len": int(config.model.max_seq_len),
            "max_num_seqs": int(s.max_num_seqs),
            "dtype": "bfloat16",
        },
        "deployment_config": deployment,
    }


def llm_serving_args(config: Config, versions: list[ServedVersion]) -> dict[str, Any]:
    """``build_openai_app``'s argument (``LLMServingArgs`` as a plain dict)."""
    return {"llm_configs": [llm_config(config, v) for v in versions]}


def llm_serve_config(config: Config, versions: list[ServedVersion]) -> dict[str, Any]:
    """The Serve config-file dict of the vLLM application (``serve deploy``, RayService
    ``serveConfigV2``): the same keys as serving.deploy.config.serve_config."""
    return serve_file(config, IMPORT_PATH, llm_serving_args(config, versions))


def build_llm_app(args: dict[str, Any]):
    """The Application ``serve.run`` deploys, from :func:`llm_serving_args`' dict (public
    ``ray.serve.llm`` API; needs vLLM)."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as err:
        raise VllmUnavailable(
            f"serve.engine='vllm' needs Ray Serve LLM with vLLM on the driver ({err}); install "
            "'moeops[vllm]' on the GPU cluster's image, or deploy the logged serve_config.yaml "
            "with `serve deploy`"
        ) from err
    return build_openai_app(copy.deepcopy(args))


def deploy_llm_app(config: Config, app) -> str:
    """``serve.run`` a :func:`build_llm_app` Application (non-blocking) on the running Ray;
    returns the application's base URL."""
    from ray import serve

    from serving.deploy.launch import ensure_serve

    base = ensure_serve(config.serve.host, config.serve.port, config.serve.proxy_location)
    prefix = config.serve.route_prefix
    serve.run(app, name=config.serve.app_name, route_prefix=prefix, blocking=False)
    return base + ("" if prefix == "/" else prefix.rstrip("/"))


def wait_models(app_url: str, model_ids: list[str], timeout_s: float) -> dict:
    """Poll ``GET /v1/models`` until every model id is listed (Ray Serve LLM has no /readyz)."""

    def listed(body: dict) -> bool:
        return set(model_ids) <= {m.get("id") for m in body.get("data", [])}

    return poll_json(f"{app_url}/v1/models", listed, timeout_s, interval_s=2.0)
