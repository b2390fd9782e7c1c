"""NCCL settings and the flight recorder reach every Ray process of a GPU cluster: the checked-in
KubeRay manifests (rendered from conf/train/gpu.yaml's ``train.nccl_env``) and the runtime env of
``ray job submit`` (infra/runtime_env.yaml) carry the same variables."""

from __future__ import annotations

from pathlib import Path

import yaml

from components.config import load_config

ROOT = Path(__file__).resolve().parents[3]
FLIGHT_RECORDER = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT")


def _gpu_nccl_env(tmp_path) -> dict[str, str]:
    return load_config(
        ["train=gpu", "cluster.num_gpus=8", "cluster.num_cpus=64", f"paths.root={tmp_path}"]
    ).train.nccl_env


def test_gpu_preset_sets_nccl_logging_and_the_flight_recorder(tmp_path):
    env = _gpu_nccl_env(tmp_path)
    assert env["NCCL_DEBUG"] == "WARN"
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_rendered_gpu_manifests_and_runtime_env_carry_it(tmp_path):
    env = _gpu_nccl_env(tmp_path)
    runtime_env = yaml.safe_load((ROOT / "infra/runtime_env.yaml").read_text())["env_vars"]
    assert {k: runtime_env[k] for k in env} == env
    for name in ("rayjob.yaml", "rayservice.yaml"):
        docs = list(yaml.safe_load_all((ROOT / "infra/k8s/overlays/gpu" / name).read_text()))
        containers = [
            c
            for doc in docs
            if doc and doc.get("kind") in ("RayJob", "RayService")
            for group in _groups(doc)
            for c in group["template"]["spec"]["containers"]
        ]
        assert containers, name
        for container in containers:
            values = {e["name"]: e.get("value") for e in container["env"]}
            for key in FLIGHT_RECORDER + ("NCCL_DEBUG",):
                assert values.get(key) == env[key], (name, container["name"], key)


def _groups(doc: dict) -> list[dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
