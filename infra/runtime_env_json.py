"""Print infra/runtime_env.yaml as JSON for `ray job submit --runtime-env-json`, adding what a
job needs from your shell without writing it to any file:

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json "$(python infra/runtime_env_json.py)" -- python -m pipelines.run experiment=gpu_small

- the tracking URI, MLflow auth, object-store credentials and moeops' own settings, taken from
  the environment variables in FORWARDED_ENV that are set here (unset ones are left out);
- with ``--pip``, the project's dependencies from pyproject.toml, for a cluster running a stock
  ``rayproject/ray`` image (each node installs them once into a cached virtualenv).

Anyone who can read the cluster's dashboard can read a job's runtime env: on a shared cluster,
give the nodes their credentials instead (Kubernetes Secret, instance role) and use
``--runtime-env infra/runtime_env.yaml`` as is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "infra" / "runtime_env.yaml"
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
    "MOEOPS_BUCKET", "MOEOPS_CORPUS", "MOEOPS_S3_ENDPOINT", "MOEOPS_API_TOKEN",
)


def project_requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def runtime_env(environ: dict[str, str], pip: bool = False) -> dict:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["env_vars"] = {**env.get("env_vars", {}), **{k: environ[k] for k in FORWARDED_ENV if environ.get(k)}}
    if pip:
        env["pip"] = {"packages": project_requirements(), "pip_check": False}
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/runtime_env_json.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pip", action="store_true", help="add pyproject.toml's dependencies (stock Ray image)")
    args = parser.parse_args(argv)
    print(json.dumps(runtime_env(dict(os.environ), pip=args.pip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
