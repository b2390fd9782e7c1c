"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.

FastAPI's own 422 bodies list pydantic internals; clients written for OpenAI expect a
400 whose ``param`` names the offending field, so every validation problem is turned
into that shape here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error a handler raises to answer with a given status and OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code),
        status_code=err.status,
        headers=err.headers,
    )


def _field_name(loc: tuple) -> str | None:
    """``("body", "prompt", 2)`` -> ``"prompt[2]"``; pydantic union branch names are dropped."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and (
            "[" in item or item in ("str", "int", "float", "bool", "list")
        ):
            continue  # "list[str]", "function-after[...]": names of union branches, not fields
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request body, phrased for a person."""
    # an unknown field usually explains a "missing" one (a typo), so it is reported first
    errors = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    kind, param = first.get("type", ""), _field_name(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return APIError(
            400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json"
        )
    if kind == "extra_forbidden":
        unknown = [_field_name(tuple(e.get("loc", ()))) for e in errors if e.get("type") == kind]
        listed = ", ".join(repr(name) for name in unknown)
        noun = "field" if len(unknown) == 1 else "fields"
        return APIError(400, f"unknown {noun} {listed}", param=param, code="unknown_field")
    if kind == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing_field")
    if param is None:
        return APIError(
            400, f"request body must be a JSON object: {first.get('msg')}", code="invalid_body"
        )
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(
        400,
        f"invalid value for {param!r}: {msg} (got {first.get('input')!r})"[:500],
        param=param,
        code="invalid_value",
    )


def install_error_handlers(
    app: FastAPI, on_error: Callable[[Request, int, str | None], None] | None = None
) -> None:
    """OpenAI-shaped bodies for every error; ``on_error(request, status, code)`` counts them
    (metrics)."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(request, err.status, err.code)
        return error_response(err)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(request, APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug must cost one request, never the replica.
        return respond(
            request,
            APIError(
                500,
                f"internal error: {type(exc).__name__}: {exc}",
                type="server_error",
                code="internal_error",
            ),
        )
