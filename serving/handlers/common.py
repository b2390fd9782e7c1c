"""What every generating handler shares: the request's sequences on the engine loop
(:class:`Generation`), the version that answers it, response headers, SSE framing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from serving.engine import Sequence, StepOutput, TokenLogprob
from serving.engine_loop import QueueFull
from serving.errors import APIError, error_body
from serving.handlers.plan import Plan
from serving.metrics import Timer
from serving.model_store import ServedModel
from serving.schemas import Usage

VERSION_HEADER = "x-moeops-model-version"
REPLICA_HEADER = "x-moeops-replica"
# nginx's "client closed request": counted in the metrics when a client goes away mid-request
CLIENT_CLOSED = 499


def served_for(replica, model: str | None) -> ServedModel:
    """The version that answers a request naming ``model`` (503 before the first load)."""
    if not replica.ready:
        raise APIError(
            503,
            f"model not ready: {replica.not_ready_reason()}",
            type="service_unavailable",
            code="not_ready",
            headers={"retry-after": str(replica.config.serve.retry_after_s)},
        )
    try:
        return replica.store.choose(model)
    except KeyError:
        available = [card_id for card_id, _, _ in replica.store.cards()]
        raise APIError(
            404,
            f"model {model!r} is not served here; available: {available}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        ) from None


def headers_for(replica, served: ServedModel) -> dict[str, str]:
    return {VERSION_HEADER: served.fingerprint, REPLICA_HEADER: replica.replica_id}


def json_response(body: BaseModel, headers: dict[str, str] | None = None) -> Response:
    """The validated model serialised once (pydantic's JSON encoder, no second validation)."""
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def response_ident(served: ServedModel, prefix: str) -> dict[str, Any]:
    """What every body and chunk of one response repeats: its id (``<prefix>-<hex>``, OpenAI's
    ``cmpl``/``chatcmpl``), creation time, the model's name and the version that answers."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": served.name,
        "system_fingerprint": served.fingerprint,
        "model_version": served.version,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def sse(data: BaseModel | str, exclude: set[str] | None = None, event: str | None = None) -> bytes:
    """One server-sent event (``exclude``: fields left out of this chunk, e.g. ``usage``)."""
    payload = data if isinstance(data, str) else data.model_dump_json(exclude=exclude)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def finish(out: StepOutput | None) -> str | None:
    if out is None or not out.finished:
        return None
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


class TokenNames:
    """How logprobs name a token: its text, or ``token_id:<id>`` (vLLM's
    ``return_tokens_as_token_ids``)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def label(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.text(token_id)


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

    def __init__(self, replica, served: ServedModel, plan: Plan):
        self.replica, self.served, self.plan = replica, served, plan
        self.queue: asyncio.Queue = asyncio.Queue()
        engine = served.engine
        self.names = TokenNames(engine.tokenizer, plan.tokens_as_ids)
        self.seqs: list[Sequence] = []
        self.prompt_of: list[int] = []
        for i, prompt in enumerate(plan.prompts):
            for j in range(plan.best_of):
                params = dataclasses.replace(plan.params, seed=plan.seed(j))
                sink = _Tagged(self.queue, len(self.seqs))
                self.seqs.append(engine.sequence(prompt.ids, params, sink, streamed=plan.stream))
                self.prompt_of.append(i)

    def start(self) -> None:
        try:
            self.replica.engine_loop.submit(self.served.engine, self.seqs)
        except QueueFull as full:
            retry = str(self.replica.config.serve.retry_after_s)
            raise APIError(
                429,
                f"server busy: {full}; retry after {retry}s",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"retry-after": retry},
            ) from None

    def abort(self) -> None:
        self.replica.engine_loop.abort(self.served.engine, self.seqs)

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

    def completion_tokens(self, choices: list[Choice]) -> int:
        return sum(c.last.completion_tokens for c in choices)


async def chunk_events(
    generation: Generation,
    ident: dict[str, Any],
    chunk_model: type[BaseModel],
    first: list[BaseModel],
    choice_for: Callable[[int, StepOutput], BaseModel],
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: a chunk per choice of ``first`` (a role delta, an echoed prompt),
    then one per output that carries text, logprobs or the finish (``choice_for`` builds its
    choice), the usage chunk when asked for, and ``data: [DONE]``."""
    plan = generation.plan
    completion_tokens = [0] * len(generation.seqs)

    def chunk(choices: list[BaseModel], with_usage: bool) -> bytes:
        body = chunk_model(
            **ident,
            choices=choices,
            usage=usage(plan.prompt_tokens, sum(completion_tokens)) if with_usage else None,
        )
        return sse(body, exclude=None if with_usage else {"usage"})

    for choice in first:
        yield chunk([choice], False)
    async for index, out in generation.outputs():
        completion_tokens[index] = out.completion_tokens
        if not (out.text or out.finished or (plan.logprobs is not None and out.logprobs)):
            continue
        yield chunk([choice_for(index, out)], plan.continuous_usage)
    if plan.include_usage:
        yield chunk([], True)
    yield sse("[DONE]")


async def prompt_logprobs(
    replica, served: ServedModel, plan: Plan
) -> list[list[TokenLogprob | None]]:
    """log p of every prompt token given the ones before (``echo`` with ``logprobs``)."""
    top_n = plan.logprobs or 0
    return [
        await replica.engine_loop.call(
            served.engine, lambda e, ids=p.ids: e.prompt_logprobs(ids, top_n)
        )
        for p in plan.prompts
    ]


async def respond(
    replica,
    route: str,
    generation: Generation,
    render_full: Callable[[list[Choice]], BaseModel],
    render_stream: Callable[[], AsyncIterator[bytes]],
) -> Response:
    """Run ``generation``: the rendered response model, or its server-sent events when streamed.

    A client that goes away cancels this task (Serve) or the stream: its sequences are aborted.
    """
    timer = Timer()
    served = generation.served
    generation.start()
    if generation.plan.stream:
        events = _guarded_stream(replica, route, generation, render_stream(), timer)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={**headers_for(replica, served), "cache-control": "no-cache"},
        )
    try:
        choices = await generation.collect()
    except asyncio.CancelledError:
        replica.metrics.count_error(route, CLIENT_CLOSED, "client_disconnected", served.fingerprint)
        raise
    finally:
        generation.abort()  # no-op unless the client went away (Serve cancels this task)
    body = render_full(choices)
    replica.metrics.observe_request(route, 200, served.fingerprint, timer.seconds)
    return json_response(body, headers_for(replica, served))


async def _guarded_stream(
    replica, route: str, generation: Generation, events: AsyncIterator[bytes], timer: Timer
) -> AsyncIterator[bytes]:
    fingerprint = generation.served.fingerprint
    try:
        async for event in events:
            yield event
        replica.metrics.observe_request(route, 200, fingerprint, timer.seconds)
    except asyncio.CancelledError:
        replica.metrics.count_error(route, CLIENT_CLOSED, "client_disconnected", fingerprint)
        raise
    except APIError as err:  # reported in-band: the status line has already been sent
        replica.metrics.count_error(route, err.status, err.code or "", fingerprint)
        yield sse(json.dumps(error_body(err.message, type=err.type, code=err.code)))
        yield sse("[DONE]")
    finally:
        generation.abort()
