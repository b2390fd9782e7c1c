"""The replica's ASGI middlewares, outermost first: client-gone translation, first-request
stamp, bearer-token auth, body guard.

Plain ASGI (no ``BaseHTTPMiddleware``): each adds one function call per request, and none
buffers a streamed response.

- **Client gone**: Ray Serve 2.60 raises ``TaskCancelledError`` from ``receive`` when its proxy
  cancels a request; ASGI says a gone client is an ``http.disconnect`` message.
- **First request**: when the replica's first HTTP request arrived (tests check it against the
  warm-up: a replica takes no traffic before it is ready).
- **Auth**: optional bearer token on every route except the health probes. The token never lives
  in a config file: ``serve.auth_token_env`` names the environment variable that holds it (empty
  or unset: auth is off). Kubernetes and load balancers probe ``/healthz`` and ``/readyz`` without
  credentials, so those stay open.
- **Body guard**: oversized and non-UTF-8 bodies are rejected before any parsing; reading the body
  here (bounded by ``serve.max_body_bytes``) means a client cannot make a replica buffer an
  arbitrarily large upload; the checked body is replayed to the app.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import TaskCancelledError

from serving.errors import error_body

OPEN_PATHS = ("/healthz", "/readyz")


def token_from_env(env_name: str) -> str | None:
    token = os.environ.get(env_name, "") if env_name else ""
    return token or None


class BearerAuthMiddleware:
    """ASGI middleware: 401 in the OpenAI error shape unless ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if self.token is None or scope["type"] != "http" or _path(scope).rstrip("/") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            return await self.app(scope, receive, send)
        reason = "missing bearer token" if not header else "invalid bearer token"
        await send_json(
            send,
            401,
            error_body(
                f"{reason}: send 'Authorization: Bearer <token>'",
                type="authentication_error",
                code="invalid_api_key",
            ),
            extra_headers=[(b"www-authenticate", b"Bearer")],
        )


def _path(scope) -> str:
    """Path within the app: Serve mounts the app under its route prefix (``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def send_json(
    send, status: int, body: dict, extra_headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodyGuardMiddleware:
    """413 over ``serve.max_body_bytes``, 400 for a body that is not UTF-8."""

    def __init__(self, app, max_body_bytes: int | Callable[[], int]):
        """``max_body_bytes``: the limit, or a function returning the current one (it can change in
        place)."""
        self.app = app
        self._limit = max_body_bytes if callable(max_body_bytes) else (lambda: max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self._limit()
        too_large = error_body(
            f"request body exceeds serve.max_body_bytes ({limit} bytes)", code="body_too_large"
        )
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_json(send, 413, too_large)

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_json(send, 413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            return await send_json(
                send,
                400,
                error_body(
                    f"request body is not UTF-8 text (invalid byte at offset {err.start})",
                    code="invalid_encoding",
                ),
            )

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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

    def __init__(self, app, replica: Any):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.replica.first_request_at is None:
            self.replica.first_request_at = time.time()
        await self.app(scope, receive, send)
