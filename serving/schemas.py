"""Request and response bodies of the HTTP API: OpenAI's completions and chat completions, as vLLM
takes them.

Every field of OpenAI's ``POST /v1/completions`` and ``POST /v1/chat/completions`` requests is
accepted, and ``null`` means the field's default (clients such as LangChain send explicit
``null``s and neutral values). vLLM's extra sampling fields that moeops implements (``top_k``,
``min_p``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``min_tokens``,
``include_stop_str_in_output``, ``return_tokens_as_token_ids``) are accepted too. A field in no
schema is a 400 that names it, and
types are strict (``"5"`` is not an int). Features a base model cannot serve (``suffix``, tool
calls, JSON response formats, audio) are accepted only at their neutral value and are otherwise a
400 saying so. Limits that depend on the deployment's config (``serve.max_tokens`` ...) are checked
in :mod:`serving.handlers`, after parsing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
INT64 = 2**63 - 1

# OpenAI's completions defaults (the chat API's max_tokens default is the deployment's limit)
DEFAULT_MAX_TOKENS = 16


def _require_unicode(text: str, where: str = "") -> None:
    """JSON escapes can smuggle lone surrogates (``"\\ud800"``) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"is not valid Unicode text{where}: {err.reason} at position {err.start}"
        ) from None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None
    # vLLM: usage in every chunk
    continuous_usage_stats: bool | None = None


class _Sampling(_Request):
    """Fields shared by both endpoints. ``None`` (JSON ``null``) always means the default."""

    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM's sampling extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    include_stop_str_in_output: bool | None = None
    # vLLM: tokens in logprobs as "token_id:<id>" (exact even where a token is part of a character)
    return_tokens_as_token_ids: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        for s in stops:
            _require_unicode(s)
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f'keys must be token ids as strings (e.g. "50256"), got {key!r}')
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"bias for token {key} is {value}: must be in [-100, 100]")
        return bias

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @property
    def stops(self) -> list[str]:
        return list(self.stop or ())


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0)
    # OpenAI's insertion mode: no base model here was trained for fill-in-the-middle
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list) and not prompt:
            raise ValueError(
                "must be a non-empty string, list of strings, list of token ids or list of "
                "token-id lists"
            )
        single = isinstance(prompt, str) or isinstance(prompt[0], int)
        for i, item in enumerate([prompt] if single else prompt):
            where = "" if single else f" (item {i})"
            if isinstance(item, str):
                if not item.strip():
                    raise ValueError(f"must not be empty or whitespace only{where}")
                _require_unicode(item, where)
            elif not item:
                raise ValueError(f"a token-id prompt must not be empty{where}")
            elif any(t < 0 for t in item):
                raise ValueError(f"token ids must be >= 0{where}")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if best_of is not None and best_of < n:
            raise ValueError(f"must be >= n ({n})")
        if best_of is not None and best_of != n and info.data.get("stream"):
            raise ValueError("cannot be used with stream (best_of must equal n when streaming)")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix is not None:
            raise ValueError(
                "not supported: the served base model has no fill-in-the-middle (insertion) mode"
            )
        return suffix

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


# ------------------------------------------------------------------ chat


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """A message of ``messages``: system / developer / user / assistant, text only."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # an assistant message from an earlier turn may carry these (as null)
    refusal: str | None = None
    tool_calls: list[Any] | None = None

    @model_validator(mode="after")
    def _text(self):
        if self.tool_calls:
            raise ValueError(
                "tool_calls: not supported (the served base model does not call tools)"
            )
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content")
        _require_unicode(self.text)
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    # accepted and without effect on generation: bookkeeping and options of OpenAI's hosted models
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("not supported: the served base model does not call tools")
        return tools

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice not in (None, "none", "auto"):
            raise ValueError("not supported: no tools (only null, 'none' or 'auto')")
        return choice

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, fmt: ResponseFormat | None) -> ResponseFormat | None:
        if fmt is not None and fmt.type != "text":
            raise ValueError(f"type {fmt.type!r} is not supported, only 'text'")
        return fmt

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, modalities: list[str] | None) -> list[str] | None:
        if modalities is not None and set(modalities) - {"text"}:
            raise ValueError(f"only ['text'] is supported, got {modalities}")
        return modalities

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("not supported by the served base model (only null)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return top

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class ScoreRequest(_Request):
    """``POST /v1/score``: log-probability of every token of ``text`` given the tokens before it."""

    model: str | None = None
    text: str

    @field_validator("text")
    @classmethod
    def _text_not_empty(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty or whitespace only")
        _require_unicode(text)
        return text


# ------------------------------------------------------------------ OpenAI's Responses API


class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Request):
    """One item of ``input``: a message as ``responses.create`` takes it (the easy form with
    ``role``/``content`` or the typed ``{"type": "message", ...}`` item)."""

    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TextFormat(_Request):
    type: Literal["text"]


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    """``POST /v1/responses``: text in, text out. Nothing is stored, so a
    ``previous_response_id`` is a 400."""

    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # vLLM's extension: reproducible sampling
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must not be empty or whitespace only")
            _require_unicode(value)
        elif not value:
            raise ValueError("must be a string or a non-empty list of input items")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("not supported: the served base model does not call tools")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice not in (None, "none", "auto"):
            raise ValueError("not supported: no tools (only null, 'none' or 'auto')")
        return choice

    @property
    def messages(self) -> list[InputMessage]:
        """``instructions`` (as a system message) and the input, as chat messages."""
        items = (
            [InputMessage(role="user", content=self.input)]
            if isinstance(self.input, str)
            else list(self.input)
        )
        if self.instructions:
            items.insert(0, InputMessage(role="system", content=self.instructions))
        return items


# ------------------------------------------------------------------ tokenize (as vLLM has them)


class TokenizeRequest(_Request):
    """``POST /tokenize``: ``prompt`` (completions form) or ``messages`` (chat form)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.prompt is not None:
            _require_unicode(self.prompt)
        return self


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------ responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Identified(BaseModel):
    """What every body and chunk of one completion repeats (``handlers.common.response_ident``)."""

    id: str
    object: str
    created: int
    model: str
    # "<registered name>/<version>": which model version served this response
    system_fingerprint: str
    model_version: str


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # vLLM: the stop string or stop token id that ended the text (null for EOS or length)
    stop_reason: str | int | None = None


class CompletionResponse(Identified):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(Identified):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ScoreResponse(BaseModel):
    object: Literal["score"] = "score"
    model: str
    model_version: str
    tokens: list[str]
    token_ids: list[int]
    # log p(token_i | tokens_<i); the first token has no context, so None
    token_logprobs: list[float | None]
    total_logprob: float
    perplexity: float
    usage: Usage


# ------------------------------------------------------------------ stream chunks


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = None


class CompletionStreamResponse(Identified):
    """One server-sent event of a streamed completion."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(Identified):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------ responses (Responses API)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    """The ``response`` object of ``POST /v1/responses`` (and of its stream's events)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    model_version: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    store: bool = False
    temperature: float
    top_p: float
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponseUsage | None = None


class ResponseEvent(BaseModel):
    """One server-sent event of a streamed response (``type`` names it, as OpenAI emits them)."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    content_index: int | None = None
    item_id: str | None = None
    item: OutputMessage | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[Any] | None = None


# ------------------------------------------------------------------ tokenize


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


# ------------------------------------------------------------------ probes


class HealthResponse(BaseModel):
    status: Literal["alive"] = "alive"
    replica: str
    pid: int
    ready_at: float | None
    first_request_at: float | None


class ReadyResponse(BaseModel):
    ready: Literal[True] = True
    model: str
    replica: str
    versions: dict[str, str]
    queued_sequences: int
    last_error: str | None = None
    # digest of the user_config this replica serves (serving.replica.settings_digest)
    settings: str | None = None


class NotReadyResponse(BaseModel):
    ready: Literal[False] = False
    reason: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeops"
    version: str
    alias: str | None = None
    traffic_share: float
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
