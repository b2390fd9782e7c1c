"""One MLflow store and one prepared tiny dataset shared by the sweep/evaluate/register tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fixtures.tiny import SMALL_MODEL


@dataclass
class SweepEnv:
    overrides: list[str]  # Hydra overrides every test here starts from
    tracking_uri: str
    prepare_run_id: str


@pytest.fixture(scope="session")
def sweep_env(ray_session, tmp_path_factory, small_dataset, new_mlflow_store) -> SweepEnv:
    from components.config import load_config
    from pipelines.pipeline import run_pipeline
    from pipelines.prepare import SPEC as PREPARE

    root = tmp_path_factory.mktemp("sweep-env")
    uri = new_mlflow_store(root / "mlflow.db")
    overrides = [
        f"paths.root={root / 'moeops'}",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={(root / 'mlartifacts').as_uri()}",
        # the session's small data set (its prepare run reuses the committed shards) and model;
        # one worker per trial and for the final training: the sweep, ASHA, nesting, restore and
        # the registry gate show the same with one process as with two, at half the start-ups
        *small_dataset.overrides,
        *SMALL_MODEL,
        "tune.trial_num_workers=1",
        "train.num_workers=1",
        "train.expert_parallel_size=1",
        "tracking.experiment=sweep-tests",
    ]
    result = run_pipeline(load_config(overrides), [PREPARE])
    return SweepEnv(overrides, uri, result.stages["prepare"].run_id)
