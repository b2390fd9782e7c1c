"""The KubeRay manifests: rendered from the config, checked in without drift, valid offline.

Core objects are validated against the Kubernetes OpenAPI schemas bundled with
`kubernetes-validate`; RayJob/RayService (CRDs) against the fields and types of KubeRay's
ray.io/v1 CRDs (ray-operator/config/crd/bases), with their pod templates validated as core
PodTemplates.
"""

from __future__ import annotations

import os
import re
import shlex

import kubernetes_validate
import pytest
import yaml

from components.config import ConfigError, load_config
from infra import render
from serving.deploy.config import resolved_model_uri, serve_config

K8S_VERSION = "1.30"
CORE_KINDS = {"Namespace", "Service", "Deployment", "StatefulSet"}
# ray.io/v1 spec fields (KubeRay CRDs): unknown keys would be pruned by the API server silently.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "clusterSelector",
    "deletionStrategy",
    "entrypoint",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "jobId",
    "managedBy",
    "metadata",
    "preRunningDeadlineSeconds",
    "rayClusterSpec",
    "runtimeEnvYAML",
    "shutdownAfterJobFinishes",
    "submissionMode",
    "submitterConfig",
    "submitterPodTemplate",
    "suspend",
    "ttlSecondsAfterFinished",
}
RAYSERVICE_SPEC_FIELDS = {
    "deploymentUnhealthySecondThreshold",
    "excludeHeadPodFromServeSvc",
    "managedBy",
    "rayClusterConfig",
    "rayClusterDeletionDelaySeconds",
    "serveConfigV2",
    "serveService",
    "serviceUnhealthySecondThreshold",
    "suspend",
    "upgradeStrategy",
}
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions",
    "autoscalerOptions",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "headServiceAnnotations",
    "historyServerOptions",
    "managedBy",
    "networkPolicy",
    "rayVersion",
    "suspend",
    "tlsOptions",
    "upgradeStrategy",
    "workerGroupSpecs",
}
HEAD_FIELDS = {
    "enableIngress",
    "headService",
    "ingressOptions",
    "labels",
    "rayStartParams",
    "resources",
    "serviceType",
    "template",
}
WORKER_FIELDS = {
    "groupName",
    "idleTimeoutSeconds",
    "labels",
    "maxReplicas",
    "minReplicas",
    "numOfHosts",
    "priority",
    "rayStartParams",
    "replicas",
    "resources",
    "scaleStrategy",
    "suspend",
    "template",
}
WORKER_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}


@pytest.fixture(autouse=True)
def clean_config_env(monkeypatch):
    for key in render.CONFIG_ENV_VARS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def tree() -> dict[str, str]:
    return render.render_tree()


def objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def by_kind(files: dict[str, str], kind: str) -> list[dict]:
    return [obj for text in files.values() for obj in objects(text) if obj.get("kind") == kind]


def validate_pod_template(template: dict) -> None:
    kubernetes_validate.validate(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": template,
        },
        K8S_VERSION,
        strict=True,
    )


def check_ray_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert spec["rayVersion"] == render.RAY_VERSION
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_FIELDS and "template" in head
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # CRD: map of strings
    validate_pod_template(head["template"])
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert WORKER_REQUIRED <= set(group) <= WORKER_FIELDS, set(group) ^ WORKER_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        validate_pod_template(group["template"])


def test_checked_in_manifests_match_a_fresh_render(tree):
    assert render.drift(tree, render.K8S_DIR) == [], "run `python -m infra.render`"
    assert render.main(["--check"]) == 0


def test_every_manifest_parses_and_core_objects_validate(tree):
    kinds = set()
    for path, text in tree.items():
        for obj in objects(text):
            kinds.add(obj["kind"])
            if obj["kind"] in CORE_KINDS:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            if obj["kind"] != "Kustomization":
                assert obj["metadata"].get("namespace", obj["metadata"]["name"]) == "moeops", path
    assert kinds == CORE_KINDS | {"RayJob", "RayService", "Kustomization"}


def test_kustomizations_list_existing_files(tree):
    for path, text in tree.items():
        if path.endswith("kustomization.yaml"):
            for resource in objects(text)[0]["resources"]:
                target = os.path.normpath(os.path.join(os.path.dirname(path), resource))
                assert target in tree or f"{target}/kustomization.yaml" in tree, (
                    f"{path}: {resource}"
                )
    assert "../../base" in objects(tree["overlays/gpu/kustomization.yaml"])[0]["resources"]


@pytest.mark.parametrize("preset", sorted(render.PRESETS))
def test_rayjob_carries_kuberay_fields_and_runs_the_same_config(tree, preset):
    (job,) = objects(tree[f"overlays/{preset}/rayjob.yaml"])
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    check_ray_cluster_spec(spec["rayClusterSpec"])

    # The entrypoint is the same CLI with the overrides the manifests were rendered from.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.run"]
    job_config = load_config(argv[3:])
    rendered, _ = render.load_cluster_config(render.PRESETS[preset])
    assert job_config.stages == [s for s in rendered.stages if s != "deploy"]
    job_config.stages = rendered.stages
    assert job_config == rendered
    assert job_config.cluster.mode == "remote"


def test_gpu_worker_group_fits_the_training_job(tree):
    (job,) = objects(tree["overlays/gpu/rayjob.yaml"])
    config = load_config(["experiment=gpu_small"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert (
        group["replicas"] * gpus_per_pod >= config.train.num_workers * config.train.gpus_per_worker
    )
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    (cpu_job,) = objects(tree["overlays/cpu/rayjob.yaml"])
    cpu_container = cpu_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def test_multinode_preset_renders_four_gpu_nodes(tmp_path):
    files = render.render_flat(["experiment=gpu_multinode"])
    (job,) = objects(files["rayjob.yaml"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    (service,) = objects(files["rayservice.yaml"])
    assert (
        service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 2
    )  # 16 one-GPU replicas
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("preset", sorted(render.PRESETS))
def test_rayservice_serve_config_is_the_local_deploy_config(tree, preset):
    (service,) = objects(tree[f"overlays/{preset}/rayservice.yaml"])
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS and isinstance(spec["serveConfigV2"], str)
    check_ray_cluster_spec(spec["rayClusterConfig"])
    config = load_config(render.cluster_overrides(render.PRESETS[preset]))
    # The deploy stage's call (pipelines/deploy.py) minus `revision`, which it sets to the champion
    # version it saw; the RayService resolves the alias itself when its replicas start.
    assert yaml.safe_load(spec["serveConfigV2"]) == serve_config(
        config, resolved_model_uri(config), revision=""
    )
    assert (
        resolved_model_uri(config)
        == f"models:/{config.registry.model_name}@{config.registry.champion_alias}"
    )
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]


def test_secrets_are_referenced_never_rendered(tree):
    text = "\n".join(tree.values())
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert f"name: {secret}" not in text, (
            f"{secret} must come from the Secret, not a literal env var"
        )
    assert "kind: Secret" not in text
    (deployment,) = [o for o in objects(tree["base/mlflow.yaml"]) if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {
        "name": "moeops-credentials",
        "key": "POSTGRES_PASSWORD",
    }
    assert (
        "postgresql://" in container["command"][-1]
        and "--artifacts-destination s3://" in container["command"][-1]
    )


def test_existing_tracking_server_skips_mlflow_and_reaches_every_pod():
    uri = "https://mlflow.example.com"
    files = render.render_flat(["experiment=gpu_small", f"cluster.k8s.tracking_uri={uri}"])
    assert "mlflow.yaml" not in files
    assert objects(files["kustomization.yaml"])[0]["resources"] == [
        "namespace.yaml",
        "rayjob.yaml",
        "rayservice.yaml",
    ]
    (job,) = objects(files["rayjob.yaml"])
    assert f"tracking.uri={uri}" in job["spec"]["entrypoint"]
    env = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in env
    assert (
        yaml.safe_load(objects(files["rayservice.yaml"])[0]["spec"]["serveConfigV2"])[
            "applications"
        ][0]["args"]["tracking"]["uri"]
        == uri
    )


def test_cli_writes_a_flat_rendering(tmp_path, capsys):
    assert (
        render.main(
            [
                "--out",
                str(tmp_path),
                "experiment=gpu_small",
                "cluster.k8s.image=reg.example/moeops:1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kustomization.yaml",
        "mlflow.yaml",
        "namespace.yaml",
        "rayjob.yaml",
        "rayservice.yaml",
    ]
    (job,) = objects((tmp_path / "rayjob.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "reg.example/moeops:1"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["experiment=tiny", "cluster=local"], "cluster.mode='local'"),
        (["experiment=tiny"], "storage.cold_uri"),
        (["experiment=gpu_small", "train.checkpoint_uri=/mnt/ckpt"], "train.checkpoint_uri"),
        (
            ["experiment=gpu_small", "cluster.k8s.tracking_uri=mlflow:5000"],
            "cluster.k8s.tracking_uri",
        ),
        (["experiment=gpu_small", "cluster.k8s.worker_cpus=0"], "cluster.k8s.worker_cpus"),
    ],
)
def test_bad_input_names_the_key(overrides, needle, capsys):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        render.render_flat(overrides)
    assert render.main(["--out", "/nonexistent-never-written", *overrides]) == 2
    assert needle in capsys.readouterr().err
