"""Print infra/runtime_env.yaml as JSON for `ray job submit --runtime-env-json`, adding what a
job needs from your shell without writing it to any file:

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json "$(python infra/runtime_env_json.py)" -- python -m pipelines.run
        experiment=gpu_small

- the tracking URI, MLflow auth, object-store credentials and moeops' own settings, taken from
  the environment variables in FORWARDED_ENV that are set here (unset ones are left out);
- with ``--pip``, the project's dependencies from pyproject.toml, for a cluster running a stock
  ``rayproject/ray`` image (each node installs them once into a cached virtualenv).

``--write-pip-yaml`` regenerates ``infra/runtime_env.pip.yaml`` (the same runtime env as
``infra/runtime_env.yaml`` plus those dependencies, for ``--runtime-env``); ``--check-pip-yaml``
exits 1 when that file has drifted from pyproject.toml or runtime_env.yaml (``make render``
regenerates it, a test fails on drift).

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
PIP_RUNTIME_ENV = REPO / "infra" / "runtime_env.pip.yaml"
PIP_HEADER = """\
# GENERATED from infra/runtime_env.yaml and pyproject.toml's dependencies: do not edit.
# Regenerate with `python infra/runtime_env_json.py --write-pip-yaml` (or `make render`);
# tests/unit/infra/test_infra_cluster_files.py fails when it drifts.
#
# For a cluster running a stock rayproject/ray image (docs/cluster.md, "Any existing Ray cluster"):
#
#   ray job submit --address http://<head>:8265 --working-dir . \\
#       --runtime-env infra/runtime_env.pip.yaml -- python -m pipelines.run experiment=gpu_small
#
# Each node installs the dependencies once into a virtualenv that Ray caches per runtime env;
# torch comes from PyPI (the CUDA build). Credentials are not here: see runtime_env.yaml.
"""
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MOEOPS_BUCKET",
    "MOEOPS_CORPUS",
    "MOEOPS_S3_ENDPOINT",
    "MOEOPS_API_TOKEN",
)


def project_requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def runtime_env(environ: dict[str, str], pip: bool = False) -> dict:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["env_vars"] = {
        **env.get("env_vars", {}),
        **{k: environ[k] for k in FORWARDED_ENV if environ.get(k)},
    }
    if pip:
        env["pip"] = {"packages": project_requirements(), "pip_check": False}
    return env


def pip_runtime_env_yaml() -> str:
    """The text of infra/runtime_env.pip.yaml: runtime_env.yaml plus the project's dependencies."""
    env = runtime_env({}, pip=True)
    return PIP_HEADER + yaml.safe_dump(env, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python infra/runtime_env_json.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--pip", action="store_true", help="add pyproject.toml's dependencies (stock Ray image)"
    )
    parser.add_argument(
        "--write-pip-yaml",
        action="store_true",
        help=f"regenerate {PIP_RUNTIME_ENV.relative_to(REPO)}",
    )
    parser.add_argument(
        "--check-pip-yaml",
        action="store_true",
        help=f"exit 1 if {PIP_RUNTIME_ENV.relative_to(REPO)} differs from a fresh generation",
    )
    args = parser.parse_args(argv)
    if args.write_pip_yaml:
        PIP_RUNTIME_ENV.write_text(pip_runtime_env_yaml())
        print(f"wrote {PIP_RUNTIME_ENV.relative_to(REPO)}")
        return 0
    if args.check_pip_yaml:
        current = PIP_RUNTIME_ENV.read_text() if PIP_RUNTIME_ENV.exists() else ""
        if current != pip_runtime_env_yaml():
            print(
                f"{PIP_RUNTIME_ENV.relative_to(REPO)} is out of date: run python "
                "infra/runtime_env_json.py "
                "--write-pip-yaml",
                file=sys.stderr,
            )
            return 1
        return 0
    print(json.dumps(runtime_env(dict(os.environ), pip=args.pip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
