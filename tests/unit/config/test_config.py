"""Every config option composes; bad configs fail before Ray, naming key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from components.config import (
    CONF_DIR,
    ConfigError,
    config_from_dict,
    flatten,
    load_config,
    to_container,
)

GROUPS = ["data", "storage", "model", "train", "tune", "serve", "tracking", "cluster"]


# options that only make sense beside others (a GPU trainer needs GPUs in the cluster, ...)
COMPANIONS = {
    ("data", "files"): ["data.uri=/tmp/corpus/*.txt"],
    ("train", "gpu"): ["cluster.num_gpus=8", "cluster.num_cpus=64"],
    ("serve", "gpu"): ["model=moe_small"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.root={tmp_path}"]
    overrides += COMPANIONS.get((group, option), [])
    cfg = load_config(overrides)
    assert getattr(cfg, group).name == option


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment, tmp_path):
    cfg = load_config([f"experiment={experiment}", f"paths.root={tmp_path}"])
    assert cfg.model.max_seq_len >= cfg.data.seq_len


def test_paths_are_absolute_and_tracking_uri_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["paths.root=rel/state"])
    assert Path(cfg.paths.root).is_absolute() and cfg.paths.root.endswith("rel/state")
    assert Path(cfg.storage.warm_dir).is_absolute()
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_env_tracking_uri_wins_over_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_config([f"paths.root={tmp_path}"]).tracking.uri == "http://127.0.0.1:5999"


def test_container_round_trip_is_plain(tmp_path):
    cfg = load_config(["experiment=tiny", f"paths.root={tmp_path}"])
    data = to_container(cfg)
    assert type(data) is dict and type(data["model"]) is dict
    assert config_from_dict(data) == cfg
    flat = flatten(data)
    assert flat["model.top_k"] == cfg.model.top_k and "train.overlap.a2a_chunks" in flat


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.no_such_key=1", "model.no_such_key"),
        ("model.dim=wide", "model.dim"),
        ("train.use_gpu=maybe", "train.use_gpu"),
        ("model=no_such_model", "no_such_model"),
        # choices are enums: the key, the value and what is allowed, at composition
        ("tune.mode=best", "Invalid value 'best', expected one of [min, max]"),
        ("stages=[prepare,bogus]", "Invalid value 'bogus', expected one of [prepare, tune"),
        ("model.kind=sparse", "full_key: model.kind"),
        ("serve.quantize=int4", "expected one of [none, int8, auto]"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition(override, needle, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        load_config([override, f"paths.root={tmp_path}"])
    text = str(err.value) + str(err.value.__cause__)
    assert needle in text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.top_k=65"], "model.top_k=65: must be between 1 and model.num_experts (64)"),
        (
            ["train.expert_parallel_size=3"],
            "model.num_experts=64: must be divisible by train.expert_parallel_size (3)",
        ),
        (
            ["train.num_workers=3", "train.expert_parallel_size=2"],
            "train.num_workers=3: must be a multiple of train.expert_parallel_size (2)",
        ),
        (
            ["serve.max_tokens=200"],
            "serve.max_tokens=200: serve.max_prompt_tokens (128) + serve.max_tokens must fit",
        ),
        (["data.seq_len=512"], "data.seq_len=512: must be <= model.max_seq_len (256)"),
        (["model.dim=130"], "model.dim=130: must be divisible by model.n_heads (4)"),
        (
            ["train.precision=bf16"],
            "train.precision='bf16': mixed precision needs train.use_gpu=true",
        ),
        (["train.num_workers=8"], "exceeds cluster.num_cpus (4); Ray Train would wait forever"),
        (["serve.canary_fraction=1.5"], "serve.canary_fraction=1.5: must be in [0, 1]"),
        (["data=files"], "data.uri"),
        (
            ["++tune.search_space={model.nope: {type: choice, values: [1]}}"],
            "tune.search_space.model.nope: no such config key",
        ),
        (["stages=[prepare,train,prepare]"], "a stage may appear once"),
        (["+inputs.bogus=abc"], "inputs.bogus: not a stage"),
    ],
)
def test_cross_field_rules_name_key_value_and_rule(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides + [f"paths.root={tmp_path}"])
    assert message in str(err.value)


def test_appended_unknown_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(["+model.no_such_key=1", f"paths.root={tmp_path}"])
    assert "model.no_such_key: unknown key" in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(["model.top_k=65", "serve.canary_fraction=-1", f"paths.root={tmp_path}"])
    assert len(err.value.problems) == 2


def test_tune_off_skips_the_sweep_rules(tmp_path):
    # 1 trial worker cannot hold 2 expert-parallel ranks: a problem only while the sweep runs
    with pytest.raises(
        ConfigError,
        match="tune.trial_num_workers=1: must be a multiple of train.expert_parallel_size",
    ):
        load_config(
            ["train.expert_parallel_size=2", "tune.trial_num_workers=1", f"paths.root={tmp_path}"]
        )
    config = load_config(
        [
            "tune=off",
            "train.expert_parallel_size=2",
            "tune.trial_num_workers=1",
            f"paths.root={tmp_path}",
        ]
    )
    assert config.tune.enabled is False and config.train.expert_parallel_size == 2


def test_worker_start_timeout_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="train.worker_start_timeout_s=0.0: must be > 0"):
        load_config(["train.worker_start_timeout_s=0", f"paths.root={tmp_path}"])


def test_registry_metric_is_one_the_evaluate_stage_measures(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["registry.metric=accuracy", f"paths.root={tmp_path}"])
    assert "Invalid value 'accuracy', expected one of [val_loss, perplexity" in str(
        err.value.__cause__
    )


@pytest.mark.parametrize("experiment", options("experiment"))
def test_workers_rebuild_the_same_typed_config(experiment, tmp_path):
    """What crosses into Ray (the plain container) becomes the same dataclasses on the other
    side."""
    from components.config.schema import Config, ModelConfig

    config = load_config([f"experiment={experiment}", f"paths.root={tmp_path}"])
    rebuilt = config_from_dict(to_container(config))
    assert rebuilt == config and type(rebuilt) is Config and type(rebuilt.model) is ModelConfig
