"""The rules every handler applies between a parsed request and its generation plan.

Parsing (:mod:`serving.schemas`) checks each field alone; here come the rules that need the
model (vocabulary, context length), the deployment's limits (``serve.*``), or several fields
together. Each failure is a 400 whose ``param`` names the field to fix. Each handler builds its
own :class:`Plan` from these (``plan_completion`` in :mod:`serving.handlers.completions` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config.schema import ServeConfig
from components.model.sampling import SamplingParams
from serving import chat_template
from serving.engine import GenerationParams
from serving.errors import APIError

# a temperature this small is greedy decoding anyway (logits / 1e-40 would overflow)
MIN_TEMPERATURE = 1e-4


def invalid(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what ``echo`` returns (token-id prompts: their decoded text)


def templated_prompt(messages, engine) -> Prompt:
    """The messages through the chat template, tokenised (their length: :func:`check_lengths`)."""
    text = chat_template.render(messages)
    return Prompt(engine.encode(text), text)


def answer_max_tokens(
    requested: int | None, param: str, prompt: Prompt, serve_cfg: ServeConfig, engine
) -> int:
    """A chat answer's token budget: the client's (``param``), at most ``serve.max_tokens``; without
    one, as much as the context and the deployment allow."""
    if requested is not None and requested > serve_cfg.max_tokens:
        raise invalid(
            f"{param!r}={requested} exceeds the limit serve.max_tokens={serve_cfg.max_tokens}",
            param,
        )
    if requested is not None:
        return requested
    return max(1, min(serve_cfg.max_tokens, engine.max_seq_len - len(prompt.ids)))


@dataclass
class Plan:
    """What to generate for one request: ``best_of`` sequences per prompt, ``n`` returned per
    prompt."""

    prompts: list[Prompt]
    params: GenerationParams
    n: int
    best_of: int
    max_tokens: int
    echo: bool = False
    logprobs: int | None = None  # top-N reported per token (None: no logprobs in the response)
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    tokens_as_ids: bool = (
        False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    )

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def seed(self, choice: int) -> int | str | None:
        """Choice j of a seeded request: its own reproducible stream (choice 0 = the plain seed)."""
        seed = self.params.seed
        if seed is None or choice == 0:
            return seed
        return f"{seed}/{choice}"


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise invalid(
            f"{param!r} holds token ids {bad[:5]} outside the vocabulary [0, {vocab})",
            param,
            "invalid_token_id",
        )


def sampling_params(body, engine) -> SamplingParams:
    bias = []
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < engine.vocab_size:
            raise invalid(
                f"'logit_bias' token id {token} is outside the vocabulary [0, {engine.vocab_size})",
                "logit_bias",
                "invalid_token_id",
            )
        bias.append((token, float(value)))
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=tuple(bias),
    )


def counts(body, serve_cfg: ServeConfig) -> tuple[int, int]:
    n = body.n or 1
    best_of = getattr(body, "best_of", None) or n
    if n > serve_cfg.max_n:
        raise invalid(f"'n'={n} exceeds the limit serve.max_n={serve_cfg.max_n}", "n")
    if best_of > serve_cfg.max_n:
        raise invalid(
            f"'best_of'={best_of} exceeds the limit serve.max_n={serve_cfg.max_n}", "best_of"
        )
    return n, best_of


def check_lengths(
    prompts: list[Prompt],
    max_tokens: int,
    serve_cfg: ServeConfig,
    engine,
    param: str,
    max_tokens_param: str,
) -> None:
    for i, prompt in enumerate(prompts):
        where = param if len(prompts) == 1 else f"{param}[{i}]"
        if not prompt.ids:
            raise invalid(f"{where!r} encodes to no tokens", where, "empty_prompt")
        if len(prompt.ids) > serve_cfg.max_prompt_tokens:
            raise invalid(
                f"{where!r} is {len(prompt.ids)} tokens; at most serve.max_prompt_tokens="
                f"{serve_cfg.max_prompt_tokens}",
                where,
                "prompt_too_long",
            )
        if len(prompt.ids) + max_tokens > engine.max_seq_len:
            raise invalid(
                f"{where!r} ({len(prompt.ids)} tokens) + {max_tokens_param!r} ({max_tokens}) "
                "exceeds "
                f"the model's context of {engine.max_seq_len} tokens",
                max_tokens_param,
                "context_length_exceeded",
            )


def generation_params(
    body,  # a request with the sampling fields (serving.schemas._Sampling)
    engine,
    serve_cfg: ServeConfig,
    max_tokens: int,
    logprobs: int | None,
    best_of: int,
    n: int,
    extra_stop: tuple[str, ...] = (),
    logprobs_param: str = "logprobs",
) -> GenerationParams:
    stop_ids = list(body.stop_token_ids or ())
    check_token_ids(stop_ids, engine.vocab_size, "stop_token_ids")
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise invalid(f"'min_tokens'={min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
    if logprobs is not None and logprobs > serve_cfg.max_logprobs:
        raise invalid(
            f"logprobs={logprobs} exceeds the limit serve.max_logprobs={serve_cfg.max_logprobs}",
            logprobs_param,
        )
    # best_of ranks candidates by their mean log-probability, so it needs them even when not
    # reported
    wanted = logprobs if logprobs is not None else (0 if best_of > n else None)
    return GenerationParams(
        max_tokens=max_tokens,
        sampling=sampling_params(body, engine),
        stop=tuple(body.stops) + extra_stop,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=min_tokens,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        logprobs=wanted,
        seed=body.seed,
    )


def stream_flags(body) -> tuple[bool, bool, bool]:
    stream = bool(body.stream)
    options = body.stream_options
    return (
        stream,
        bool(options and options.include_usage),
        bool(options and options.continuous_usage_stats),
    )


def check_score_text(token_ids: list[int], serve_cfg: ServeConfig, engine) -> None:
    limit = min(serve_cfg.max_prompt_tokens + serve_cfg.max_tokens, engine.max_seq_len)
    if len(token_ids) < 2:
        raise invalid(
            "'text' must encode to at least 2 tokens to be scored", "text", "text_too_short"
        )
    if len(token_ids) > limit:
        raise invalid(
            f"'text' is {len(token_ids)} tokens; at most {limit} can be scored",
            "text",
            "text_too_long",
        )
