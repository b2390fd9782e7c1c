"""The Ray Serve application: one FastAPI-ingress deployment that loads, batches and decodes.

    serve run serving.app:build_app          # args from the CLI / a config file's ``args``
    serve deploy serve_config.yaml           # written by the deploy stage (serving/deploy_config.py)

A replica comes up *alive* at once and becomes *ready* when its model is loaded from the
MLflow registry and a warm-up generation has run (``/healthz`` vs ``/readyz``, as KServe
probes). ``user_config`` (model URI, canary share, batching, quantisation) changes in place:
the new version loads beside the serving one and takes over only when warm.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import mlflow
import torch
from ray import serve
from ray.serve import Application

from components.config import Config, config_from_dict
from serving.auth import token_from_env
from serving.deploy_config import DEPLOYMENT_NAME, deployment_options, user_config
from serving.generation import Engine, SamplingParams, StepOutput
from serving.metrics import ServeMetrics
from serving.model_store import ModelSettings, ModelStore, ServedModel
from serving.scheduler import DecodeScheduler

log = logging.getLogger("moeops.serving")

WARMUP_TOKENS = 4
# A switch (reconfigure) waits at most this long for the new version before returning;
# the replica keeps serving the old one meanwhile and finishes the switch in the background.
SWITCH_WAIT_S = 120.0
# batches @serve.batch may hand to the decode loop at once; the loop coalesces them (serving/scheduler.py)
MAX_CONCURRENT_INTAKE = 4


@dataclass
class DecodeJob:
    """One prompt queued for the batcher, with the version chosen for its request."""

    served: ServedModel
    prompt_ids: list[int]
    params: SamplingParams


def make_engine(loaded, quantize: str) -> Engine:
    """Engine for a freshly loaded version, warmed up (first forward allocates and initialises kernels)."""
    engine = Engine(loaded, quantize)
    prompt = engine.tokenizer.decode(engine.encode("def ")) or "def "
    engine.generate(prompt, SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0))
    return engine


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CompletionServer:
    async def __init__(self, args: dict[str, Any]):
        self.config: Config = config_from_dict(args)
        tracking_uri = self.config.tracking.uri
        # The replica is its own process: it must point MLflow at the store itself.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        torch.set_num_threads(max(1, int(self.config.serve.num_cpus)))
        context = serve.get_replica_context()
        self.replica_id = str(getattr(context, "replica_tag", "") or "")
        self.metrics = ServeMetrics(replica=self.replica_id)
        self.metrics.set_ready(False)
        self.store = ModelStore(tracking_uri, make_engine)
        self.scheduler = DecodeScheduler(
            self.config.serve.max_batch_size,
            on_batch=lambda served, size, tokens, seconds: self.metrics.observe_batch(
                served.fingerprint, size, tokens, seconds))
        self.auth_token = token_from_env(self.config.serve.auth_token_env)
        self._desired: Optional[ModelSettings] = None
        self._applied: Optional[ModelSettings] = None
        self._applied_revision: Optional[str] = None
        self._revision = ""
        self._wake = asyncio.Event()
        self._switched = asyncio.Event()
        self._attempted = asyncio.Event()
        self._loader = asyncio.get_running_loop().create_task(self._load_forever())
        self._apply_user_config(user_config(self.config, self.config.serve.model_uri or None))
        # Serve routes traffic to a replica once its constructor returns, so the first load is
        # awaited here: in a rolling update the new replica takes requests only when warm. If the
        # model cannot be loaded yet (no alias), the replica starts anyway, alive but unready,
        # and keeps retrying in the background.
        await self._attempted.wait()

    # ------------------------------------------------------------------ lifecycle
    def __serve_build_asgi_app__(self):
        from serving.api import build_asgi_app

        return build_asgi_app(self)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this with ``user_config`` at start and whenever it changes."""
        was_ready = self.store.ready
        self._apply_user_config(config)
        if was_ready:
            # A version switch: give the caller (serve.run / serve deploy) the new version when it returns.
            try:
                await asyncio.wait_for(self._switched.wait(), timeout=SWITCH_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("model switch still in progress after %.0fs; old version keeps serving", SWITCH_WAIT_S)

    def _apply_user_config(self, config: dict[str, Any]) -> None:
        settings = ModelSettings.from_user_config(config)  # raises on a malformed user_config: deploy fails loudly
        max_batch_size = int(config.get("max_batch_size", self.config.serve.max_batch_size))
        self._decode_batch.set_max_batch_size(max_batch_size)
        self.scheduler.max_batch_size = max_batch_size
        self._decode_batch.set_batch_wait_timeout_s(
            float(config.get("batch_wait_timeout_s", self.config.serve.batch_wait_timeout_s)))
        self._desired, self._revision = settings, str(config.get("revision", ""))
        if settings == self._applied and self._revision == self._applied_revision:
            self._switched.set()  # only batching changed: nothing to load
            return
        self._switched.clear()
        self._wake.set()

    async def _load_forever(self) -> None:
        """Keep the served versions equal to the desired settings; retry while the registry is not ready."""
        retry_s = max(0.1, float(self.config.serve.load_retry_s))
        while True:
            self._wake.clear()  # cleared before reading, so a reconfigure during a load is never missed
            desired, revision = self._desired, self._revision
            if desired is not None and (desired != self._applied or revision != self._applied_revision):
                try:
                    await asyncio.to_thread(self.store.apply, desired)
                    self._applied, self._applied_revision = desired, revision
                    self.metrics.set_ready(True)
                    if desired is self._desired:
                        self._switched.set()
                except Exception as err:  # registry not reachable, alias not set yet, bad artifact ...
                    self.store.last_error = f"{type(err).__name__}: {err}"
                    log.warning("cannot load %s yet (retrying in %.1fs): %s", desired.model_uri, retry_s,
                                self.store.last_error)
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

    # ------------------------------------------------------------------ state for the API
    @property
    def ready(self) -> bool:
        return self.store.ready

    def not_ready_reason(self) -> str:
        uri = self._desired.model_uri if self._desired else "(no model_uri)"
        return f"loading {uri}" + (f": {self.store.last_error}" if self.store.last_error else "")

    # ------------------------------------------------------------------ generation
    async def generate(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[StepOutput]:
        """Outputs for one prompt, as the batcher produces them; ends with a ``finished`` output."""
        async for out in self._decode_batch(DecodeJob(served, prompt_ids, params)):
            yield out
            if out.finished:
                return

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_INTAKE)
    async def _decode_batch(self, jobs: list[DecodeJob]):
        """Hand the batch to the replica's decode loop; per step yield one output (or StopIteration) per job."""
        queues = self.scheduler.submit(jobs)
        finished = [False] * len(jobs)
        while not all(finished):
            results: list[Any] = []
            for i, queue in enumerate(queues):
                if finished[i]:
                    results.append(StopIteration)
                    continue
                out = await queue.get()  # the jobs of one batch decode in lockstep
                if isinstance(out, Exception):
                    raise out
                finished[i] = out.finished
                results.append(out)
            yield results

    async def score(self, served: ServedModel, token_ids: list[int]):
        return await asyncio.to_thread(served.engine.score, token_ids)


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


def make_application(config: Config, model_uri: Optional[str] = None, revision: str = "") -> Application:
    """The bound application with the same deployment options the Serve config file carries."""
    from serving.deploy_config import app_args

    options = deployment_options(config, model_uri, revision)
    options.pop("name")
    token_env = config.serve.auth_token_env
    if token_from_env(token_env):
        # The token reaches replicas as an env var of their runtime env, never through a config file.
        options["ray_actor_options"] = {**options["ray_actor_options"],
                                        "runtime_env": {"env_vars": {token_env: os.environ[token_env]}}}
    deployment = CompletionServer.options(**options)
    # A stable code version makes a redeploy that only changes user_config a lightweight update
    # (reconfigure in place, no replica restart), as `serve deploy` does for config files; without
    # it every serve.run would roll the replicas. Serve reserves `version` for itself, hence _internal.
    deployment = deployment.options(_internal=True, version=code_version())
    return deployment.bind(app_args(config, model_uri))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the code a replica runs (serving/ and components/), taken once per process."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("serving", "components"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
