"""Per-deployment request limits (``serve.*``), checked after the body parsed.

Each check names the field it rejects, so clients get ``param`` in the error body.
"""
from __future__ import annotations

from serving.errors import APIError
from serving.schemas import CompletionRequest


def _invalid(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def effective_max_tokens(request: CompletionRequest, serve_cfg) -> int:
    """The client's ``max_tokens``; when it sent none, the OpenAI default capped by ``serve.max_tokens``."""
    if "max_tokens" in request.model_fields_set:
        return request.max_tokens
    return min(request.max_tokens, serve_cfg.max_tokens)


def check_completion(request: CompletionRequest, serve_cfg, engine) -> tuple[list[list[int]], int]:
    """(token ids of every prompt, max_tokens), or an APIError naming the first limit broken."""
    prompts = request.prompts
    max_tokens = effective_max_tokens(request, serve_cfg)
    if len(prompts) > serve_cfg.max_prompts:
        raise _invalid(f"'prompt' holds {len(prompts)} prompts; at most serve.max_prompts={serve_cfg.max_prompts}",
                       "prompt", "too_many_prompts")
    if max_tokens > serve_cfg.max_tokens:
        raise _invalid(f"'max_tokens'={max_tokens} exceeds the limit serve.max_tokens={serve_cfg.max_tokens}",
                       "max_tokens")
    encoded = []
    for i, text in enumerate(prompts):
        param = "prompt" if isinstance(request.prompt, str) else f"prompt[{i}]"
        ids = engine.encode(text)
        if not ids:
            raise _invalid(f"{param!r} encodes to no tokens", param, "empty_prompt")
        if len(ids) > serve_cfg.max_prompt_tokens:
            raise _invalid(f"{param!r} is {len(ids)} tokens; at most serve.max_prompt_tokens="
                           f"{serve_cfg.max_prompt_tokens}", param, "prompt_too_long")
        if len(ids) + max_tokens > engine.max_seq_len:
            raise _invalid(f"{param!r} ({len(ids)} tokens) + 'max_tokens' ({max_tokens}) exceeds the "
                           f"model's context of {engine.max_seq_len} tokens", "max_tokens", "context_length_exceeded")
        encoded.append(ids)
    return encoded, max_tokens


def check_score_text(token_ids: list[int], serve_cfg, engine) -> None:
    limit = min(serve_cfg.max_prompt_tokens + serve_cfg.max_tokens, engine.max_seq_len)
    if len(token_ids) < 2:
        raise _invalid("'text' must encode to at least 2 tokens to be scored", "text", "text_too_short")
    if len(token_ids) > limit:
        raise _invalid(f"'text' is {len(token_ids)} tokens; at most {limit} can be scored", "text", "text_too_long")
