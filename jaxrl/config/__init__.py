"""Experiment configuration: defaults (``defaults``), loading + overrides (``loading``) and
one validation pass (``validation``); this package re-exports the public names."""

from jaxrl.config.defaults import ConfigError, base_config, section_from_dataclass
from jaxrl.config.loading import (apply_override, config_changes, config_from_json, load_config, parse_overrides,
                                  resolve_config_path, to_json)
from jaxrl.config.validation import advantage_config, loss_config, mesh_shape, rewarder_spec, validate

__all__ = [
    "ConfigError", "advantage_config", "apply_override", "base_config", "config_changes", "config_from_json", "load_config",
    "loss_config", "mesh_shape", "parse_overrides", "resolve_config_path", "rewarder_spec",
    "section_from_dataclass", "to_json", "validate",
]
