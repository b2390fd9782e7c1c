"""Waiting for a deployed application to answer: poll a JSON endpoint until its body is right."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def poll_json(
    url: str, accept: Callable[[dict], bool], timeout_s: float, interval_s: float
) -> dict:
    """GET ``url`` every ``interval_s`` until it answers 200 with a body ``accept`` takes; returns
    that body. TimeoutError names the last answer (status and body, or the connection error)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5.0)
            last = f"{response.status_code} {response.text[:300]}"
            if response.status_code == 200 and accept(body := response.json()):
                return body
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(interval_s)
    raise TimeoutError(f"{url}: not as expected after {timeout_s:.0f}s; last answer: {last}")
