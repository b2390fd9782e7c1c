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
from components.tracking.registry import VersionInfo, download_export

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


def log_version_hf(
    client: MlflowClient, run_id: str, model_name: str, version: str, tracking_uri: str
) -> HFArtifact:
    """Convert the version's export, log it as ``hf/`` of ``run_id``, tag the version with where
    it is. A model without an exact HF target is tagged ``refused: <reason>``, not an error."""
    model_uri = f"models:/{model_name}/{version}"
    with tempfile.TemporaryDirectory(prefix="moeops-hf-") as tmp:
        try:
            hf_dir, _ = export_registered_hf(model_uri, tracking_uri, Path(tmp) / "hf")
        except HFExportError as err:
            artifact = HFArtifact(uri="", location="", architecture="", refused=str(err))
        else:
            client.log_artifacts(run_id, str(hf_dir), HF_ARTIFACT_PATH)
            location = client.get_run(run_id).info.artifact_uri.rstrip("/")
            architecture = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
            artifact = HFArtifact(
                uri=f"runs:/{run_id}/{HF_ARTIFACT_PATH}",
                location=f"{location}/{HF_ARTIFACT_PATH}",
                architecture=architecture,
            )
    for key, value in artifact.tags().items():
        client.set_model_version_tag(model_name, version, key, value)
    return artifact


def registered_hf(info: VersionInfo) -> HFArtifact | None:
    """The HF directory a version's tags record (None: logged before this existed, or refused)."""
    if info.tags.get(TAG_HF_EXPORT, "").startswith("refused"):
        return None
    uri, location = info.tags.get(TAG_HF_URI, ""), info.tags.get(TAG_HF_LOCATION, "")
    if not uri:
        return None
    return HFArtifact(uri, location, info.tags.get(TAG_HF_ARCHITECTURE, ""))
