"""A replica's metrics, recorded twice: through ``ray.serve.metrics`` and a local Prometheus
registry.

``ray.serve.metrics`` (Counter / Gauge / Histogram) is what a cluster's Prometheus sees: Ray's
metrics agent on every node exports every replica's series, tagged with ``application``,
``deployment`` and ``replica`` by Serve (exported with Ray's ``ray_`` prefix, e.g.
``ray_moeops_requests_total``). The private ``prometheus_client`` registry backs ``GET /metrics``
for a local run without a Prometheus (one scrape reaches one replica).

Series (all but errors and readiness labelled by ``model_version``, the served
``<name>/<version>``):
requests by route/status, errors by route/status/code, request latency, time to first token,
inter-token latency, generated tokens, tokens/s, queue depth (sequences waiting for a KV slot),
running sequences, readiness.

The engine-side series are recorded from the engine-loop thread between decode steps, while it
holds the GIL: gauges are recorded only when their value changes, so an idle or steady replica
pays nothing per step for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the app)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
TOKENS_PER_S_WINDOW_S = 1.0


class _Series:
    """One metric in both backends; ``kind`` is counter | gauge | histogram."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ray_enabled: bool,
        kind: str,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...] | None = None,
    ):
        self.kind, self.labels = kind, labels
        local = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
        extra = {"buckets": buckets} if buckets else {}
        self.local = local(name, doc, list(labels), registry=registry, **extra)
        self.cluster = None
        if ray_enabled:
            from ray.serve import metrics as serve_metrics

            cls = {
                "counter": serve_metrics.Counter,
                "gauge": serve_metrics.Gauge,
                "histogram": serve_metrics.Histogram,
            }[kind]
            extra = {"boundaries": list(buckets)} if buckets else {}
            self.cluster = cls(name, description=doc, tag_keys=labels, **extra)

    def record(self, value: float, **tags: str) -> None:
        local = self.local.labels(**tags) if self.labels else self.local
        if self.kind == "counter":
            local.inc(value)
        elif self.kind == "gauge":
            local.set(value)
        else:
            local.observe(value)
        if self.cluster is not None:
            tags = tags or None
            if self.kind == "counter":
                self.cluster.inc(value, tags=tags)
            elif self.kind == "gauge":
                self.cluster.set(value, tags=tags)
            else:
                self.cluster.observe(value, tags=tags)


class ServeMetrics:
    def __init__(self, ray_enabled: bool = False):
        """``ray_enabled``: also record through ``ray.serve.metrics`` (inside a Serve replica)."""
        self.registry = CollectorRegistry(auto_describe=True)

        def series(kind, name, doc, labels=(), buckets=None):
            return _Series(self.registry, ray_enabled, kind, name, doc, tuple(labels), buckets)

        self.requests = series(
            "counter",
            "moeops_requests",
            "HTTP requests by route, status and model version",
            ("route", "status", "model_version"),
        )
        self.errors = series(
            "counter",
            "moeops_errors",
            "Failed or rejected requests by route, status and error code",
            ("route", "status", "code"),
        )
        self.latency = series(
            "histogram",
            "moeops_request_latency_seconds",
            "Request latency in the replica",
            ("route", "model_version"),
            LATENCY_BUCKETS,
        )
        self.ttft = series(
            "histogram",
            "moeops_time_to_first_token_seconds",
            "From a sequence's arrival to its first generated token",
            ("model_version",),
            LATENCY_BUCKETS,
        )
        self.itl = series(
            "histogram",
            "moeops_inter_token_latency_seconds",
            "Time between two decode steps (each running sequence gets one token per step)",
            ("model_version",),
            TOKEN_BUCKETS,
        )
        self.tokens = series(
            "counter", "moeops_generated_tokens", "Generated tokens", ("model_version",)
        )
        self.tokens_per_s = series(
            "gauge",
            "moeops_tokens_per_second",
            "Generated tokens per second over the last second of decoding",
            ("model_version",),
        )
        self.queue_depth = series(
            "gauge",
            "moeops_queue_depth",
            "Sequences waiting for a KV-cache slot",
            ("model_version",),
        )
        self.running = series(
            "gauge",
            "moeops_running_sequences",
            "Sequences decoding (holding a KV slot)",
            ("model_version",),
        )
        self.ready = series(
            "gauge", "moeops_ready", "1 when the replica has a loaded, warmed-up model"
        )
        self._window: dict[str, tuple[float, int]] = {}
        self._queue: dict[str, tuple[int, int]] = {}  # last recorded (waiting, running) per version

    # ------------------------------------------------------------------ request side (event loop)
    def observe_request(self, route: str, status: int, version: str, seconds: float) -> None:
        self.requests.record(1, route=route, status=str(status), model_version=version)
        self.latency.record(seconds, route=route, model_version=version)

    def count_error(self, route: str, status: int, code: str = "", version: str = "none") -> None:
        """A rejected or failed request: counted, kept out of the latency histogram."""
        self.requests.record(1, route=route, status=str(status), model_version=version)
        self.errors.record(1, route=route, status=str(status), code=code or "error")

    def set_ready(self, ready: bool) -> None:
        self.ready.record(1 if ready else 0)

    # ------------------------------------------------------------------ engine side (engine-loop
    # thread)
    def observe_step(
        self,
        version: str,
        outputs: Iterable[tuple[Any, Any]],
        gap_s: float,
        running: int,
        now: float,
    ) -> None:
        new_tokens = 0
        for seq, out in outputs:
            if isinstance(out, BaseException):
                continue
            new_tokens += len(out.token_ids)
            if seq.first_token_at is not None and not getattr(seq, "ttft_recorded", False):
                seq.ttft_recorded = True
                self.ttft.record(seq.first_token_at - seq.arrived, model_version=version)
        if not new_tokens:
            return
        self.itl.record(gap_s, model_version=version)
        self.tokens.record(new_tokens, model_version=version)
        started, count = self._window.get(version, (now, 0))
        count += new_tokens
        if now - started >= TOKENS_PER_S_WINDOW_S:
            self.tokens_per_s.record(count / (now - started), model_version=version)
            started, count = now, 0
        self._window[version] = (started, count)

    def set_queue(self, per_version: dict[str, tuple[int, int]]) -> None:
        """(waiting, running) sequences per model version; a version missing from ``per_version``
        has none."""
        for version in self._queue.keys() - per_version.keys():
            per_version = {**per_version, version: (0, 0)}
        for version, (waiting, running) in per_version.items():
            last = self._queue.get(version)
            if last is None or last[0] != waiting:
                self.queue_depth.record(waiting, model_version=version)
            if last is None or last[1] != running:
                self.running.record(running, model_version=version)
            self._queue[version] = (waiting, running)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
