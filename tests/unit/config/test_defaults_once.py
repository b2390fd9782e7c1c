"""Defaults live in one place, the schema: a YAML under conf/ holds only what differs from what it
sits on (a group option: the schema's defaults; an experiment: the options it selects)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from components.config import CONF_DIR, flatten
from components.config.schema import Config

GROUPS = ("data", "storage", "model", "train", "tune", "serve", "tracking", "cluster")
_MISSING = object()


def _select(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _restated(keys: dict[str, Any], base: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose value is the one they would have anyway (dict leaves, like search_space, too)."""
    return [
        f"{prefix}{key}={value!r}"
        for key, value in keys.items()
        if _select(base, f"{prefix}{key}") is not _MISSING
        and _select(base, f"{prefix}{key}") == value
    ]


def _schema() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)


def _composed(overrides: list[str]) -> dict[str, Any]:
    """What conf/ composes to (unresolved, unvalidated) with these overrides."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def _experiment_base(defaults: list) -> list[str]:
    """The overrides an experiment's own defaults list stands for (without the experiment)."""
    overrides = []
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            overrides.append(f"experiment={entry}")  # another experiment it builds on
        elif isinstance(entry, dict):
            for key, option in entry.items():
                overrides.append(f"{key.removeprefix('override ').strip('/')}={option}")
    return overrides


def restated_defaults(path: Path) -> list[str]:
    """``key=value`` of every key in ``path`` that does not change the composed config."""
    data = yaml.safe_load(path.read_text()) or {}
    relative = path.relative_to(CONF_DIR)
    if relative.parts[0] in GROUPS:
        return _restated(flatten(data), _schema()[relative.parts[0]])
    if relative.parts[0] == "experiment":
        base = _composed(_experiment_base(data.pop("defaults", [])))
        return _restated(flatten(data), base)
    data.pop("defaults", None)
    data.pop("hydra", None)
    return _restated(flatten(data), _schema())


YAMLS = sorted(p for p in CONF_DIR.rglob("*.yaml") if p.relative_to(CONF_DIR).parts[0] != "hydra")


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CONF_DIR)) for p in YAMLS])
def test_a_yaml_holds_only_what_differs_from_the_schema(path):
    assert restated_defaults(path) == [], f"{path} restates defaults (remove these keys)"


def test_the_check_catches_a_restated_default(tmp_path, monkeypatch):
    """The check itself can fail: a group option and an experiment that restate a value."""
    conf = tmp_path / "conf"
    (conf / "train").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "config.yaml").write_text((CONF_DIR / "config.yaml").read_text())
    for sub in CONF_DIR.iterdir():  # the real groups beside the two test files
        if sub.is_dir() and sub.name not in ("train", "experiment"):
            (conf / sub.name).symlink_to(sub)
    for name in ("train", "experiment"):
        for option in (CONF_DIR / name).iterdir():
            (conf / name / option.name).symlink_to(option)
    (conf / "train" / "extra.yaml").write_text(
        "lr: 0.003\nmax_steps: 7\noverlap:\n  a2a_chunks: 2\n"
    )
    # tiny selects train=cpu, whose expert_parallel_size is 2: restating it changes nothing
    (conf / "experiment" / "again.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\ntrain:\n  expert_parallel_size: 2\n"
        "  max_steps: 31\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "CONF_DIR", conf)
    assert restated_defaults(conf / "train" / "extra.yaml") == ["lr=0.003", "overlap.a2a_chunks=2"]
    assert restated_defaults(conf / "experiment" / "again.yaml") == ["train.expert_parallel_size=2"]
