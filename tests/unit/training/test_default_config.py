"""What `make run` trains: an expert-parallel MoE (the config it composes, before any Ray work)."""

from __future__ import annotations

import pytest

from components.config import load_config


@pytest.mark.parametrize("overrides", [[], ["experiment=tiny"]], ids=["default", "tiny"])
def test_the_main_job_and_its_trials_are_expert_parallel(overrides, tmp_path):
    config = load_config([*overrides, f"paths.root={tmp_path}"])
    m, t, tu = config.model, config.train, config.tune
    assert m.kind == "moe" and m.num_experts >= 8
    assert t.expert_parallel_size == 2 == t.num_workers  # the experts are sharded over both workers
    assert (
        t.overlap.async_a2a and t.overlap.a2a_chunks >= 2
    )  # all-to-all overlapped with expert compute
    assert (
        tu.enabled and tu.trial_num_workers % t.expert_parallel_size == 0
    )  # trials shard experts too
