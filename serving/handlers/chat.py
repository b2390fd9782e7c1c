"""``POST /v1/chat/completions``: the messages through the chat template, then as a completion."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import Response

from components.config.schema import ServeConfig
from serving import chat_template
from serving.engine import StepOutput, TokenLogprob
from serving.handlers.common import (
    Choice,
    Generation,
    TokenNames,
    chunk_events,
    finish,
    respond,
    response_ident,
    served_for,
    usage,
)
from serving.handlers.plan import (
    Plan,
    answer_max_tokens,
    check_lengths,
    counts,
    generation_params,
    stream_flags,
    templated_prompt,
)
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
    prompt = templated_prompt(body.messages, engine)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = answer_max_tokens(body.requested_max_tokens, param, prompt, serve_cfg, engine)
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


async def create_chat_completion(replica, body: ChatCompletionRequest) -> Response:
    served = served_for(replica, body.model)
    plan = plan_chat(body, replica.config.serve, served.engine)
    ident = response_ident(served, "chatcmpl")
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


def chat_events(ident: dict, generation: Generation) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: a role delta first, then content deltas, then the finish
    reason."""
    plan, names = generation.plan, generation.names

    def choice_for(index: int, out: StepOutput) -> ChatStreamChoice:
        return ChatStreamChoice(
            index=index,
            delta=ChatDelta(content=out.text or None),
            logprobs=_logprobs(names, out.logprobs) if plan.logprobs is not None else None,
            finish_reason=finish(out),
        )

    role = ChatDelta(role="assistant", content="")
    first = [ChatStreamChoice(index=i, delta=role) for i in range(len(generation.seqs))]
    return chunk_events(generation, ident, ChatCompletionStreamResponse, first, choice_for)
