"""Prometheus metrics of one replica, labelled by model version.

A private registry per replica (not the process-global default) keeps the text served
on ``GET /metrics`` to moeops' own series. With several replicas each scrape reaches one
of them; Prometheus sums across scrapes by the ``replica`` label.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self, replica: str = ""):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"replica": replica} if replica else {}
        common = list(labels)
        self._const = labels
        self.requests = Counter("moeops_requests", "HTTP requests by route, status and model version",
                                ["route", "status", "model_version", *common], registry=self.registry)
        self.latency = Histogram("moeops_request_latency_seconds", "End-to-end request latency in the replica",
                                 ["route", "model_version", *common], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_size = Histogram("moeops_batch_size", "Sequences decoded together in one batch",
                                    ["model_version", *common], buckets=BATCH_BUCKETS, registry=self.registry)
        self.tokens = Counter("moeops_generated_tokens", "Generated tokens",
                              ["model_version", *common], registry=self.registry)
        self.tokens_per_s = Gauge("moeops_tokens_per_second", "Generated tokens per second of the last batch",
                                  ["model_version", *common], registry=self.registry)
        self.ready = Gauge("moeops_ready", "1 when the replica has a loaded, warmed-up model",
                           common, registry=self.registry)

    def observe_request(self, route: str, status: int, version: str, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status), model_version=version, **self._const).inc()
        self.latency.labels(route=route, model_version=version, **self._const).observe(seconds)

    def count_error(self, route: str, status: int) -> None:
        """A rejected request: counted, but kept out of the latency histogram (no model ran)."""
        self.requests.labels(route=route, status=str(status), model_version="none", **self._const).inc()

    def observe_batch(self, version: str, size: int, new_tokens: int, seconds: float) -> None:
        self.batch_size.labels(model_version=version, **self._const).observe(size)
        self.tokens.labels(model_version=version, **self._const).inc(new_tokens)
        if seconds > 0:
            self.tokens_per_s.labels(model_version=version, **self._const).set(new_tokens / seconds)

    def set_ready(self, ready: bool) -> None:
        (self.ready.labels(**self._const) if self._const else self.ready).set(1 if ready else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
