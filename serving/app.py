"""The Ray Serve application: one FastAPI-ingress deployment that loads and decodes with continuous
batching.

    serve run serving.app:build_app          # args from the CLI / a config file's ``args``
    serve deploy serve_config.yaml           # written by the deploy stage
    (serving/deploy_config.py)

A replica comes up *alive* at once and becomes *ready* when its model is loaded from the MLflow
registry and warmed up (``/healthz`` vs ``/readyz``, as KServe probes). Serve routes requests to a
replica only once its constructor has returned, and the constructor waits for the first load: a
new replica (scale-up, rolling update) takes no traffic before it is warm.

Every replica rebuilds the typed :class:`components.config.Config` from the plain container it
is given and applies ``user_config`` (the ``serve`` and ``registry`` sections) on top; the model
version, canary share, quantisation and engine sizes come from those typed sections.
``reconfigure`` (a ``serve deploy`` of an edited ``user_config``) loads a new version beside the
serving one and switches when it is warm; a ``serve.run`` redeploy from Python is a rolling update.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import sys
import time
from typing import Any

import mlflow
import torch
from ray import serve
from ray.serve import Application

from components.config import Config, config_from_dict
from serving.auth import token_from_env
from serving.deploy_config import DEPLOYMENT_NAME, deployment_options
from serving.engine import Engine, GenerationParams
from serving.engine_loop import EngineLoop
from serving.metrics import ServeMetrics
from serving.model_store import ModelSettings, ModelStore

log = logging.getLogger("moeops.serving")

WARMUP_TOKENS = 4
# A switch (reconfigure) waits at most this long for the new version before returning;
# the replica keeps serving the old one meanwhile and finishes the switch in the background.
SWITCH_WAIT_S = 120.0
# The engine thread and the event loop share the GIL: a short switch interval keeps the event
# loop (HTTP, output delivery) from waiting behind a decode step's Python work for 5 ms.
GIL_SWITCH_INTERVAL_S = 0.001


def inference_model(model: torch.nn.Module, quantize: str, device: str) -> torch.nn.Module:
    """The one place a served model is prepared for inference: moved to its device, quantised if
    asked."""
    from components.model.quantize import quantize_for_inference

    # "auto" quantises only where int8 measured faster (components.model.quantize.int8_pays)
    served, applied = quantize_for_inference(model.to(device).eval(), quantize, device)
    log.info("serving %s weights (serve.quantize=%s)", applied, quantize)
    return served


def make_engine(loaded, quantize: str, label: str, serve_cfg, device: str = "cpu") -> Engine:
    """An engine for a freshly loaded version, warmed up: the first forwards allocate and pick
    kernels,
    at one sequence and at a full batch, for prefill and decode."""
    engine = Engine(
        inference_model(loaded.model, quantize, device), loaded.tokenizer, serve_cfg, label
    )
    prompt = engine.encode("def ") or [engine.eos_id]
    warm = GenerationParams(max_tokens=WARMUP_TOKENS, ignore_eos=True)
    engine.run_to_completion([engine.sequence(prompt, warm)])
    engine.run_to_completion([engine.sequence(prompt, warm) for _ in range(engine.slots)])
    return engine


def device_for(serve_cfg) -> str:
    return "cuda" if serve_cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CompletionServer:
    async def __init__(self, args: dict[str, Any]):
        self._base = copy.deepcopy(dict(args))  # the plain container; user_config applies on top
        self.config: Config = config_from_dict(self._base)
        tracking_uri = self.config.tracking.uri
        # The replica is its own process: it must point MLflow at the store itself.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        torch.set_num_threads(max(1, int(self.config.serve.num_cpus)))
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        context = serve.get_replica_context()
        self.replica_id = str(context.replica_tag)
        self.metrics = ServeMetrics(ray_enabled=True)
        self.metrics.set_ready(False)
        self.ready_at: float | None = None  # wall clock of the first successful warm-up
        self.first_request_at: float | None = None  # wall clock of the first HTTP request
        self.engine_loop = EngineLoop(
            asyncio.get_running_loop(), self.config.serve.max_queued_sequences, self.metrics
        )
        self.store = ModelStore(
            tracking_uri, self._make_engine, device=device_for(self.config.serve)
        )
        self.auth_token = token_from_env(self.config.serve.auth_token_env)
        self._desired: tuple | None = None
        self._applied: tuple | None = None
        self._wake = asyncio.Event()
        self._switched = asyncio.Event()
        self._attempted = asyncio.Event()
        self._loader = asyncio.get_running_loop().create_task(self._load_forever())
        self._apply(self.config, revision="")
        # Serve routes traffic to a replica once its constructor returns, so the first load is
        # awaited here: a new replica takes requests only when warm. If the model cannot be loaded
        # yet (no alias), the replica starts anyway, alive but unready, and keeps retrying.
        await self._attempted.wait()

    # ------------------------------------------------------------------ lifecycle
    def __serve_build_asgi_app__(self):
        from serving.api import build_asgi_app

        return build_asgi_app(self)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with ``user_config`` at start and whenever it changes (in place)."""
        container = copy.deepcopy(self._base)
        for section in ("serve", "registry"):
            container[section] = {**container.get(section, {}), **user_config.get(section, {})}
        config = config_from_dict(
            container
        )  # raises on a malformed user_config: the deploy fails loudly
        was_ready = self.store.ready
        self._apply(config, revision=str(user_config.get("revision", "")))
        if was_ready:
            # A version switch: give the caller (serve deploy) the new version when it returns.
            try:
                await asyncio.wait_for(self._switched.wait(), timeout=SWITCH_WAIT_S)
            except TimeoutError:
                log.warning(
                    "model switch still in progress after %.0fs; old version keeps serving",
                    SWITCH_WAIT_S,
                )

    def _apply(self, config: Config, revision: str) -> None:
        self.config = config
        s = config.serve
        self.engine_loop.max_queued = s.max_queued_sequences
        # what the engines are built from: a change loads (and warms) new ones
        desired = (
            ModelSettings.from_config(config),
            s.max_num_seqs,
            s.max_num_batched_tokens,
            revision,
        )
        self._desired = desired
        if desired == self._applied:
            self._switched.set()  # only request limits changed: nothing to load
            return
        self._switched.clear()
        self._wake.set()

    def _make_engine(self, loaded, quantize: str, label: str) -> Engine:
        return make_engine(
            loaded, quantize, label, self.config.serve, device_for(self.config.serve)
        )

    async def _load_forever(self) -> None:
        """Keep the served versions equal to the desired settings; retry while the registry is not
        ready."""
        while True:
            self._wake.clear()  # cleared before reading, so a reconfigure during a load is never missed
            desired = self._desired
            if desired is not None and desired != self._applied:
                settings = desired[0]
                try:
                    await asyncio.to_thread(self.store.apply, settings, desired[1:3])
                    self._applied = desired
                    if self.ready_at is None:
                        self.ready_at = time.time()
                    self.metrics.set_ready(True)
                    if desired is self._desired:
                        self._switched.set()
                except (
                    Exception
                ) as err:  # registry not reachable, alias not set yet, bad artifact ...
                    self.store.last_error = f"{type(err).__name__}: {err}"
                    retry_s = max(0.1, float(self.config.serve.load_retry_s))
                    log.warning(
                        "cannot load %s yet (retrying in %.1fs): %s",
                        settings.model_uri,
                        retry_s,
                        self.store.last_error,
                    )
                    self._attempted.set()
                    await asyncio.sleep(retry_s)
                    continue
                self._attempted.set()
                continue
            await self._wake.wait()

    def check_health(self) -> None:
        """Alive unless the loader itself died; an unloaded model is *unready*, not unhealthy."""
        if self._loader.done():
            error = None if self._loader.cancelled() else self._loader.exception()
            raise RuntimeError(f"model loader stopped: {error!r}")

    def __del__(self):
        loop = getattr(self, "engine_loop", None)
        if loop is not None:
            loop.close()

    # ------------------------------------------------------------------ state for the API
    @property
    def ready(self) -> bool:
        return self.store.ready

    def not_ready_reason(self) -> str:
        uri = self._desired[0].model_uri if self._desired else "(no model_uri)"
        return f"loading {uri}" + (f": {self.store.last_error}" if self.store.last_error else "")


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder.

    ``args`` is either the plain config container (a Serve config file written by the deploy
    stage, a RayService) or, from the command line, Hydra overrides as ``key=value`` pairs:
    ``serve run serving.app:build_app experiment=tiny tracking.uri=sqlite:////abs/mlflow.db``.
    """
    if isinstance(args.get("serve"), dict):
        config = config_from_dict(dict(args))
    else:
        from components.config import load_config

        config = load_config([f"{key}={value}" for key, value in args.items()])
    return make_application(config, model_uri=config.serve.model_uri or None)


def make_application(
    config: Config, model_uri: str | None = None, revision: str = ""
) -> Application:
    """The bound application with the same deployment options the Serve config file carries."""
    from serving.deploy_config import app_args

    options = deployment_options(config, model_uri, revision)
    options.pop("name")
    token_env = config.serve.auth_token_env
    if token_from_env(token_env):
        # The token reaches replicas as an env var of their runtime env, never through a config
        # file.
        options["ray_actor_options"] = {
            **options["ray_actor_options"],
            "runtime_env": {"env_vars": {token_env: os.environ[token_env]}},
        }
    deployment = CompletionServer.options(**options)
    # serve.run from Python gives the deployment a new version on every call, so a redeploy (new
    # user_config included) is a rolling update: replacements start beside the serving replicas
    # (serve.max_surge_percent) and take traffic only once their model is loaded and warm. Pinning
    # the version would make it an in-place reconfigure, but Serve offers that from Python only
    # through a private flag; `serve deploy` of the config file (deploy_config.serve_config) updates
    # user_config in place through the public path.
    return deployment.bind(app_args(config, model_uri))
