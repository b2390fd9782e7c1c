"""The Serve config file for moeops' application, derived from the one config.

Pure and deterministic (no Ray, no MLflow, no clock): the deploy stage writes it for
``serve deploy``, and ``infra/render.py`` embeds the same dict as a KubeRay
RayService's ``serveConfigV2``. :func:`serving.app.make_application` applies the same
deployment options, so ``serve.run`` from Python and ``serve deploy <file>`` agree.

Plain data only here, because it is written to a file: ``args`` (the config container, which
:func:`serving.app.build_app` turns back into the typed config) and ``user_config`` (what a
``serve deploy`` changes in place; Serve requires it to be JSON).
"""

from __future__ import annotations

import copy
from typing import Any

from components.config import Config, to_container
from serving.model_store import resolved_model_uri

IMPORT_PATH = "serving.app:build_app"
DEPLOYMENT_NAME = "CompletionServer"
# in-flight requests finish before a replica is stopped (scale-down, redeploy)
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0
HEALTH_CHECK_PERIOD_S = 5.0
# Serve's default autoscaling metrics push interval (ray.serve.config.DEFAULT_METRICS_INTERVAL_S)
RAY_DEFAULT_METRICS_INTERVAL_S = 10.0


def user_config(config: Config, model_uri: str | None = None, revision: str = "") -> dict[str, Any]:
    """What a running deployment can change in place (``reconfigure``): the ``serve`` and
    ``registry``
    sections, from which replicas rebuild their typed config.

    ``revision`` is opaque: a new value (e.g. the registered version the alias now points to)
    makes replicas re-resolve their aliases even when nothing else changed.
    """
    container = to_container(config)
    serve = container["serve"]
    serve["model_uri"] = resolved_model_uri(config, model_uri)
    return {"serve": serve, "registry": container["registry"], "revision": str(revision)}


def deployment_options(
    config: Config, model_uri: str | None = None, revision: str = ""
) -> dict[str, Any]:
    """Options of the one deployment, in the Serve config file's field names."""
    s = config.serve
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": int(s.max_ongoing_requests),
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        # a rolling update (new code, or serve.run) starts the replacements first: the old replicas
        # serve until the new ones are warm
        "max_surge_percent": int(s.max_surge_percent),
        "ray_actor_options": {"num_cpus": float(s.num_cpus), "num_gpus": float(s.num_gpus)},
        "user_config": user_config(config, model_uri, revision),
    }
    a = s.autoscaling
    if a.enabled:
        options["autoscaling_config"] = autoscaling_config(a)
        if a.metrics_interval_s != RAY_DEFAULT_METRICS_INTERVAL_S:
            # deprecated by Ray 2.60 (its replacement env vars are not read yet): only sent when
            # changed
            options["autoscaling_config"]["metrics_interval_s"] = float(a.metrics_interval_s)
    else:
        options["num_replicas"] = int(s.num_replicas)
    return options


def autoscaling_config(a) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` from ``serve.autoscaling`` (both engines' deployments)."""
    return {
        "min_replicas": int(a.min_replicas),
        "initial_replicas": int(a.min_replicas),
        "max_replicas": int(a.max_replicas),
        "target_ongoing_requests": float(a.target_ongoing_requests),
        "upscale_delay_s": float(a.upscale_delay_s),
        "downscale_delay_s": float(a.downscale_delay_s),
        "look_back_period_s": float(a.look_back_period_s),
    }


def app_args(config: Config, model_uri: str | None = None) -> dict[str, Any]:
    """``build_app``'s argument: the plain config container with ``serve.model_uri`` filled in."""
    args = copy.deepcopy(to_container(config))
    args["serve"]["model_uri"] = resolved_model_uri(config, model_uri)
    return args


def serve_config(
    config: Config,
    model_uri: str | None = None,
    *,
    revision: str = "",
    args_from: Config | None = None,
) -> dict[str, Any]:
    """The Serve config-file dict (``serve deploy``, RayService ``serveConfigV2``).

    ``args_from``: the config the running application was deployed with. Serve replaces the
    replicas when ``args`` change (they are part of its code version) and reconfigures them in
    place when only ``user_config`` does, so an update of settings keeps the first ``args``.
    """
    return serve_file(
        config,
        IMPORT_PATH,
        app_args(args_from or config, model_uri),
        deployments=[deployment_options(config, model_uri, revision)],
    )


def serve_file(
    config: Config, import_path: str, args: dict[str, Any], deployments: list[dict] | None = None
) -> dict[str, Any]:
    """A Serve config file holding one application: ``import_path`` called with ``args``
    (``deployments``: per-deployment options, when there are any to set)."""
    s = config.serve
    application: dict[str, Any] = {
        "name": s.app_name,
        "route_prefix": s.route_prefix,
        "import_path": import_path,
        "args": args,
    }
    if deployments is not None:
        application["deployments"] = deployments
    return {
        "proxy_location": str(s.proxy_location),  # a file: the choice as its plain string
        "http_options": {"host": s.host, "port": int(s.port)},
        "applications": [application],
    }
