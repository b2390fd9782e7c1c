"""The main job: every stage in ``stages`` order (default prepare → tune → train → evaluate →
register → deploy) under one MLflow parent run.

    python -m pipelines.run                      # embedded defaults: local Ray, ./mlflow.db
    python -m pipelines.run experiment=tiny      # the smallest end-to-end run
    python -m pipelines.run --help               # config groups and keys
"""

from __future__ import annotations

import importlib

from components.config import Config
from components.tracking.stages import StageSpec
from pipelines._cli import pipeline_main


def stage_spec(name: str) -> StageSpec:
    return importlib.import_module(f"pipelines.{name}").SPEC


def selected_specs(config: Config) -> list[StageSpec]:
    return [stage_spec(name) for name in config.stages]


main = pipeline_main(selected_specs, "pipelines.run")

if __name__ == "__main__":
    main()
