"""The files a cluster run starts from: the `ray job submit` runtime env (small upload, no secrets),
its JSON helper, the cluster-launcher YAML and the image recipe."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.runtime_env.packaging import (
    GCS_STORAGE_MAX_SIZE,
    PACKAGE_SIZE_WARNING,
    _zip_files,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from infra.render import RAY_VERSION

REPO = Path(__file__).resolve().parents[3]
INFRA = REPO / "infra"
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|_TOKEN\b|ACCESS_KEY|MLFLOW_TRACKING_URI|^AWS_)")


def load_helper():
    spec = importlib.util.spec_from_file_location("runtime_env_json", INFRA / "runtime_env_json.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load((INFRA / "runtime_env.yaml").read_text())


def test_runtime_env_has_no_secrets(runtime_env):
    assert set(runtime_env) == {"working_dir", "excludes", "env_vars"}
    assert all(
        isinstance(v, str) for v in runtime_env["env_vars"].values()
    )  # Ray requires str values
    leaked = [key for key in runtime_env["env_vars"] if SECRET_NAME.search(key)]
    assert not leaked, (
        f"credentials and the tracking URI come from the environment, not the file: {leaked}"
    )


def test_runtime_env_does_not_collide_with_the_drivers(runtime_env):
    # ray.init inside a submitted job merges its runtime env with the job's and fails on shared
    # keys.
    from pipelines.runtime import WORKER_ENV

    assert not set(runtime_env["env_vars"]) & set(WORKER_ENV)


def test_upload_respects_excludes_and_stays_under_rays_limit(runtime_env, tmp_path):
    # Ray would also honour .gitignore; the excludes alone must keep the upload small.
    package = tmp_path / "working_dir.zip"
    _zip_files(str(REPO), runtime_env["excludes"], str(package), include_gitignore=False)
    size = package.stat().st_size
    assert size < GCS_STORAGE_MAX_SIZE, (
        f"{size} bytes >= Ray's working_dir limit {GCS_STORAGE_MAX_SIZE}"
    )
    assert size < PACKAGE_SIZE_WARNING / 16, (
        f"{size} bytes: something large slipped past the excludes"
    )
    names = zipfile.ZipFile(package).namelist()
    for needed in (
        "pipelines/run.py",
        "components/config/schema.py",
        "conf/config.yaml",
        "serving/app.py",
    ):
        assert needed in names, f"{needed} missing from the upload"
    top = {name.split("/")[0] for name in names}
    for excluded in (".git", ".venv", ".moeops", "mlruns", "mlartifacts", "mlflow.db"):
        assert excluded not in top
    assert not [
        n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/checkpoints/" in n
    ]


def test_json_helper_forwards_only_set_variables(monkeypatch):
    helper = load_helper()
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
        "AWS_ACCESS_KEY_ID": "AKIA-test",
        "AWS_SECRET_ACCESS_KEY": "",
        "HOME": "/root",
        "UNRELATED": "x",
    }
    env = helper.runtime_env(environ)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["env_vars"]["AWS_ACCESS_KEY_ID"] == "AKIA-test"
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"] and "HOME" not in env["env_vars"]
    assert env["excludes"] == yaml.safe_load((INFRA / "runtime_env.yaml").read_text())["excludes"]
    assert "pip" not in env
    assert helper.runtime_env({}, pip=True)["pip"]["packages"] == pyproject_dependencies()


def test_pip_runtime_env_is_generated_from_pyproject_without_drift():
    helper = load_helper()
    checked_in = (INFRA / "runtime_env.pip.yaml").read_text()
    assert checked_in == helper.pip_runtime_env_yaml(), (
        "infra/runtime_env.pip.yaml is out of date: run `python infra/runtime_env_json.py "
        "--write-pip-yaml`"
    )
    env = yaml.safe_load(checked_in)
    base = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert {k: env[k] for k in base} == base, "the same runtime env as runtime_env.yaml, plus pip"
    assert env["pip"]["packages"] == pyproject_dependencies()
    assert "infra/runtime_env.pip.yaml" in (INFRA / "runtime_env.yaml").read_text()
    result = subprocess.run(
        [sys.executable, str(INFRA / "runtime_env_json.py"), "--check-pip-yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_json_helper_cli_prints_json():
    result = subprocess.run(
        [sys.executable, str(INFRA / "runtime_env_json.py"), "--pip"],
        capture_output=True,
        text=True,
        env={"MOEOPS_BUCKET": "my-bucket", "PATH": "/usr/bin"},
        timeout=60,
        check=True,
    )
    env = json.loads(result.stdout)
    assert env["env_vars"]["MOEOPS_BUCKET"] == "my-bucket"
    assert any(p.startswith("ray[") for p in env["pip"]["packages"])


def test_cluster_launcher_yaml_validates_against_rays_schema():
    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(
        prepare_config(config)
    )  # with the AWS provider's defaults filled in, as `ray up` does
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(
        t["node_config"]["InstanceType"].startswith(("p5", "p4", "g5", "g6")) for t in gpu_types
    )
    assert all(t["max_workers"] >= 1 for t in gpu_types)
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert any("pip install" in c and "/home/ray/moeops" in c for c in config["setup_commands"])
    assert not SECRET_NAME.search(
        yaml.safe_dump(config["head_start_ray_commands"] + config["setup_commands"])
    )


def test_image_recipe_matches_the_pinned_ray():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    assert f"ray[train,serve,tune]=={RAY_VERSION}" in pyproject_dependencies()
    for folder in ("components", "pipelines", "serving", "conf"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in dockerfile
    assert "PYTHONPATH=/home/ray/moeops" in dockerfile
