"""HTTP routes of a replica (FastAPI): OpenAI-style completions, scoring, models, probes, metrics.

Built per replica by ``CompletionServer.__serve_build_asgi_app__`` so the middleware
(auth, body limits) gets that deployment's settings.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.auth import BearerAuthMiddleware
from serving.body_guard import BodyGuardMiddleware
from serving.errors import APIError, error_body, install_error_handlers
from serving.generation import SamplingParams, StepOutput
from serving.limits import check_completion, check_score_text
from serving.metrics import CONTENT_TYPE_LATEST, Timer
from serving.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    Usage,
)

VERSION_HEADER = "x-moeops-model-version"
MIN_TEMPERATURE = 1e-4
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}


def build_asgi_app(server) -> FastAPI:
    """``server``: the CompletionServer replica (store, metrics, generate, score, config)."""
    serve_cfg = server.config.serve
    app = FastAPI(title="moeops", version="1", description="OpenAI-compatible completions from the "
                  "MLflow-registered MoE model (champion, optional challenger canary).")

    def count_error(request: Request, status: int) -> None:
        # the route template, not the raw path: arbitrary 404 paths must not grow label sets
        route = getattr(request.scope.get("route"), "path", "unmatched")
        server.metrics.count_error(route, status)

    install_error_handlers(app, on_error=count_error)

    def served_for(model: Optional[str]):
        if not server.ready:
            raise APIError(503, f"model not ready: {server.not_ready_reason()}", type="service_unavailable",
                           code="not_ready", headers={"retry-after": "2"})
        try:
            return server.store.choose(model)
        except KeyError:
            available = [card_id for card_id, _, _ in server.store.cards()]
            raise APIError(404, f"model {model!r} is not served here; available: {available}",
                           type="not_found_error", param="model", code="model_not_found") from None

    def record(route: str, status: int, version: str, timer: Timer) -> None:
        server.metrics.observe_request(route, status, version, timer.seconds)

    # ------------------------------------------------------------------ probes and metadata
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the replica process answers (whether or not its model is loaded yet)."""
        return {"status": "alive", "replica": server.replica_id}

    @app.get("/readyz", tags=["probes"], responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Readiness: a model is loaded and warmed up (503 until then)."""
        if not server.ready:
            return JSONResponse({"ready": False, "reason": server.not_ready_reason()}, status_code=503)
        cards = server.store.cards()
        return {"ready": True, "model": cards[0][1].fingerprint,
                "versions": {card_id: served.version for card_id, served, _ in cards},
                "last_error": server.store.last_error or None}

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text format: requests, latency, batch size, tokens/s per model version."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models() -> ModelList:
        cards = [ModelCard(id=card_id, created=int(time.time()), version=served.version,
                           alias=served.role, traffic_share=share)
                 for card_id, served, share in server.store.cards()]
        return ModelList(data=cards)

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS, tags=["openai"])
    async def completions(body: CompletionRequest):
        timer = Timer()
        served = served_for(body.model)
        encoded, max_tokens = check_completion(body, serve_cfg, served.engine)
        # logits / 1e-40 overflow to inf; a temperature that small is greedy decoding anyway
        temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                                stop=tuple(body.stop or ()), seed=body.seed)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {VERSION_HEADER: served.fingerprint}
        prompt_tokens = sum(len(ids) for ids in encoded)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(server, served, encoded, params, request_id, created, prompt_tokens,
                                    include_usage, lambda: record("/v1/completions", 200, served.fingerprint, timer))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})

        results = await asyncio.gather(*(_collect(server.generate(served, ids, params)) for ids in encoded))
        choices = [CompletionChoice(index=i, text=text, finish_reason=last.finish_reason)
                   for i, (text, last) in enumerate(results)]
        completion_tokens = sum(last.completion_tokens for _, last in results)
        response = CompletionResponse(
            id=request_id, created=created, model=served.name, system_fingerprint=served.fingerprint,
            model_version=served.version, choices=choices,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens))
        record("/v1/completions", 200, served.fingerprint, timer)
        return JSONResponse(response.model_dump(), headers=headers)

    # ------------------------------------------------------------------ scoring
    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["moeops"])
    async def score(body: ScoreRequest):
        timer = Timer()
        served = served_for(body.model)
        token_ids = served.engine.encode(body.text)
        check_score_text(token_ids, serve_cfg, served.engine)
        result = await server.score(served, token_ids)
        n = len(token_ids)
        response = ScoreResponse(
            model=served.name, model_version=served.version, tokens=result.tokens, token_ids=result.token_ids,
            token_logprobs=result.token_logprobs, total_logprob=result.total_logprob,
            perplexity=result.perplexity, usage=Usage(prompt_tokens=n, completion_tokens=0, total_tokens=n))
        record("/v1/score", 200, served.fingerprint, timer)
        return JSONResponse(response.model_dump(), headers={VERSION_HEADER: served.fingerprint})

    app.add_middleware(BodyGuardMiddleware, max_body_bytes=serve_cfg.max_body_bytes)
    app.add_middleware(BearerAuthMiddleware, token=server.auth_token)  # added last = runs first
    return app


async def _collect(outputs: AsyncIterator[StepOutput]) -> tuple[str, StepOutput]:
    text, last = [], None
    async for out in outputs:
        text.append(out.text)
        last = out
    return "".join(text), last


def _sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream_events(server, served, encoded: list[list[int]], params: SamplingParams, request_id: str,
                         created: int, prompt_tokens: int, include_usage: bool, on_done) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's completion-chunk shape, ending with ``data: [DONE]``."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int]) -> None:
        try:
            async for out in server.generate(served, ids, params):
                await queue.put((index, out))
        except Exception as err:  # reported in-band: the status line has already been sent
            await queue.put((index, err))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(encoded)]
    open_streams, completion_tokens = len(tasks), 0

    def chunk(index: int, text: str, finish_reason: Optional[str]) -> dict:
        return {"id": request_id, "object": "text_completion", "created": created, "model": served.name,
                "system_fingerprint": served.fingerprint, "model_version": served.version,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    try:
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                yield _sse(error_body(f"generation failed: {type(item).__name__}: {item}", type="server_error"))
            elif item.text or item.finished:
                if item.finished:
                    completion_tokens += item.completion_tokens
                yield _sse(chunk(index, item.text, item.finish_reason if item.finished else None))
        if include_usage:
            yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                 "completion_tokens": completion_tokens,
                                                 "total_tokens": prompt_tokens + completion_tokens}})
        yield _sse("[DONE]")
        on_done()
    finally:
        for task in tasks:
            task.cancel()
