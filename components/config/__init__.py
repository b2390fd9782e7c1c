"""One schema for moeops' configuration: compose, validate once, ship plain dicts."""

from components.config.compose import (
    CONF_DIR,
    config_from_dict,
    finalize,
    flatten,
    load_config,
    section_from_dict,
    to_container,
    to_yaml,
    with_overrides,
)
from components.config.schema import Config
from components.config.validate import ConfigError, validate

__all__ = [
    "CONF_DIR",
    "Config",
    "ConfigError",
    "config_from_dict",
    "finalize",
    "flatten",
    "load_config",
    "section_from_dict",
    "to_container",
    "to_yaml",
    "validate",
    "with_overrides",
]
