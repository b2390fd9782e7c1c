"""One serving replica without Ray Serve: config, model store, engine loop, metrics, readiness.

The Serve deployment (:mod:`serving.app`) wraps one :class:`Replica` per replica actor and the
benchmark (``tests/benchmarks/bench_serve.py``) drives the same class in process, so both run the
same request path. A replica is *alive* at once and *ready* when its model is loaded from the
MLflow registry and warmed up (``/healthz`` vs ``/readyz``, as KServe probes).

Settings change in place: :meth:`Replica.reconfigure` takes Serve's ``user_config`` (the ``serve``
and ``registry`` sections), loads what changed (a new version, new engine sizes) beside the serving
version and switches once it is warm; request limits apply to the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from typing import Any

import mlflow
import torch

from components.config import Config, config_from_dict, to_container
from serving.engine import Engine, EngineSettings, GenerationParams
from serving.engine_loop import EngineLoop
from serving.metrics import ServeMetrics
from serving.middleware import token_from_env
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


def make_engine(
    loaded, quantize: str, label: str, settings: EngineSettings, device: str = "cpu"
) -> Engine:
    """An engine for a freshly loaded version, warmed up: the first forwards allocate and pick
    kernels, at one sequence and at a full batch, for prefill and decode."""
    engine = Engine(
        inference_model(loaded.model, quantize, device), loaded.tokenizer, settings, label
    )
    prompt = engine.encode("def ") or [engine.eos_id]
    warm = GenerationParams(max_tokens=WARMUP_TOKENS, ignore_eos=True)
    engine.run_to_completion([engine.sequence(prompt, warm)])
    engine.run_to_completion([engine.sequence(prompt, warm) for _ in range(engine.slots)])
    return engine


def device_for(serve_cfg) -> str:
    return "cuda" if serve_cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def with_user_config(config: Config, user_config: dict[str, Any]) -> Config:
    """``config`` with Serve's ``user_config`` sections (``serve``, ``registry``) applied on top.

    Raises on a malformed ``user_config``, so a ``serve deploy`` of a bad file fails loudly."""
    container = to_container(config)
    for section in ("serve", "registry"):
        container[section] = {**container[section], **user_config.get(section, {})}
    return config_from_dict(container)


def settings_digest(user_config: dict[str, Any]) -> str:
    """A short digest of a ``user_config``: ``/readyz`` reports the one a replica serves, so a
    deployer can wait until an in-place update has reached it."""
    return hashlib.sha256(json.dumps(user_config, sort_keys=True).encode()).hexdigest()[:16]


class Replica:
    """The state one replica's HTTP routes read (:func:`serving.api.build_asgi_app`).

    Create it inside a running event loop, then ``await start()``.
    """

    def __init__(self, config: Config, replica_id: str, *, ray_metrics: bool = False):
        self.config = config
        self.replica_id = replica_id
        tracking_uri = config.tracking.uri
        # A replica is its own process: it must point MLflow at the store itself.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.metrics = ServeMetrics(ray_enabled=ray_metrics)
        self.metrics.set_ready(False)
        self.ready_at: float | None = None  # wall clock of the first successful warm-up
        self.first_request_at: float | None = None  # wall clock of the first HTTP request
        self.engine_loop = EngineLoop(
            asyncio.get_running_loop(), config.serve.max_queued_sequences, self.metrics
        )
        self.device = device_for(config.serve)
        self.store = ModelStore(tracking_uri, self._make_engine, device=self.device)
        self.auth_token = token_from_env(config.serve.auth_token_env)
        self._desired: tuple[ModelSettings, EngineSettings, str] | None = None
        self._applied: tuple[ModelSettings, EngineSettings, str] | None = None
        self._wake = asyncio.Event()
        self._switched = asyncio.Event()
        self._attempted = asyncio.Event()
        self._loader: asyncio.Task | None = None
        # digest of the user_config being applied / fully applied (limits set, models warm)
        self._pending_settings: str | None = None
        self.settings: str | None = None

    async def start(self) -> None:
        """Start loading; returns after the first attempt (loaded, or unready and retrying)."""
        torch.set_num_threads(max(1, int(self.config.serve.num_cpus)))
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loader = asyncio.get_running_loop().create_task(self._load_forever())
        self.apply(self.config, revision="")
        await self._attempted.wait()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply Serve's ``user_config``; a version switch returns once the new version serves."""
        config = with_user_config(self.config, user_config)
        self._pending_settings = settings_digest(user_config)
        was_ready = self.ready
        self.apply(config, revision=str(user_config.get("revision", "")))
        if was_ready:
            try:
                await asyncio.wait_for(self._switched.wait(), timeout=SWITCH_WAIT_S)
            except TimeoutError:
                log.warning(
                    "model switch still in progress after %.0fs; old version keeps serving",
                    SWITCH_WAIT_S,
                )

    def apply(self, config: Config, revision: str) -> None:
        """Make ``config`` current: limits at once, models and engines through the loader."""
        self.config = config
        self.engine_loop.max_queued = config.serve.max_queued_sequences
        desired = (
            ModelSettings.from_config(config),
            EngineSettings.from_serve(config.serve),
            revision,
        )
        self._desired = desired
        if desired == self._applied:
            self._switch_done()  # only request limits changed: nothing to load
            return
        self._switched.clear()
        self._wake.set()

    def _switch_done(self) -> None:
        self.settings = self._pending_settings
        self._switched.set()

    def _make_engine(self, loaded, quantize: str, label: str, settings: EngineSettings) -> Engine:
        return make_engine(loaded, quantize, label, settings, self.device)

    async def _load_forever(self) -> None:
        """Keep the served versions equal to the desired settings; retry while the registry is not
        ready."""
        while True:
            self._wake.clear()  # before reading, so a reconfigure during a load is never missed
            desired = self._desired
            if desired is None or desired == self._applied:
                await self._wake.wait()
                continue
            models, engine_settings, _ = desired
            try:
                await asyncio.to_thread(self.store.apply, models, engine_settings)
            except Exception as err:  # registry not reachable, alias not set yet, bad artifact ...
                self.store.last_error = f"{type(err).__name__}: {err}"
                retry_s = max(0.1, float(self.config.serve.load_retry_s))
                log.warning(
                    "cannot load %s yet (retrying in %.1fs): %s",
                    models.model_uri,
                    retry_s,
                    self.store.last_error,
                )
                self._attempted.set()
                await asyncio.sleep(retry_s)
                continue
            self._applied = desired
            if self.ready_at is None:
                self.ready_at = time.time()
            self.metrics.set_ready(True)
            if desired is self._desired:
                self._switch_done()
            self._attempted.set()

    def check_health(self) -> None:
        """Alive unless the loader itself died; an unloaded model is *unready*, not unhealthy."""
        if self._loader is not None and self._loader.done():
            error = None if self._loader.cancelled() else self._loader.exception()
            raise RuntimeError(f"model loader stopped: {error!r}")

    def close(self) -> None:
        self.engine_loop.close()
        if self._loader is not None:
            self._loader.cancel()

    @property
    def ready(self) -> bool:
        return self.store.ready

    def not_ready_reason(self) -> str:
        uri = self._desired[0].model_uri if self._desired else "(no model_uri)"
        return f"loading {uri}" + (f": {self.store.last_error}" if self.store.last_error else "")
