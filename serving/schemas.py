"""Request and response bodies of the HTTP API, in the OpenAI completions convention.

Every request model forbids unknown fields and is strict about types, so a typo or a
string where a number belongs is a 400 naming the field instead of a silent default.
Limits that depend on the deployment's config (``serve.max_tokens`` ...) are checked in
:mod:`serving.limits`, after parsing, because pydantic models are static.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4


def _require_unicode(text: str, where: str = "") -> None:
    """JSON escapes can smuggle lone surrogates (``"\\ud800"``) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"is not valid Unicode text{where}: {err.reason} at position {err.start}") from None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    # the served model name (canary routing) or "<name>@<alias>" to pin a version; default: the served model
    model: Optional[str] = None
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # accepted for client compatibility; only one completion per prompt is generated
    n: int = Field(1, ge=1, le=1)
    user: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Union[str, list[str]]) -> Union[str, list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts:
            raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")
        for i, text in enumerate(prompts):
            where = "" if isinstance(prompt, str) else f" (item {i})"
            if not text.strip():
                raise ValueError(f"must not be empty or whitespace only{where}")
            _require_unicode(text, where)
        return prompt

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: Union[str, list[str], None]) -> Optional[list[str]]:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ScoreRequest(_Request):
    """``POST /v1/score``: log-probability of every token of ``text`` given the tokens before it."""

    model: Optional[str] = None
    text: str

    @field_validator("text")
    @classmethod
    def _text_not_empty(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty or whitespace only")
        _require_unicode(text)
        return text


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    # "<registered name>/<version>": which model version served this response
    system_fingerprint: str
    model_version: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ScoreResponse(BaseModel):
    object: Literal["score"] = "score"
    model: str
    model_version: str
    tokens: list[str]
    token_ids: list[int]
    # log p(token_i | tokens_<i); the first token has no context, so None
    token_logprobs: list[Optional[float]]
    total_logprob: float
    perplexity: float
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeops"
    version: str
    alias: Optional[str] = None
    traffic_share: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
