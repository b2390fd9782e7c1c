"""Start Serve, deploy moeops' application, wait until it is ready (deploy stage, tests,
benchmark)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve

from components.config import Config
from serving.app import make_application
from serving.deploy.config import serve_config, user_config
from serving.deploy.wait import poll_json
from serving.replica import settings_digest

PROXY_START_TIMEOUT_S = 180.0


def ensure_serve(host: str, port: int, proxy_location: str = "HeadOnly") -> str:
    """Start Serve's HTTP proxy on host:port, or reuse the running one; returns its base URL.

    HTTP options are per cluster and fixed once Serve runs: if Serve already runs but its proxy
    does not answer on host:port, that is an error naming the requested port (not ignored silently).
    """
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{connect_host}:{int(port)}"
    if not serve.status().proxies:  # no Serve controller on this cluster yet
        try:
            serve.start(
                proxy_location=proxy_location, http_options={"host": host, "port": int(port)}
            )
        except ray.exceptions.RayActorError as err:
            # On an overloaded machine the first proxy can miss its readiness deadline; the
            # controller then replaces it (with a longer deadline), so wait for that one.
            print(
                f"[serve] first HTTP proxy did not come up ({type(err).__name__}); "
                "waiting for its replacement",
                flush=True,
            )
        _wait_for_proxies(PROXY_START_TIMEOUT_S)
    if not _proxy_answers(base):
        raise RuntimeError(
            f"Serve runs on this Ray cluster but its HTTP proxy does not answer at {base}: HTTP "
            "options are fixed for the life of a Serve instance, so serve.host/serve.port must "
            "match the running one (or `serve shutdown` first)"
        )
    return base


def _proxy_answers(base: str, timeout_s: float = 30.0) -> bool:
    """Serve's proxy answers ``/-/routes`` (200 with its route table; 503 while no app is
    deployed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/-/routes", timeout=5.0).status_code in (200, 503):
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _wait_for_proxies(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    states: dict = {}
    while time.monotonic() < deadline:
        states = {
            node: str(getattr(state, "value", state))
            for node, state in serve.status().proxies.items()
        }
        if states and all(state == "HEALTHY" for state in states.values()):
            return
        time.sleep(1.0)
    raise TimeoutError(f"Serve's HTTP proxies not healthy after {timeout_s:.0f}s: {states}")


def deploy(
    config: Config,
    model_uri: str | None = None,
    *,
    revision: str = "",
    name: str | None = None,
    route_prefix: str | None = None,
) -> str:
    """``serve.run`` the app (non-blocking); returns the application's base URL (without /v1).

    A redeploy of a running app is Serve's rolling update: the replacements start beside the old
    replicas (``serve.max_surge_percent``) and take traffic once warm; the old ones finish what they
    run.
    """
    base = ensure_serve(config.serve.host, config.serve.port, config.serve.proxy_location)
    prefix = route_prefix if route_prefix is not None else config.serve.route_prefix
    serve.run(
        make_application(config, model_uri, revision),
        name=name or config.serve.app_name,
        route_prefix=prefix,
        blocking=False,
    )
    return base + ("" if prefix == "/" else prefix.rstrip("/"))


def apply_config(
    config: Config,
    dashboard_url: str,
    model_uri: str | None = None,
    *,
    revision: str = "",
    args_from: Config | None = None,
) -> str:
    """Deploy or update the app declaratively: ``serve deploy`` of the Serve config file (Ray's
    public CLI, which sends it to the Serve REST API of the cluster's dashboard and adds Ray's
    auth token); returns the app's base URL once the replicas serve these settings.

    Unlike ``serve.run``, an update that changes only ``user_config`` (the ``serve`` and
    ``registry`` sections: limits, canary, quantisation, a new alias target) reaches the running
    replicas in place through ``reconfigure``: no replica is replaced, as long as the file's
    ``args`` stay those of the first deployment (``args_from``). Other applications of the
    cluster are left alone unless they too were deployed from a config file (Serve then deletes
    the ones missing from this file, which holds only this app).
    """
    base = ensure_serve(config.serve.host, config.serve.port, config.serve.proxy_location)
    document = serve_config(config, model_uri, revision=revision, args_from=args_from)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="serve-config-") as file:
        yaml.safe_dump(document, file, sort_keys=False)
        file.flush()
        command = [_serve_cli(), "deploy", file.name, "--address", dashboard_url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"serve deploy failed: {(result.stderr or result.stdout)[-2000:]}")
    prefix = config.serve.route_prefix
    app_url = base + ("" if prefix == "/" else prefix.rstrip("/"))
    wait_ready(app_url, expect_settings=settings_digest(user_config(config, model_uri, revision)))
    return app_url


def _serve_cli() -> str:
    """Ray's ``serve`` command of this interpreter's environment."""
    beside = Path(sys.executable).with_name("serve")
    found = str(beside) if beside.exists() else shutil.which("serve")
    if not found:
        raise FileNotFoundError("Ray's `serve` command is not installed beside this Python")
    return found


def wait_ready(
    app_url: str,
    timeout_s: float = 180.0,
    expect_version: str | None = None,
    expect_settings: str | None = None,
) -> dict:
    """Poll ``/readyz`` until 200 (and, if given, the champion is ``expect_version`` and the
    replica serves the ``user_config`` whose :func:`settings_digest` is ``expect_settings``);
    returns its body."""

    def expected(body: dict) -> bool:
        champion = next(iter(body.get("versions", {}).values()), None)
        version_ok = expect_version is None or champion == str(expect_version)
        return version_ok and (expect_settings is None or body.get("settings") == expect_settings)

    return poll_json(f"{app_url}/readyz", expected, timeout_s, interval_s=0.5)
