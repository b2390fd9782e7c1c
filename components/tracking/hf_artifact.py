"""The Hugging Face directory of a registered version: made from its export, logged, located.

The register stage converts the version's export (``components.model.hf_export``) and logs the
directory as the artifact ``hf/`` of its own run; the version's tags say where it is:

* ``moeops.hf_uri`` — ``runs:/<register run>/hf``: ``mlflow artifacts download -u <it>``;
* ``moeops.hf_location`` — the artifact store's URI of that directory (``s3://...``, a local
  path, ``mlflow-artifacts:/...``): what a vLLM replica loads from when it can;
* ``moeops.hf_architecture`` — the transformers class, or ``moeops.hf_export`` = ``refused: ...``
  when the model has an option without an exact target (the version is registered all the same).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from components.model.hf_export import HFExportError, hf_export
from components.tracking.registry import (
    VersionInfo,
    download_export,
    download_logged_export,
    get_version,
)

HF_ARTIFACT_PATH = "hf"
TAG_HF_URI = "moeops.hf_uri"
TAG_HF_LOCATION = "moeops.hf_location"
TAG_HF_ARCHITECTURE = "moeops.hf_architecture"
TAG_HF_EXPORT = "moeops.hf_export"


@dataclass(frozen=True)
class HFArtifact:
    """Where a version's HF directory was logged (empty strings and ``refused`` when it was not)."""

    uri: str  # runs:/<run>/hf
    location: str  # the artifact store's URI of the directory
    architecture: str
    refused: str = ""  # the HFExportError message when the model has no exact target

    def tags(self) -> dict[str, str]:
        if self.refused:
            return {TAG_HF_EXPORT: f"refused: {self.refused}"}
        return {
            TAG_HF_EXPORT: "logged",
            TAG_HF_URI: self.uri,
            TAG_HF_LOCATION: self.location,
            TAG_HF_ARCHITECTURE: self.architecture,
        }


def export_registered_hf(
    model_uri: str, tracking_uri: str, out_dir: str | Path
) -> tuple[Path, VersionInfo]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> an HF directory at
    ``out_dir`` (made from the version's export); returns (directory, version)."""
    with tempfile.TemporaryDirectory(prefix="moeops-export-") as tmp:
        export_dir, info = download_export(model_uri, tracking_uri, tmp)
        return hf_export(export_dir, out_dir), info


def export_logged_hf(model_uri: str, tracking_uri: str, out_dir: Path) -> Path | HFExportError:
    """The HF directory of a logged model (``models:/<model_id>``, what the train stage logged),
    or the HFExportError that refuses it. The register stage calls this before registering, so
    a conversion that fails for any other reason fails the stage before a version exists."""
    with tempfile.TemporaryDirectory(prefix="moeops-export-") as tmp:
        export_dir = download_logged_export(model_uri, tracking_uri, tmp)
        try:
            return hf_export(export_dir, out_dir)
        except HFExportError as err:
            return err


def log_hf(
    client: MlflowClient,
    run_id: str,
    model_name: str,
    version: str,
    exported: Path | HFExportError,
) -> HFArtifact:
    """Log an :func:`export_logged_hf` result as ``hf/`` of ``run_id`` and tag the version with
    where it is (a refusal is tagged ``refused: <reason>``, the version stays registered)."""
    if isinstance(exported, HFExportError):
        artifact = HFArtifact(uri="", location="", architecture="", refused=str(exported))
    else:
        client.log_artifacts(run_id, str(exported), HF_ARTIFACT_PATH)
        location = client.get_run(run_id).info.artifact_uri.rstrip("/")
        architecture = json.loads((exported / "config.json").read_text())["architectures"][0]
        artifact = HFArtifact(
            uri=f"runs:/{run_id}/{HF_ARTIFACT_PATH}",
            location=f"{location}/{HF_ARTIFACT_PATH}",
            architecture=architecture,
        )
    for key, value in artifact.tags().items():
        client.set_model_version_tag(model_name, version, key, value)
    return artifact


def log_version_hf(
    client: MlflowClient, run_id: str, model_name: str, version: str, tracking_uri: str
) -> HFArtifact:
    """Both steps for an already registered version (tests, versions registered before the
    register stage logged HF directories)."""
    with tempfile.TemporaryDirectory(prefix="moeops-hf-") as tmp:
        info = get_version(f"models:/{model_name}/{version}", tracking_uri)
        exported = export_logged_hf(info.source or info.model_uri, tracking_uri, Path(tmp) / "hf")
        return log_hf(client, run_id, model_name, version, exported)


def registered_hf(info: VersionInfo) -> HFArtifact | None:
    """The HF directory a version's tags record (None: logged before this existed, or refused)."""
    if info.tags.get(TAG_HF_EXPORT, "").startswith("refused"):
        return None
    uri, location = info.tags.get(TAG_HF_URI, ""), info.tags.get(TAG_HF_LOCATION, "")
    if not uri:
        return None
    return HFArtifact(uri, location, info.tags.get(TAG_HF_ARCHITECTURE, ""))
