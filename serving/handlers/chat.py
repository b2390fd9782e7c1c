"""``POST /v1/chat/completions``: the messages through the chat template, then as a completion."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import Response

from components.config.schema import ServeConfig
from serving import chat_template
from serving.engine import TokenLogprob
from serving.handlers.common import (
    Choice,
    Generation,
    TokenNames,
    finish,
    respond,
    served_for,
    sse,
    usage,
)
from serving.handlers.plan import (
    Plan,
    Prompt,
    check_lengths,
    counts,
    generation_params,
    invalid,
    stream_flags,
)
from serving.model_store import ServedModel
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    TopLogprob,
)

ROUTE = "/v1/chat/completions"


def plan_chat(body: ChatCompletionRequest, serve_cfg: ServeConfig, engine) -> Plan:
    text = chat_template.render(body.messages)
    prompt = Prompt(engine.encode(text), text)
    if len(prompt.ids) > serve_cfg.max_prompt_tokens:
        raise invalid(
            f"'messages' render to {len(prompt.ids)} tokens with the chat template; at most "
            f"serve.max_prompt_tokens={serve_cfg.max_prompt_tokens}",
            "messages",
            "prompt_too_long",
        )
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.requested_max_tokens
    if requested is not None and requested > serve_cfg.max_tokens:
        raise invalid(
            f"{param!r}={requested} exceeds the limit serve.max_tokens={serve_cfg.max_tokens}",
            param,
        )
    # without a limit from the client: as much as the context and the deployment allow
    max_tokens = (
        requested
        if requested is not None
        else max(1, min(serve_cfg.max_tokens, engine.max_seq_len - len(prompt.ids)))
    )
    check_lengths([prompt], max_tokens, serve_cfg, engine, "messages", param)
    n, best_of = counts(body, serve_cfg)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stream, include_usage, continuous = stream_flags(body)
    params = generation_params(
        body,
        engine,
        serve_cfg,
        max_tokens,
        logprobs,
        best_of,
        n,
        extra_stop=(chat_template.TURN_STOP,),
        logprobs_param="top_logprobs",
    )
    return Plan(
        [prompt],
        params,
        n,
        best_of,
        max_tokens,
        logprobs=logprobs,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        tokens_as_ids=bool(body.return_tokens_as_token_ids),
    )


def _ident(served: ServedModel) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": served.name,
        "system_fingerprint": served.fingerprint,
        "model_version": served.version,
    }


async def create_chat_completion(replica, body: ChatCompletionRequest) -> Response:
    served = served_for(replica, body.model)
    plan = plan_chat(body, replica.config.serve, served.engine)
    ident = _ident(served)
    generation = Generation(replica, served, plan)
    return await respond(
        replica,
        ROUTE,
        generation,
        lambda choices: chat_body(ident, generation, choices),
        lambda: chat_events(ident, generation),
    )


def _logprobs(names: TokenNames, entries: list[TokenLogprob]) -> ChatLogprobs:
    def item(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(
            token=names.label(token_id),
            logprob=logprob,
            bytes=list(names.text(token_id).encode("utf-8")),
        )

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **item(e.token_id, e.logprob).model_dump(),
                top_logprobs=[item(t, lp) for t, lp in e.top],
            )
            for e in entries
        ]
    )


def chat_body(ident: dict, generation: Generation, choices: list[Choice]) -> ChatCompletionResponse:
    plan, names = generation.plan, generation.names
    body_choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content="".join(choice.text)),
            logprobs=_logprobs(names, choice.logprobs) if plan.logprobs is not None else None,
            finish_reason=finish(choice.last),
            stop_reason=choice.last.stop_reason,
        )
        for index, choice in enumerate(generation.selected(choices))
    ]
    return ChatCompletionResponse(
        **ident,
        choices=body_choices,
        usage=usage(plan.prompt_tokens, generation.completion_tokens(choices)),
    )


async def chat_events(ident: dict, generation: Generation) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: a role delta first, then content deltas, then the finish
    reason."""
    plan, names = generation.plan, generation.names
    completion_tokens = [0] * len(generation.seqs)

    def chunk(choices: list[ChatStreamChoice], with_usage: bool) -> bytes:
        body = ChatCompletionStreamResponse(
            **ident,
            choices=choices,
            usage=usage(plan.prompt_tokens, sum(completion_tokens)) if with_usage else None,
        )
        return sse(body, exclude=None if with_usage else {"usage"})

    for index in range(len(generation.seqs)):
        role = ChatDelta(role="assistant", content="")
        yield chunk([ChatStreamChoice(index=index, delta=role)], False)
    async for index, out in generation.outputs():
        completion_tokens[index] = out.completion_tokens
        if not (out.text or out.finished or (plan.logprobs is not None and out.logprobs)):
            continue
        logprobs = _logprobs(names, out.logprobs) if plan.logprobs is not None else None
        choice = ChatStreamChoice(
            index=index,
            delta=ChatDelta(content=out.text or None),
            logprobs=logprobs,
            finish_reason=finish(out),
        )
        yield chunk([choice], plan.continuous_usage)
    if plan.include_usage:
        yield chunk([], True)
    yield sse("[DONE]")
