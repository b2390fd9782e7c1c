"""The Serve config file for moeops' application, derived from the one config.

Pure and deterministic (no Ray, no MLflow, no clock): the deploy stage writes it for
``serve deploy``, and ``pipelines/render.py`` embeds the same dict as a KubeRay
RayService's ``serveConfigV2``. :func:`serving.app.build_app` applies the same
deployment options, so ``serve.run`` from Python and ``serve deploy <file>`` agree.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from components.config import Config, to_container

IMPORT_PATH = "serving.app:build_app"
DEPLOYMENT_NAME = "CompletionServer"
# in-flight requests finish before a replica is stopped (scale-down, redeploy)
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0
HEALTH_CHECK_PERIOD_S = 5.0


def champion_uri(config: Config) -> str:
    return f"models:/{config.registry.model_name}@{config.registry.champion_alias}"


def challenger_uri(config: Config) -> str:
    return f"models:/{config.registry.model_name}@{config.registry.challenger_alias}"


def resolved_model_uri(config: Config, model_uri: Optional[str] = None) -> str:
    uri = model_uri or config.serve.model_uri or champion_uri(config)
    if not uri.startswith("models:/"):
        raise ValueError(f"model_uri={uri!r}: must be models:/<name>@<alias> or models:/<name>/<version>")
    return uri


def user_config(config: Config, model_uri: Optional[str] = None, revision: str = "") -> dict[str, Any]:
    """What a running deployment can change in place (``reconfigure``), without restarting replicas.

    ``revision`` is opaque: a new value (e.g. the registered version the alias now points to)
    makes replicas re-resolve their aliases even when nothing else changed.
    """
    s = config.serve
    return {
        "model_uri": resolved_model_uri(config, model_uri),
        "challenger_uri": challenger_uri(config),
        "canary_fraction": float(s.canary_fraction),
        "quantize": s.quantize,
        "max_batch_size": int(s.max_batch_size),
        "batch_wait_timeout_s": float(s.batch_wait_timeout_s),
        "revision": str(revision),
    }


def deployment_options(config: Config, model_uri: Optional[str] = None, revision: str = "") -> dict[str, Any]:
    """Options of the one deployment, in the Serve config file's field names."""
    s = config.serve
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": int(s.max_ongoing_requests),
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "ray_actor_options": {"num_cpus": float(s.num_cpus), "num_gpus": float(s.num_gpus)},
        "user_config": user_config(config, model_uri, revision),
    }
    if s.autoscaling.enabled:
        options["autoscaling_config"] = {
            "min_replicas": int(s.autoscaling.min_replicas),
            "initial_replicas": int(s.autoscaling.min_replicas),
            "max_replicas": int(s.autoscaling.max_replicas),
            "target_ongoing_requests": float(s.autoscaling.target_ongoing_requests),
        }
    else:
        options["num_replicas"] = int(s.num_replicas)
    return options


def app_args(config: Config, model_uri: Optional[str] = None) -> dict[str, Any]:
    """``build_app``'s argument: the plain config container with ``serve.model_uri`` filled in."""
    args = copy.deepcopy(to_container(config))
    args["serve"]["model_uri"] = resolved_model_uri(config, model_uri)
    return args


def serve_config(config: Config, model_uri: Optional[str] = None, *, revision: str = "") -> dict[str, Any]:
    """The Serve config-file dict (``serve deploy``, RayService ``serveConfigV2``)."""
    s = config.serve
    return {
        "proxy_location": s.proxy_location,
        "http_options": {"host": s.host, "port": int(s.port)},
        "applications": [
            {
                "name": s.app_name,
                "route_prefix": s.route_prefix,
                "import_path": IMPORT_PATH,
                "args": app_args(config, model_uri),
                "deployments": [deployment_options(config, model_uri, revision)],
            }
        ],
    }
