"""Reject oversized and non-UTF-8 request bodies before any parsing.

Reading the body here (bounded by ``serve.max_body_bytes``) means a client cannot make
a replica buffer an arbitrarily large upload; the checked body is replayed to the app.
"""

from __future__ import annotations

from collections.abc import Callable

from serving.auth import send_json
from serving.errors import error_body


class BodyGuardMiddleware:
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
