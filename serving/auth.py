"""Optional bearer-token protection of every route except the health probes.

The token never lives in a config file: ``serve.auth_token_env`` names the environment
variable that holds it (empty or unset: auth is off). Kubernetes and load balancers
probe ``/healthz`` and ``/readyz`` without credentials, so those stay open.
"""

from __future__ import annotations

import hmac
import json
import os

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
