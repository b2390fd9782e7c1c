"""The Hydra entry point shared by every `python -m pipelines.<stage>` and `pipelines.run`."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from components.config import CONF_DIR, Config, ConfigError, finalize
from components.tracking.stages import StageInputError, StageSpec


def pipeline_main(
    select: Callable[[Config], list[StageSpec]], entry_point: str
) -> Callable[[], None]:
    """``main`` running the stages ``select(config)`` picks, in order, under one parent run."""

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        from pipelines.pipeline import Interrupted, run_pipeline

        try:
            config = finalize(cfg)
            run_pipeline(config, select(config), entry_point=entry_point)
        except (ConfigError, StageInputError) as err:
            # Bad input: a clear message and a usage exit code, not a traceback.
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as err:
            # The open MLflow runs were ended KILLED on the way out; exit as a signal would.
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            print(
                f"interrupted ({signal.Signals(signum).name}): the open MLflow runs are marked "
                "KILLED",
                file=sys.stderr,
            )
            sys.exit(128 + signum)

    return main


def stage_main(spec: StageSpec) -> Callable[[], None]:
    """``main`` for ``python -m pipelines.<spec.name>``: that one stage under its own parent run."""
    return pipeline_main(lambda config: [spec], f"pipelines.{spec.name}")
