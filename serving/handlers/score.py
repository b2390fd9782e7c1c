"""``POST /v1/score``: the log-probability of every token of a text given the ones before it."""

from __future__ import annotations

import math

from fastapi.responses import Response

from serving.handlers.common import headers_for, json_response, served_for, usage
from serving.handlers.plan import check_score_text
from serving.metrics import Timer
from serving.schemas import ScoreRequest, ScoreResponse

ROUTE = "/v1/score"


async def create_score(replica, body: ScoreRequest) -> Response:
    timer = Timer()
    served = served_for(replica, body.model)
    engine = served.engine
    token_ids = engine.encode(body.text)
    check_score_text(token_ids, replica.config.serve, engine)
    values = await replica.engine_loop.call(engine, lambda e: e.score(token_ids))
    total = float(sum(values))
    response = ScoreResponse(
        model=served.name,
        model_version=served.version,
        tokens=[engine.tokenizer.decode([t]) for t in token_ids],
        token_ids=token_ids,
        token_logprobs=[None, *values],
        total_logprob=total,
        perplexity=math.exp(-total / len(values)),
        usage=usage(len(token_ids), 0),
    )
    replica.metrics.observe_request(ROUTE, 200, served.fingerprint, timer.seconds)
    return json_response(response, headers_for(replica, served))
