"""Validation of the GPU training settings: whole GPUs per worker with NCCL, the FSDP2 /
activation-checkpointing switches. All fail at composition, before any Ray or MLflow work."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from components.config import ConfigError, load_config

GPU = ["train=gpu", "cluster.num_gpus=8", "cluster.num_cpus=64"]


@pytest.mark.parametrize("backend", ["auto", "nccl"])
def test_fractional_gpus_with_nccl_are_rejected(backend, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(
            GPU
            + [f"train.backend={backend}", "train.gpus_per_worker=0.5", f"paths.root={tmp_path}"]
        )
    assert "train.gpus_per_worker=0.5: NCCL needs whole GPUs per worker" in str(err.value)


def test_whole_gpus_with_nccl_and_fractional_with_gloo_are_accepted(tmp_path):
    assert load_config(GPU + ["train.gpus_per_worker=1", f"paths.root={tmp_path}"])
    cfg = load_config(
        GPU + ["train.backend=gloo", "train.gpus_per_worker=0.5", f"paths.root={tmp_path}"]
    )
    assert cfg.train.gpus_per_worker == 0.5


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.data_parallel=zero3", "Invalid value 'zero3', expected one of [ddp, fsdp]"),
        (
            "train.activation_checkpointing=some",
            "Invalid value 'some', expected one of [none, selective, full]",
        ),
    ],
)
def test_parallel_switches_are_checked(override, message, tmp_path):
    # choices are the schema's enums: refused at composition, naming the value and the choices
    with pytest.raises(ConfigCompositionException) as err:
        load_config([override, f"paths.root={tmp_path}"])
    assert message in str(err.value.__cause__)


def test_fsdp_with_fp16_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(
            GPU + ["train.data_parallel=fsdp", "train.precision=fp16", f"paths.root={tmp_path}"]
        )
    assert "train.data_parallel='fsdp' with train.precision='fp16'" in str(err.value)
