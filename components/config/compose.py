"""Compose ``conf/`` with Hydra and validate once; plain data only where a file is written.

Entry points get a DictConfig from ``@hydra.main`` and call :func:`finalize`; tests and
library users call :func:`load_config` with the same override strings. The typed
:class:`~components.config.schema.Config` crosses into Ray workers, trials and tasks as it is
(dataclasses pickle); :func:`to_container` is for files (MLflow params, the Serve config file).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from components.config.schema import Config
from components.config.validate import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SCHEMA_NAME = "moeops_schema"


def register_schema() -> None:
    """Make the dataclass schema the base of ``conf/config.yaml`` (its first default)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


register_schema()


def load_config(overrides: Iterable[str] = (), config_dir: Path | str = CONF_DIR) -> Config:
    """Compose, resolve and validate exactly as the entry points do."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return finalize(cfg)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def finalize(cfg: DictConfig) -> Config:
    """Absolute paths, resolved interpolations, the tracking URI decided, every rule checked.

    Runs on the driver only: Ray workers have other working directories, so nothing
    relative may reach them.
    """
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config)
    if unknown:
        raise ConfigError(unknown)
    cfg.paths.root = str(Path(cfg.paths.root).expanduser().resolve())
    if not cfg.tracking.uri:
        cfg.tracking.uri = default_tracking_uri()
    cfg.tracking.uri = _absolute_sqlite(cfg.tracking.uri)
    if not cfg.tracking.artifact_location and cfg.tracking.uri.startswith("sqlite:"):
        cfg.tracking.artifact_location = (
            Path(cfg.tracking.uri[len("sqlite:///") :]).parent / "mlartifacts"
        ).as_uri()
    config: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    for field_name in ("cold_uri", "warm_dir"):
        setattr(config.storage, field_name, _absolute_local(getattr(config.storage, field_name)))
    config.train.checkpoint_uri = _absolute_local(config.train.checkpoint_uri)
    validate(config)
    return config


def _unknown_keys(data: dict, schema: type, prefix: str = "") -> list[str]:
    """Keys a ``+key=value`` override slipped past Hydra's struct mode."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key; allowed keys: {', '.join(fields)}")
            continue
        sub = fields[key].type
        sub_type = (
            getattr(sys.modules[schema.__module__], sub, None) if isinstance(sub, str) else sub
        )
        if dataclasses.is_dataclass(sub_type) and isinstance(value, dict):
            problems += _unknown_keys(value, sub_type, f"{prefix}{key}.")
    return problems


def _absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _absolute_local(uri: str) -> str:
    """Relative local paths become absolute; URIs with a scheme (s3://, file://) are kept."""
    if "://" in uri or not uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _plain_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    return value


def _plain(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: _plain_value(v) for k, v in pairs}


def to_container(config: Config) -> dict[str, Any]:
    """Plain, JSON- and YAML-serialisable dict (choices as their strings): for what is written
    to a file (MLflow params, the Serve config file, cache-key digests)."""
    return dataclasses.asdict(config, dict_factory=_plain)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Typed config from :func:`to_container`'s output (on a worker); no re-validation."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))


def section_from_dict(section: type, data: Any, name: str = "") -> Any:
    """One typed section (``ModelConfig``, ``OverlapConfig``, ...) from its plain-dict form, e.g. a
    model config read back from an export; the section itself passes through. Unknown keys raise
    :class:`ConfigError` naming them; missing keys take the schema's defaults."""
    if isinstance(data, section):
        return data
    prefix = f"{name}." if name else ""
    unknown = _unknown_keys(dict(data), section, prefix)
    if unknown:
        raise ConfigError(unknown)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(section), dict(data)))


def with_overrides(config: Config, dotted: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``{"train.lr": 1e-3, ...}`` applied, type-checked by the schema
    (a sampled value of the wrong type or outside a choice fails) and validated (Tune trials, the
    sweep's best parameters, the dense baseline)."""
    node = OmegaConf.structured(config)
    for key, value in dotted.items():
        if OmegaConf.select(node, key, default=_ABSENT) is _ABSENT:
            raise KeyError(f"no such config key: {key}")
        OmegaConf.update(node, key, value, merge=False)
    updated = OmegaConf.to_object(node)
    validate(updated)
    return updated


_ABSENT = object()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dim": 8}}`` -> ``{"model.dim": 8}``; lists stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
