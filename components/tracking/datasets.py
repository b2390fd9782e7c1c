"""The prepared dataset as an MLflow dataset: logged as an input of the runs that read it and
named in metrics measured on it (so MLflow links a model's figures to the data they came from)."""

from __future__ import annotations

import json
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

# MLflow stores at most this many characters of a dataset digest; the full one goes into a tag.
MLFLOW_DIGEST_CHARS = 32
DIGEST_TAG = "moeops.dataset_digest"


def dataset_entity(name: str, digest: str, uri: str, profile: dict | None = None) -> Dataset:
    """An MLflow dataset for the manifest at ``uri`` (local path or fsspec URI).

    The source is written the way MLflow's own file-system sources are (type = URI scheme,
    ``{"uri": ...}``; ``local`` for paths), so ``mlflow.data.get_source`` resolves it.
    """
    scheme = urlparse(uri).scheme if "://" in uri else ""
    source_type = "local" if scheme in ("", "file") else scheme
    source = {"url": uri} if scheme in ("http", "https") else {"uri": uri}
    return Dataset(
        name=name,
        digest=digest[:MLFLOW_DIGEST_CHARS],
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps(profile) if profile else None,
    )


def log_dataset_input(
    client: MlflowClient, run_id: str, dataset: Dataset, full_digest: str, context: str
) -> None:
    """``dataset`` as an input of ``run_id`` (``mlflow.data.context`` = ``context``: training,
    eval)."""
    tags = [InputTag("mlflow.data.context", context), InputTag(DIGEST_TAG, full_digest)]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
