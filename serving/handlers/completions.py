"""``POST /v1/completions``: plan, run, and render OpenAI's completion (or its chunks)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import Response

from components.config.schema import ServeConfig
from serving.engine import StepOutput, TokenLogprob
from serving.handlers.common import (
    Choice,
    Generation,
    TokenNames,
    chunk_events,
    finish,
    headers_for,
    json_response,
    prompt_logprobs,
    respond,
    response_ident,
    served_for,
    usage,
)
from serving.handlers.plan import (
    Plan,
    Prompt,
    check_lengths,
    check_token_ids,
    counts,
    generation_params,
    invalid,
    stream_flags,
)
from serving.model_store import ServedModel
from serving.schemas import (
    DEFAULT_MAX_TOKENS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
)

ROUTE = "/v1/completions"


def plan_completion(body: CompletionRequest, serve_cfg: ServeConfig, engine) -> Plan:
    items = body.prompts
    if len(items) > serve_cfg.max_prompts:
        raise invalid(
            f"'prompt' holds {len(items)} prompts; "
            f"at most serve.max_prompts={serve_cfg.max_prompts}",
            "prompt",
            "too_many_prompts",
        )
    if body.max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, serve_cfg.max_tokens)
    else:
        max_tokens = body.max_tokens
    if max_tokens > serve_cfg.max_tokens:
        raise invalid(
            f"'max_tokens'={max_tokens} exceeds the limit serve.max_tokens={serve_cfg.max_tokens}",
            "max_tokens",
        )
    if max_tokens == 0 and not body.echo:
        raise invalid(
            "'max_tokens'=0 is only allowed with echo=true (to score the prompt)", "max_tokens"
        )
    prompts = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            prompts.append(Prompt(engine.encode(item), item))
        else:
            check_token_ids(item, engine.vocab_size, param)
            prompts.append(Prompt(list(item), engine.tokenizer.decode(item)))
    check_lengths(prompts, max_tokens, serve_cfg, engine, "prompt", "max_tokens")
    n, best_of = counts(body, serve_cfg)
    stream, include_usage, continuous = stream_flags(body)
    params = generation_params(body, engine, serve_cfg, max_tokens, body.logprobs, best_of, n)
    return Plan(
        prompts,
        params,
        n,
        best_of,
        max_tokens,
        echo=bool(body.echo),
        logprobs=body.logprobs,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        tokens_as_ids=bool(body.return_tokens_as_token_ids),
    )


async def create_completion(replica, body: CompletionRequest) -> Response:
    served = served_for(replica, body.model)
    plan = plan_completion(body, replica.config.serve, served.engine)
    ident = response_ident(served, "cmpl")
    wants_prompt_lps = plan.echo and plan.logprobs is not None
    prompt_lps = await prompt_logprobs(replica, served, plan) if wants_prompt_lps else None
    if plan.max_tokens == 0:  # echo only: score the prompt, generate nothing
        return json_response(
            echo_only(ident, served, plan, prompt_lps), headers_for(replica, served)
        )
    generation = Generation(replica, served, plan)
    return await respond(
        replica,
        ROUTE,
        generation,
        lambda choices: completion_body(ident, generation, choices, prompt_lps),
        lambda: completion_events(ident, generation),
    )


def _logprobs(
    names: TokenNames, entries: list[TokenLogprob | None], offset: int
) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy shape: parallel lists of tokens, their logprobs, top alternatives and text
    offsets; and the text offset after the last token."""
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
    logprobs = CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )
    return logprobs, offset


def _prompt_logprobs(
    names: TokenNames, prompt_ids: list[int], entries: list[TokenLogprob | None]
) -> CompletionLogprobs:
    rest, _ = _logprobs(names, entries[1:], len(names.text(prompt_ids[0])))
    return CompletionLogprobs(
        tokens=[names.label(prompt_ids[0]), *rest.tokens],
        token_logprobs=[None, *rest.token_logprobs],
        top_logprobs=[None, *rest.top_logprobs],
        text_offset=[0, *rest.text_offset],
    )


def completion_body(
    ident: dict, generation: Generation, choices: list[Choice], prompt_lps
) -> CompletionResponse:
    plan, names = generation.plan, generation.names
    body_choices = []
    for index, choice in enumerate(generation.selected(choices)):
        prompt = plan.prompts[choice.prompt]
        logprobs = None
        if plan.logprobs is not None:
            logprobs, _ = _logprobs(names, choice.logprobs, len(prompt.text) if plan.echo else 0)
            if plan.echo:
                head = _prompt_logprobs(names, prompt.ids, prompt_lps[choice.prompt])
                logprobs = CompletionLogprobs(
                    tokens=head.tokens + logprobs.tokens,
                    token_logprobs=head.token_logprobs + logprobs.token_logprobs,
                    top_logprobs=head.top_logprobs + logprobs.top_logprobs,
                    text_offset=head.text_offset + logprobs.text_offset,
                )
        body_choices.append(
            CompletionChoice(
                index=index,
                text=(prompt.text if plan.echo else "") + "".join(choice.text),
                logprobs=logprobs,
                finish_reason=finish(choice.last),
                stop_reason=choice.last.stop_reason,
            )
        )
    return CompletionResponse(
        **ident,
        choices=body_choices,
        usage=usage(plan.prompt_tokens, generation.completion_tokens(choices)),
    )


def echo_only(ident: dict, served: ServedModel, plan: Plan, prompt_lps) -> CompletionResponse:
    """``echo`` with ``max_tokens: 0``: the prompts back (with their logprobs), nothing
    generated."""
    choices = []
    names = TokenNames(served.engine.tokenizer, plan.tokens_as_ids)
    for i, prompt in enumerate(plan.prompts):
        logprobs = None
        if prompt_lps is not None:
            logprobs = _prompt_logprobs(names, prompt.ids, prompt_lps[i])
        for _ in range(plan.n):
            choices.append(
                CompletionChoice(
                    index=len(choices), text=prompt.text, logprobs=logprobs, finish_reason="length"
                )
            )
    return CompletionResponse(**ident, choices=choices, usage=usage(plan.prompt_tokens, 0))


def completion_events(ident: dict, generation: Generation) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's completion-chunk shape, ending with ``data: [DONE]``."""
    plan, names = generation.plan, generation.names
    offsets = [len(plan.prompts[p].text) if plan.echo else 0 for p in generation.prompt_of]

    def choice_for(index: int, out: StepOutput) -> CompletionStreamChoice:
        logprobs = None
        if plan.logprobs is not None:
            logprobs, offsets[index] = _logprobs(names, out.logprobs, offsets[index])
        return CompletionStreamChoice(
            index=index,
            text=out.text,
            logprobs=logprobs,
            finish_reason=finish(out),
            stop_reason=out.stop_reason,
        )

    first = []
    if plan.echo:
        first = [
            CompletionStreamChoice(index=index, text=plan.prompts[p].text)
            for index, p in enumerate(generation.prompt_of)
        ]
    return chunk_events(generation, ident, CompletionStreamResponse, first, choice_for)
