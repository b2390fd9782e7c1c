"""Shared fixtures: one local Ray per test session, a fresh sqlite MLflow store per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.ray_start import start_with_retries
from fixtures.tiny import SMALL_DATA
from pipelines.runtime import API_SERVER_ENV, WORKER_ENV, free_port

# Set before Ray starts: the worker environment the pipeline's ensure_ray sets (one definition),
# plus what the test session wants of Ray.
for _key, _value in WORKER_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# train and tune runs log MLflow system metrics; sample often enough for the tests' short stages
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")

pytest_plugins = ["fixtures.mlflow_server", "fixtures.s3"]

RAY_NUM_CPUS = 4  # logical; the machine has 2 real cores


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moeops-session")


@dataclass(frozen=True)
class SharedDataset:
    overrides: list[str]  # SMALL_DATA and the shared cold tier: a prepare stage run with them
    manifest: object  # components.data.manifest.Manifest of the committed data set


@pytest.fixture(scope="session")
def small_dataset(session_tmp) -> SharedDataset:
    """The SMALL_DATA data set (fixtures/tiny.py), tokenized and committed once per session in a
    cold tier the tests share. Tests that train read its manifest; a prepare stage run with
    ``overrides`` finds it committed and reuses it instead of encoding it again."""
    from components.config import load_config
    from components.data.build import prepare_dataset

    overrides = [*SMALL_DATA, f"storage.cold_uri={session_tmp / 'shared-cold'}"]
    config = load_config([*overrides, f"paths.root={session_tmp / 'shared'}"])
    return SharedDataset(overrides, prepare_dataset(config.data, config.storage).manifest)


@pytest.fixture(scope="session")
def ray_session(session_tmp):
    """The one Ray for the whole test session (loopback only)."""
    import ray

    if not ray.is_initialized():
        dashboard_port = free_port()
        # as pipelines.runtime.ensure_ray does: in-cluster state API clients (Train's
        # placement-group
        # cleaner) must find this cluster, not fail on the other Ray instances of the machine
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
        # retried: on the loaded 2-core machine Ray's fixed 30 s node start-up wait runs out
        start_with_retries(
            lambda: ray.init(
                num_cpus=RAY_NUM_CPUS,
                num_gpus=0,
                # Ray Train's placement-group cleaner needs the state API the dashboard serves (see
                # pipelines/runtime.py); loopback only, on a free port.
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                object_store_memory=400 * 1024**2,
                namespace="moeops-tests",
                # private on purpose, as in pipelines/runtime.py: ray.init has no public way to keep
                # a
                # local node on loopback (`ray start --node-ip-address` starts a detached cluster)
                _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": dict(WORKER_ENV)},
                log_to_driver=True,
            ),
            cleanup=ray.shutdown,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The one HTTP port of Ray Serve in this session: Serve's proxy options are fixed at its
    first start, so every test that deploys must use this port (override serve.port with it)."""
    return free_port()


@pytest.fixture(scope="session")
def mlflow_template(session_tmp) -> Path:
    """An empty sqlite tracking store, created once per session: creating one runs all of MLflow's
    schema migrations (4-6 s at load 8-12 on the 2 cores); a copy opens in ~0.3 s."""
    from mlflow import MlflowClient

    path = session_tmp / "mlflow-template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def new_mlflow_store(mlflow_template) -> Callable[[Path], str]:
    """``new_mlflow_store(path)``: a fresh, empty sqlite tracking store at ``path`` (a copy of the
    session's template, as MLflow would create it) and its URI."""

    def make(path: Path) -> str:
        shutil.copyfile(mlflow_template, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, new_mlflow_store) -> str:
    """A fresh sqlite tracking store for one test; also exported for any subprocess."""
    uri = new_mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def root_overrides(tmp_path, mlflow_uri) -> list[str]:
    """Hydra overrides that keep a test's state under its tmp dir."""
    return [
        f"paths.root={tmp_path / 'moeops'}",
        f"tracking.uri={mlflow_uri}",
        f"tracking.artifact_location={(tmp_path / 'mlartifacts').as_uri()}",
    ]
