"""HTTP routes of a replica (FastAPI): each binds a path to its handler in
:mod:`serving.handlers`.

Built per replica (``serving.app.CompletionServer.__serve_build_asgi_app__``, or the benchmark
in process) from a :class:`serving.replica.Replica`, so the middlewares get that replica's
settings. Each route declares the pydantic model its handler returns, so the OpenAPI schema
(``/openapi.json``) shows the real responses; errors are OpenAI's error shape
(:mod:`serving.errors`).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serving.errors import install_error_handlers
from serving.handlers import models, probes, score, tokenize
from serving.handlers.chat import create_chat_completion
from serving.handlers.completions import create_completion
from serving.handlers.responses import create_response
from serving.middleware import (
    BearerAuthMiddleware,
    BodyGuardMiddleware,
    ClientGoneMiddleware,
    FirstRequestMiddleware,
)
from serving.replica import Replica
from serving.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    NotReadyResponse,
    ReadyResponse,
    ResponseObject,
    ResponsesRequest,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
SSE = {"text/event-stream": {}}  # a streamed answer (stream=true) is server-sent events


def build_asgi_app(replica: Replica) -> FastAPI:
    app = FastAPI(
        title="moeops",
        version="1",
        description="OpenAI-compatible completions, chat completions and responses "
        "from the MLflow-registered MoE model (champion, optional challenger canary).",
    )

    def count_error(request: Request, status: int, code: str | None) -> None:
        # the route template, not the raw path: arbitrary 404 paths must not grow label sets
        route = getattr(request.scope.get("route"), "path", "unmatched")
        replica.metrics.count_error(route, status, code or "")

    install_error_handlers(app, on_error=count_error)

    @app.get("/healthz", response_model=HealthResponse, tags=["probes"])
    async def healthz() -> HealthResponse:
        """Liveness: the replica process answers (whether or not its model is loaded yet)."""
        return probes.health(replica)

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": NotReadyResponse}},
        tags=["probes"],
    )
    async def readyz() -> Response:
        """Readiness: a model is loaded and warmed up (503 until then)."""
        return probes.readiness(replica)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format of this replica."""
        return probes.metrics(replica)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models() -> ModelList:
        return models.list_models(replica)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**ERRORS, 200: {"content": SSE}},
        tags=["openai"],
    )
    async def completions(body: CompletionRequest) -> Response:
        return await create_completion(replica, body)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**ERRORS, 200: {"content": SSE}},
        tags=["openai"],
    )
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await create_chat_completion(replica, body)

    @app.post(
        "/v1/responses",
        response_model=ResponseObject,
        responses={**ERRORS, 200: {"content": SSE}},
        tags=["openai"],
    )
    async def responses(body: ResponsesRequest) -> Response:
        return await create_response(replica, body)

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["moeops"])
    async def score_text(body: ScoreRequest) -> Response:
        return await score.create_score(replica, body)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, tags=["vllm"])
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        return tokenize.tokenize(replica, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, tags=["vllm"])
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return tokenize.detokenize(replica, body)

    app.add_middleware(
        BodyGuardMiddleware, max_body_bytes=lambda: replica.config.serve.max_body_bytes
    )
    app.add_middleware(BearerAuthMiddleware, token=replica.auth_token)
    app.add_middleware(FirstRequestMiddleware, replica=replica)
    app.add_middleware(ClientGoneMiddleware)  # added last = runs first
    return app
