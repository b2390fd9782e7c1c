"""HTTP routes of a replica (FastAPI): OpenAI completions and chat completions, scoring, models,
probes, metrics.

Built per replica by ``CompletionServer.__serve_build_asgi_app__`` so the middleware (auth, body
limits) gets that deployment's settings. A request becomes one :class:`serving.engine.Sequence` per
prompt and candidate (``best_of``, else ``n``); the replica's engine loop decodes them with every
other request's sequences. When the client goes away (Serve cancels the request's task), the
request's sequences are aborted at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.exceptions import TaskCancelledError

from serving.auth import BearerAuthMiddleware
from serving.body_guard import BodyGuardMiddleware
from serving.engine import Sequence, StepOutput, TokenLogprob
from serving.engine_loop import QueueFull
from serving.errors import APIError, error_body, install_error_handlers
from serving.limits import Plan, check_score_text, plan_chat, plan_completion
from serving.metrics import CONTENT_TYPE_LATEST, Timer
from serving.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
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
REPLICA_HEADER = "x-moeops-replica"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
# nginx's "client closed request": counted in the metrics when a client goes away mid-request
CLIENT_CLOSED = 499


@dataclass
class Choice:
    """What one sequence produced, gathered from its StepOutputs."""

    prompt: int  # index into plan.prompts
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: StepOutput | None = None

    def add(self, out: StepOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.last = out

    @property
    def mean_logprob(self) -> float:
        return self.last.cumulative_logprob / max(1, len(self.token_ids))


class _Tagged:
    """A sequence's sink that tags its outputs with the sequence's index in the request."""

    def __init__(self, queue: asyncio.Queue, index: int):
        self.queue, self.index = queue, index

    def put_nowait(self, out: Any) -> None:
        self.queue.put_nowait((self.index, out))


class Generation:
    """The sequences of one request on one engine; :meth:`outputs` merges their StepOutputs."""

    def __init__(self, server, served, plan: Plan):
        self.server, self.served, self.plan = server, served, plan
        self.queue: asyncio.Queue = asyncio.Queue()
        engine = served.engine
        self.seqs: list[Sequence] = []
        self.prompt_of: list[int] = []
        for i, prompt in enumerate(plan.prompts):
            for j in range(plan.best_of):
                params = dataclasses.replace(plan.params, seed=plan.seed(j))
                self.seqs.append(
                    engine.sequence(
                        prompt.ids,
                        params,
                        sink=_Tagged(self.queue, len(self.seqs)),
                        streamed=plan.stream,
                    )
                )
                self.prompt_of.append(i)

    def start(self) -> None:
        try:
            self.server.engine_loop.submit(self.served.engine, self.seqs)
        except QueueFull as full:
            retry = str(self.server.config.serve.retry_after_s)
            raise APIError(
                429,
                f"server busy: {full}; retry after {retry}s",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"retry-after": retry},
            ) from None

    def abort(self) -> None:
        self.server.engine_loop.abort(self.served.engine, self.seqs)

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(sequence index, output) until every sequence finished; an engine error is raised."""
        open_seqs = len(self.seqs)
        while open_seqs:
            index, out = await self.queue.get()
            if isinstance(out, BaseException):
                raise APIError(500, str(out), type="server_error", code="generation_failed")
            if out.finished:
                open_seqs -= 1
            yield index, out

    async def collect(self) -> list[Choice]:
        choices = [Choice(prompt=p) for p in self.prompt_of]
        async for index, out in self.outputs():
            choices[index].add(out)
        return choices

    def selected(self, choices: list[Choice]) -> list[Choice]:
        """``n`` per prompt, in order; with ``best_of > n`` the ``n`` of highest mean
        log-probability."""
        plan, picked = self.plan, []
        for i in range(len(plan.prompts)):
            group = choices[i * plan.best_of : (i + 1) * plan.best_of]
            if plan.best_of > plan.n:
                group = sorted(group, key=lambda c: c.mean_logprob, reverse=True)
            picked.extend(group[: plan.n])
        return picked


def build_asgi_app(server) -> FastAPI:
    """``server``: the CompletionServer replica (config, store, engine_loop, metrics, readiness)."""

    # limits are read per request: a user_config change (reconfigure) applies without a restart
    def limits():
        return server.config.serve

    app = FastAPI(
        title="moeops",
        version="1",
        description="OpenAI-compatible completions and chat completions "
        "from the MLflow-registered MoE model (champion, optional challenger canary).",
    )

    def count_error(request: Request, status: int, code: str | None) -> None:
        # the route template, not the raw path: arbitrary 404 paths must not grow label sets
        route = getattr(request.scope.get("route"), "path", "unmatched")
        server.metrics.count_error(route, status, code or "")

    install_error_handlers(app, on_error=count_error)

    def served_for(model: str | None):
        if not server.ready:
            raise APIError(
                503,
                f"model not ready: {server.not_ready_reason()}",
                type="service_unavailable",
                code="not_ready",
                headers={"retry-after": str(limits().retry_after_s)},
            )
        try:
            return server.store.choose(model)
        except KeyError:
            available = [card_id for card_id, _, _ in server.store.cards()]
            raise APIError(
                404,
                f"model {model!r} is not served here; available: {available}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            ) from None

    def headers_for(served) -> dict[str, str]:
        return {VERSION_HEADER: served.fingerprint, REPLICA_HEADER: server.replica_id}

    # ------------------------------------------------------------------ probes and metadata
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the replica process answers (whether or not its model is loaded yet)."""
        return {
            "status": "alive",
            "replica": server.replica_id,
            "pid": os.getpid(),
            "ready_at": server.ready_at,
            "first_request_at": server.first_request_at,
        }

    @app.get("/readyz", tags=["probes"], responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Readiness: a model is loaded and warmed up (503 until then)."""
        if not server.ready:
            return JSONResponse(
                {"ready": False, "reason": server.not_ready_reason()}, status_code=503
            )
        cards = server.store.cards()
        return {
            "ready": True,
            "model": cards[0][1].fingerprint,
            "replica": server.replica_id,
            "versions": {card_id: served.version for card_id, served, _ in cards},
            "queued_sequences": server.engine_loop.queued,
            "last_error": server.store.last_error or None,
        }

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text format of this replica (a cluster scrapes Ray's metrics agent
        instead)."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models() -> ModelList:
        cards = [
            ModelCard(
                id=card_id,
                created=int(time.time()),
                version=served.version,
                alias=served.role,
                traffic_share=share,
                max_model_len=served.engine.max_seq_len,
            )
            for card_id, served, share in server.store.cards()
        ]
        return ModelList(data=cards)

    # ------------------------------------------------------------------ generation
    async def respond(
        route: str, served, plan: Plan, render_full: Callable, render_stream: Callable
    ):
        timer = Timer()
        generation = Generation(server, served, plan)
        extra = (
            await prompt_logprobs(served, plan) if plan.echo and plan.logprobs is not None else None
        )
        generation.start()
        if plan.stream:
            events = guarded_stream(route, generation, render_stream(generation), timer)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={**headers_for(served), "cache-control": "no-cache"},
            )
        try:
            choices = await generation.collect()
        except asyncio.CancelledError:
            server.metrics.count_error(
                route, CLIENT_CLOSED, "client_disconnected", served.fingerprint
            )
            raise
        finally:
            generation.abort()  # no-op unless the client went away (Serve cancels this task)
        body = render_full(generation, choices, extra)
        server.metrics.observe_request(route, 200, served.fingerprint, timer.seconds)
        return JSONResponse(body, headers=headers_for(served))

    async def guarded_stream(
        route: str, generation: Generation, events: AsyncIterator[bytes], timer: Timer
    ):
        fingerprint = generation.served.fingerprint
        try:
            async for event in events:
                yield event
            server.metrics.observe_request(route, 200, fingerprint, timer.seconds)
        except asyncio.CancelledError:
            server.metrics.count_error(route, CLIENT_CLOSED, "client_disconnected", fingerprint)
            raise
        except APIError as err:  # reported in-band: the status line has already been sent
            server.metrics.count_error(route, err.status, err.code or "", fingerprint)
            yield _sse(error_body(err.message, type=err.type, code=err.code))
            yield _sse("[DONE]")
        finally:
            generation.abort()

    async def prompt_logprobs(served, plan: Plan) -> list[list[TokenLogprob | None]]:
        top_n = plan.logprobs or 0
        return [
            await server.engine_loop.call(
                served.engine, lambda e, ids=p.ids: e.prompt_logprobs(ids, top_n)
            )
            for p in plan.prompts
        ]

    @app.post(
        "/v1/completions", response_model=CompletionResponse, responses=ERRORS, tags=["openai"]
    )
    async def completions(body: CompletionRequest):
        served = served_for(body.model)
        plan = plan_completion(body, limits(), served.engine)
        ident = Ident(f"cmpl-{uuid.uuid4().hex}", int(time.time()), served)
        if plan.max_tokens == 0:  # echo only: score the prompt, generate nothing
            return JSONResponse(
                echo_only(
                    ident,
                    plan,
                    await prompt_logprobs(served, plan) if plan.logprobs is not None else None,
                ),
                headers=headers_for(served),
            )
        return await respond(
            "/v1/completions",
            served,
            plan,
            lambda g, choices, extra: completion_body(ident, g, choices, extra),
            lambda g: completion_events(ident, g),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=ERRORS,
        tags=["openai"],
    )
    async def chat_completions(body: ChatCompletionRequest):
        served = served_for(body.model)
        plan = plan_chat(body, limits(), served.engine)
        ident = Ident(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served)
        return await respond(
            "/v1/chat/completions",
            served,
            plan,
            lambda g, choices, extra: chat_body(ident, g, choices),
            lambda g: chat_events(ident, g),
        )

    # ------------------------------------------------------------------ scoring
    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["moeops"])
    async def score(body: ScoreRequest):
        timer = Timer()
        served = served_for(body.model)
        engine = served.engine
        token_ids = engine.encode(body.text)
        check_score_text(token_ids, limits(), engine)
        values = await server.engine_loop.call(engine, lambda e: e.score(token_ids))
        total = float(sum(values))
        n = len(token_ids)
        response = ScoreResponse(
            model=served.name,
            model_version=served.version,
            tokens=[engine.tokenizer.decode([t]) for t in token_ids],
            token_ids=token_ids,
            token_logprobs=[None, *values],
            total_logprob=total,
            perplexity=float(_exp(-total / len(values))),
            usage=Usage(prompt_tokens=n, completion_tokens=0, total_tokens=n),
        )
        server.metrics.observe_request("/v1/score", 200, served.fingerprint, timer.seconds)
        return JSONResponse(response.model_dump(), headers=headers_for(served))

    app.add_middleware(BodyGuardMiddleware, max_body_bytes=lambda: limits().max_body_bytes)
    app.add_middleware(BearerAuthMiddleware, token=server.auth_token)
    app.add_middleware(FirstRequestMiddleware, server=server)
    app.add_middleware(ClientGoneMiddleware)  # added last = runs first
    return app


class ClientGoneMiddleware:
    """A client that went away is an ``http.disconnect`` message, as ASGI specifies.

    When Serve's proxy cancels a request (client disconnected), the ``receive`` Ray Serve 2.60 hands
    the app raises ``TaskCancelledError`` instead. A streaming response listens on ``receive`` for
    the
    disconnect, so the error escaped the app and the replica logged "Future exception was never
    retrieved" for every dropped stream. Given the message, the response stops cleanly (the
    request's
    sequences are aborted in ``guarded_stream``).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


class FirstRequestMiddleware:
    """Notes when the replica's first HTTP request arrived (checked against its warm-up by
    tests)."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.server.first_request_at is None:
            self.server.first_request_at = time.time()
        await self.app(scope, receive, send)


def _exp(x: float) -> float:
    import math

    return math.exp(x)


@dataclass
class Ident:
    id: str
    created: int
    served: Any

    def head(self, kind: str) -> dict[str, Any]:
        s = self.served
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": s.name,
            "system_fingerprint": s.fingerprint,
            "model_version": s.version,
        }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _finish(out: StepOutput | None) -> str | None:
    if out is None or not out.finished:
        return None
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


# ------------------------------------------------------------------ completions bodies


class TokenNames:
    """How logprobs name a token: its text, or ``token_id:<id>`` (vLLM's
    ``return_tokens_as_token_ids``)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def label(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.text(token_id)


def _names(generation: Generation) -> TokenNames:
    return TokenNames(generation.served.engine.tokenizer, generation.plan.tokens_as_ids)


def _completion_logprobs(
    names: TokenNames, entries: list[TokenLogprob | None], offset: int
) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy shape: parallel lists of tokens, their logprobs, top alternatives and text
    offsets;
    and the text offset after the last token."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        if entry is None:  # the first prompt token: no context, no logprob
            continue
        label = names.label(entry.token_id)
        tokens.append(label)
        values.append(entry.logprob)
        top = {names.label(t): lp for t, lp in entry.top}
        top.setdefault(label, entry.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(names.text(entry.token_id))
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }, offset


def _prompt_entries(
    names: TokenNames, prompt_ids: list[int], entries: list[TokenLogprob | None]
) -> dict[str, Any]:
    rest, _ = _completion_logprobs(names, entries[1:], len(names.text(prompt_ids[0])))
    return {
        "tokens": [names.label(prompt_ids[0]), *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def completion_body(
    ident: Ident, generation: Generation, choices: list[Choice], prompt_lps
) -> dict[str, Any]:
    plan, names = generation.plan, _names(generation)
    body_choices = []
    for index, choice in enumerate(generation.selected(choices)):
        prompt = plan.prompts[choice.prompt]
        text = "".join(choice.text)
        logprobs = None
        if plan.logprobs is not None:
            logprobs, _ = _completion_logprobs(
                names, choice.logprobs, len(prompt.text) if plan.echo else 0
            )
            if plan.echo:
                head = _prompt_entries(names, prompt.ids, prompt_lps[choice.prompt])
                logprobs = {key: head[key] + logprobs[key] for key in head}
        body_choices.append(
            {
                "index": index,
                "text": (prompt.text if plan.echo else "") + text,
                "logprobs": logprobs,
                "finish_reason": _finish(choice.last),
                "stop_reason": choice.last.stop_reason,
            }
        )
    completion_tokens = sum(c.last.completion_tokens for c in choices)
    return {
        **ident.head("text_completion"),
        "choices": body_choices,
        "usage": _usage(plan.prompt_tokens, completion_tokens),
    }


def echo_only(ident: Ident, plan: Plan, prompt_lps) -> dict[str, Any]:
    """``echo`` with ``max_tokens: 0``: the prompts back (with their logprobs), nothing
    generated."""
    choices, index = [], 0
    names = TokenNames(ident.served.engine.tokenizer, plan.tokens_as_ids)
    for i, prompt in enumerate(plan.prompts):
        for _ in range(plan.n):
            logprobs = None
            if prompt_lps is not None:
                logprobs = _prompt_entries(names, prompt.ids, prompt_lps[i])
            choices.append(
                {
                    "index": index,
                    "text": prompt.text,
                    "logprobs": logprobs,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            )
            index += 1
    return {
        **ident.head("text_completion"),
        "choices": choices,
        "usage": _usage(plan.prompt_tokens, 0),
    }


async def completion_events(ident: Ident, generation: Generation) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's completion-chunk shape, ending with ``data: [DONE]``."""
    plan, names = generation.plan, _names(generation)
    head = ident.head("text_completion")
    completion_tokens = [0] * len(generation.seqs)
    offsets = [len(plan.prompts[p].text) if plan.echo else 0 for p in generation.prompt_of]
    if plan.echo:
        for index, prompt_index in enumerate(generation.prompt_of):
            yield _sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": index,
                            "text": plan.prompts[prompt_index].text,
                            "logprobs": None,
                            "finish_reason": None,
                            "stop_reason": None,
                        }
                    ],
                }
            )
    async for index, out in generation.outputs():
        completion_tokens[index] = out.completion_tokens
        if not (out.text or out.finished or (plan.logprobs is not None and out.logprobs)):
            continue
        logprobs = None
        if plan.logprobs is not None:
            logprobs, offsets[index] = _completion_logprobs(names, out.logprobs, offsets[index])
        chunk = {
            **head,
            "choices": [
                {
                    "index": index,
                    "text": out.text,
                    "logprobs": logprobs,
                    "finish_reason": _finish(out),
                    "stop_reason": out.stop_reason,
                }
            ],
        }
        if plan.continuous_usage:
            chunk["usage"] = _usage(plan.prompt_tokens, sum(completion_tokens))
        yield _sse(chunk)
    if plan.include_usage:
        yield _sse(
            {**head, "choices": [], "usage": _usage(plan.prompt_tokens, sum(completion_tokens))}
        )
    yield _sse("[DONE]")


# ------------------------------------------------------------------ chat bodies


def _chat_logprobs(names: TokenNames, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": names.label(token_id),
            "logprob": logprob,
            "bytes": list(names.text(token_id).encode("utf-8")),
        }

    return [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
        for e in entries
    ]


def chat_body(ident: Ident, generation: Generation, choices: list[Choice]) -> dict[str, Any]:
    plan, names = generation.plan, _names(generation)
    body_choices = []
    for index, choice in enumerate(generation.selected(choices)):
        logprobs = (
            {"content": _chat_logprobs(names, choice.logprobs)}
            if plan.logprobs is not None
            else None
        )
        body_choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": logprobs,
                "finish_reason": _finish(choice.last),
                "stop_reason": choice.last.stop_reason,
            }
        )
    completion_tokens = sum(c.last.completion_tokens for c in choices)
    return {
        **ident.head("chat.completion"),
        "choices": body_choices,
        "usage": _usage(plan.prompt_tokens, completion_tokens),
    }


async def chat_events(ident: Ident, generation: Generation) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: a role delta first, then content deltas, then the finish
    reason."""
    plan, names = generation.plan, _names(generation)
    head = ident.head("chat.completion.chunk")
    completion_tokens = [0] * len(generation.seqs)
    for index in range(len(generation.seqs)):
        yield _sse(
            {
                **head,
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
    async for index, out in generation.outputs():
        completion_tokens[index] = out.completion_tokens
        if not (out.text or out.finished or (plan.logprobs is not None and out.logprobs)):
            continue
        logprobs = (
            {"content": _chat_logprobs(names, out.logprobs)} if plan.logprobs is not None else None
        )
        delta = {"content": out.text} if out.text else {}
        chunk = {
            **head,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": _finish(out),
                }
            ],
        }
        if plan.continuous_usage:
            chunk["usage"] = _usage(plan.prompt_tokens, sum(completion_tokens))
        yield _sse(chunk)
    if plan.include_usage:
        yield _sse(
            {**head, "choices": [], "usage": _usage(plan.prompt_tokens, sum(completion_tokens))}
        )
    yield _sse("[DONE]")
