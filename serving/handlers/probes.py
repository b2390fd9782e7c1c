"""``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics`` of one replica."""

from __future__ import annotations

import os

from fastapi.responses import Response

from serving.handlers.common import json_response
from serving.metrics import CONTENT_TYPE_LATEST
from serving.schemas import HealthResponse, NotReadyResponse, ReadyResponse


def health(replica) -> HealthResponse:
    """The replica process answers, whether or not its model is loaded yet."""
    return HealthResponse(
        replica=replica.replica_id,
        pid=os.getpid(),
        ready_at=replica.ready_at,
        first_request_at=replica.first_request_at,
    )


def readiness(replica) -> Response:
    """200 with the served versions once a model is loaded and warmed up; 503 until then."""
    if not replica.ready:
        not_ready = NotReadyResponse(reason=replica.not_ready_reason())
        return Response(not_ready.model_dump_json(), status_code=503, media_type="application/json")
    cards = replica.store.cards()
    return json_response(
        ReadyResponse(
            model=cards[0][1].fingerprint,
            replica=replica.replica_id,
            versions={card_id: served.version for card_id, served, _ in cards},
            queued_sequences=replica.engine_loop.queued,
            last_error=replica.store.last_error or None,
            settings=replica.settings,
        )
    )


def metrics(replica) -> Response:
    """Prometheus text format of this replica (a cluster scrapes Ray's metrics agent instead)."""
    return Response(replica.metrics.render(), media_type=CONTENT_TYPE_LATEST)
