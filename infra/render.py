"""Render the Kubernetes (KubeRay) manifests from the one config, so they cannot drift from it.

    python -m infra.render                       # re-render the checked-in infra/k8s/ tree
    python -m infra.render --check               # exit 1 if infra/k8s/ differs from a fresh
    render
    python -m infra.render --out build/k8s experiment=gpu_multinode
    cluster.k8s.image=REG/moeops:0.1.0

Each rendering holds a RayJob (the pipeline, entrypoint ``python -m pipelines.run`` with the same
overrides), a RayService whose ``serveConfigV2`` is :func:`serving.deploy.config.serve_config` of
the
same config (what the deploy stage uses locally), and, unless ``cluster.k8s.tracking_uri`` points at
an existing server, an MLflow tracking server with a PostgreSQL backend and S3 artifacts.
Secrets are never rendered: pods read them from the Secret named by ``cluster.k8s.secret_name``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from components.config import Config, ConfigError, load_config
from pipelines.runtime import WORKER_ENV
from serving.deploy.config import serve_config

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "infra" / "k8s"
RAY_VERSION = "2.60.0"
MLFLOW_PORT = 5000
POSTGRES_PORT = 5432
MLFLOW_SERVICE = "moeops-mlflow"
POSTGRES_SERVICE = "moeops-postgres"
# Inside the pods: node-local scratch (warm cache, stage work dirs); durable state is in S3/MLflow.
POD_ROOT = "/tmp/moeops"

# The checked-in overlays (infra/k8s/overlays/<name>) and the overrides they are rendered from.
PRESETS: dict[str, list[str]] = {
    "gpu": ["experiment=gpu_small"],
    "cpu": [
        "experiment=tiny",
        "cluster=remote",
        "storage=s3",
        "tracking=server",
        "train.checkpoint_uri=s3://moeops/checkpoints",
        "cluster.k8s.image=moeops:latest-cpu",
        "cluster.k8s.gpus_per_node=0",
        "cluster.k8s.head_cpus=2",
        "cluster.k8s.head_memory=8Gi",
        "cluster.k8s.worker_cpus=8",
        "cluster.k8s.worker_memory=16Gi",
    ],
}
# Environment variables the config reads at composition time (conf/ `oc.env`); the checked-in
# tree is rendered without them so it is the same on every machine.
CONFIG_ENV_VARS = (
    "MOEOPS_HOME",
    "MOEOPS_BUCKET",
    "MOEOPS_CORPUS",
    "MOEOPS_S3_ENDPOINT",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
)
# Stages a RayJob runs: its cluster is deleted when the job ends, so serving is the RayService's
# job.
JOB_EXCLUDED_STAGES = ("deploy",)


# ---------------------------------------------------------------- config


def tracking_uri(config: Config) -> str:
    """The MLflow server every pod talks to: the rendered one unless an existing one is
    configured."""
    k8s = config.cluster.k8s
    if k8s.tracking_uri:
        return k8s.tracking_uri
    return f"http://{MLFLOW_SERVICE}.{k8s.namespace}.svc.cluster.local:{MLFLOW_PORT}"


def _keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def cluster_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` plus what every in-cluster process needs, unless the caller set it already."""
    base = load_config(overrides)
    forced = {
        "cluster": "remote",
        "paths.root": POD_ROOT,
        "tracking.uri": tracking_uri(base),
        # KubeRay's Serve service targets the pod IP on port 8000.
        "serve.host": "0.0.0.0",
        "serve.port": "8000",
    }
    given = _keys(overrides)
    return list(overrides) + [f"{key}={value}" for key, value in forced.items() if key not in given]


def load_cluster_config(overrides: list[str]) -> tuple[Config, list[str]]:
    full = cluster_overrides(overrides)
    config = load_config(full)
    problems = []
    if config.cluster.mode != "remote":
        problems.append(f"cluster.mode='{config.cluster.mode}': manifests need cluster=remote")
    if config.serve.port != 8000:
        problems.append(f"serve.port={config.serve.port}: KubeRay serves on port 8000")
    # Pods share no disk: what one stage writes, another pod (or the next job) must read.
    for key, uri in (
        ("storage.cold_uri", config.storage.cold_uri),
        ("train.checkpoint_uri", config.train.checkpoint_uri),
    ):
        if "://" not in uri or uri.startswith("file://"):
            problems.append(
                f"{key}={uri!r}: pods share no local disk; use an object store (storage=s3, s3://...)"
            )
    if problems:
        raise ConfigError(problems)
    return config, full


# ---------------------------------------------------------------- pods


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "moeops", "app.kubernetes.io/component": component}


def _metadata(config: Config, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": config.cluster.k8s.namespace, "labels": _labels(component)}


def _ray_env(config: Config) -> list[dict[str, str]]:
    env = {
        "MOEOPS_HOME": POD_ROOT,
        "MLFLOW_TRACKING_URI": config.tracking.uri,
        **WORKER_ENV,
    }
    if config.storage.endpoint_url:
        env["MOEOPS_S3_ENDPOINT"] = config.storage.endpoint_url
    env.update({k: str(v) for k, v in config.train.nccl_env.items()})  # NCCL, flight recorder
    return [{"name": k, "value": v} for k, v in env.items()]


def _ray_container(
    config: Config, name: str, cpus: int, memory: str, gpus: int, ports: list[dict]
) -> dict:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container = {
        "name": name,
        "image": config.cluster.k8s.image,
        "imagePullPolicy": "IfNotPresent",
        "env": _ray_env(config),
        # optional: clusters with workload identity (IRSA, GKE WI) need no keys
        "envFrom": [{"secretRef": {"name": config.cluster.k8s.secret_name, "optional": True}}],
        # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        # requests == limits: Ray sizes its logical resources from the limits
        "resources": {"requests": dict(limits), "limits": limits},
    }
    if ports:
        container["ports"] = ports
    return container


def _pod_template(config: Config, component: str, container: dict, gpu: bool) -> dict:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    k8s = config.cluster.k8s
    if gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        if k8s.gpu_product:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": k8s.gpu_product}
    return {"metadata": {"labels": _labels(component)}, "spec": spec}


def _head_group(config: Config, component: str, serve: bool) -> dict:
    k8s = config.cluster.k8s
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    if serve:
        ports.append({"name": "serve", "containerPort": config.serve.port})
    container = _ray_container(config, "ray-head", k8s.head_cpus, k8s.head_memory, 0, ports)
    return {
        # num-cpus 0: no tasks on the head, it keeps GCS, dashboard and the job driver responsive
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _pod_template(config, component, container, gpu=False),
    }


def _worker_group(config: Config, component: str, replicas: int, max_replicas: int) -> dict:
    k8s = config.cluster.k8s
    gpu = k8s.gpus_per_node > 0
    container = _ray_container(
        config, "ray-worker", k8s.worker_cpus, k8s.worker_memory, k8s.gpus_per_node, []
    )
    return {
        "groupName": "gpu" if gpu else "cpu",
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": {},
        "template": _pod_template(config, component, container, gpu=gpu),
    }


def _nodes_for(config: Config, workers: int, gpus_each: float, cpus_each: float) -> int:
    """Worker pods that fit ``workers`` Ray workers (Ray Train places all of them or none)."""
    k8s = config.cluster.k8s
    if k8s.gpus_per_node > 0 and gpus_each > 0:
        return max(1, math.ceil(workers * gpus_each / k8s.gpus_per_node))
    return max(1, math.ceil(workers * cpus_each / k8s.worker_cpus))


# ---------------------------------------------------------------- objects


def job_stages(config: Config) -> list[str]:
    return [stage for stage in config.stages if stage not in JOB_EXCLUDED_STAGES]


def entrypoint(config: Config, overrides: list[str]) -> str:
    stages = "stages=[" + ",".join(job_stages(config)) + "]"
    args = [o for o in overrides if _keys([o]) != {"stages"}] + [stages]
    return " ".join(["python", "-m", "pipelines.run", *map(shlex.quote, args)])


def ray_job(config: Config, overrides: list[str]) -> dict:
    t, tu, k8s = config.train, config.tune, config.cluster.k8s
    gpus_each = t.gpus_per_worker if t.use_gpu else 0.0
    nodes = max(
        _nodes_for(config, t.num_workers, gpus_each, t.cpus_per_worker),
        _nodes_for(config, tu.trial_num_workers, gpus_each, t.cpus_per_worker) if tu.enabled else 1,
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(config, "moeops-pipeline", "pipeline"),
        "spec": {
            "entrypoint": entrypoint(config, overrides),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": k8s.job_ttl_seconds,
            "activeDeadlineSeconds": k8s.job_deadline_seconds,
            # a failed pipeline is rerun by hand: finished stages are reused from MLflow
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": _head_group(config, "pipeline", serve=False),
                "workerGroupSpecs": [_worker_group(config, "pipeline", nodes, nodes)],
            },
        },
    }


def ray_service(config: Config) -> dict:
    s = config.serve
    gpus_each, cpus_each = s.num_gpus, s.num_cpus
    if s.autoscaling.enabled:
        low, high = s.autoscaling.min_replicas, s.autoscaling.max_replicas
    else:
        low = high = s.num_replicas
    min_nodes = _nodes_for(config, low, gpus_each, cpus_each)
    max_nodes = _nodes_for(config, high, gpus_each, cpus_each)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(config, "moeops-serve", "serve"),
        "spec": {
            # a YAML string, as `serve deploy` would read it from a file
            "serveConfigV2": Literal(dump_serve_config(serve_config(config))),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": bool(s.autoscaling.enabled),
                "headGroupSpec": _head_group(config, "serve", serve=True),
                "workerGroupSpecs": [_worker_group(config, "serve", min_nodes, max_nodes)],
            },
        },
    }


def namespace(config: Config) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": config.cluster.k8s.namespace},
    }


def _secret_env(config: Config, key: str) -> dict:
    return {
        "name": key,
        "valueFrom": {"secretKeyRef": {"name": config.cluster.k8s.secret_name, "key": key}},
    }


def postgres(config: Config) -> list[dict]:
    name = POSTGRES_SERVICE
    container = {
        "name": "postgres",
        "image": "postgres:16",
        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT}],
        "env": [
            {"name": "POSTGRES_USER", "value": "mlflow"},
            {"name": "POSTGRES_DB", "value": "mlflow"},
            _secret_env(config, "POSTGRES_PASSWORD"),
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
        ],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "2", "memory": "4Gi"},
        },
        "readinessProbe": {
            "exec": {"command": ["pg_isready", "-U", "mlflow"]},
            "periodSeconds": 10,
        },
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(config, name, "postgres"),
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": _labels("postgres")},
            "template": {
                "metadata": {"labels": _labels("postgres")},
                "spec": {"containers": [container]},
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "20Gi"}},
                    },
                }
            ],
        },
    }
    return [statefulset, _service(config, name, "postgres", POSTGRES_PORT)]


def mlflow_server(config: Config) -> list[dict]:
    k8s = config.cluster.k8s
    name = MLFLOW_SERVICE
    # The official image lacks the PostgreSQL and S3 clients; bake them into your own image on
    # clusters without access to PyPI. Artifacts are proxied (--serve-artifacts), so Ray pods
    # need no S3 credentials for MLflow.
    command = (
        "pip install --no-cache-dir psycopg2-binary boto3 && exec mlflow server"
        f" --host 0.0.0.0 --port {MLFLOW_PORT}"
        f' --backend-store-uri "postgresql://mlflow:${{POSTGRES_PASSWORD}}@{POSTGRES_SERVICE}:{POSTGRES_PORT}/mlflow"'
        f" --artifacts-destination {k8s.mlflow_artifacts_uri} --serve-artifacts"
        f" --allowed-hosts '{name},{name}:*,{name}.*,localhost:*,127.0.0.1:*'"
    )
    container = {
        "name": "mlflow",
        "image": k8s.mlflow_image,
        "command": ["/bin/sh", "-c", command],
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "env": [_secret_env(config, "POSTGRES_PASSWORD")],
        # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and MLFLOW_S3_ENDPOINT_URL for MinIO/SeaweedFS)
        "envFrom": [{"secretRef": {"name": k8s.secret_name}}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": MLFLOW_PORT},
            "periodSeconds": 10,
        },
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "2", "memory": "4Gi"},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(config, name, "mlflow"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _labels("mlflow")},
            "template": {
                "metadata": {"labels": _labels("mlflow")},
                "spec": {"containers": [container]},
            },
        },
    }
    return [deployment, _service(config, name, "mlflow", MLFLOW_PORT)]


def _service(config: Config, name: str, component: str, port: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config, name, component),
        "spec": {
            "selector": _labels(component),
            "ports": [{"name": component, "port": port, "targetPort": port}],
        },
    }


def kustomization(resources: list[str]) -> dict:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    }


# ---------------------------------------------------------------- files


class Literal(str):
    """A multi-line string written as a YAML block (``|``), so serveConfigV2 reads like a file."""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # multi-line values inside serveConfigV2 (prompts) stay on one line, escaped
    style = '"' if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(
    Literal,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|"),
)


def dump_serve_config(config: dict) -> str:
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=1000)


def dump(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=1000)


HEADER = "# Generated by `python -m infra.render {args}`; do not edit by hand.\n"


def _file(objects: list[dict], args: list[str]) -> str:
    return HEADER.format(args=" ".join(map(shlex.quote, args))) + dump(objects)


def render_flat(overrides: list[str]) -> dict[str, str]:
    """One directory for one config: namespace, MLflow (if rendered), RayJob, RayService."""
    config, full = load_cluster_config(overrides)
    files = {"namespace.yaml": _file([namespace(config)], overrides)}
    if not config.cluster.k8s.tracking_uri:
        files["mlflow.yaml"] = _file(postgres(config) + mlflow_server(config), overrides)
    files["rayjob.yaml"] = _file([ray_job(config, full)], overrides)
    files["rayservice.yaml"] = _file([ray_service(config)], overrides)
    files["kustomization.yaml"] = _file([kustomization(list(files))], overrides)
    return files


def render_tree() -> dict[str, str]:
    """The checked-in layout: base/ (namespace, MLflow) and one overlay per preset."""
    files: dict[str, str] = {}
    with _without_config_env():
        for name, overrides in PRESETS.items():
            flat = render_flat(overrides)
            if name == "gpu":
                files["base/namespace.yaml"] = flat.pop("namespace.yaml")
                files["base/mlflow.yaml"] = flat.pop("mlflow.yaml")
                files["base/kustomization.yaml"] = _file(
                    [kustomization(["namespace.yaml", "mlflow.yaml"])], overrides
                )
            else:
                flat.pop("namespace.yaml")
                flat.pop("mlflow.yaml", None)
            flat["kustomization.yaml"] = _file(
                [kustomization(["../../base", "rayjob.yaml", "rayservice.yaml"])], overrides
            )
            files.update({f"overlays/{name}/{path}": text for path, text in flat.items()})
    return files


@contextmanager
def _without_config_env() -> Iterator[None]:
    saved = {key: os.environ.pop(key) for key in CONFIG_ENV_VARS if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def write(files: dict[str, str], out: Path) -> None:
    for path, text in files.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def drift(files: dict[str, str], out: Path) -> list[str]:
    """Paths whose checked-in text differs from ``files`` (or that are missing or extra)."""
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.yaml")}
    changed = [
        p for p, text in files.items() if not (out / p).is_file() or (out / p).read_text() != text
    ]
    return sorted(set(changed) | (on_disk - set(files)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.render",
        description="Render KubeRay manifests from the config (Hydra overrides as arguments).",
    )
    parser.add_argument("--out", type=Path, help="write one flat rendering of OVERRIDES here")
    parser.add_argument(
        "--check", action="store_true", help="fail if infra/k8s/ differs from a fresh render"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=gpu_small")
    args = parser.parse_args(argv)
    try:
        if args.out:
            files = render_flat(args.overrides)
            write(files, args.out)
            print(f"wrote {', '.join(sorted(files))} to {args.out}")
            return 0
        if args.overrides:
            parser.error("overrides need --out (the checked-in tree is rendered from PRESETS)")
        files = render_tree()
        if args.check:
            stale = drift(files, K8S_DIR)
            if stale:
                print(
                    "infra/k8s/ is stale; run `python -m infra.render`:\n  " + "\n  ".join(stale),
                    file=sys.stderr,
                )
                return 1
            print("infra/k8s/ matches the config")
            return 0
        write(files, K8S_DIR)
        print(f"wrote {len(files)} files under {K8S_DIR}")
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
