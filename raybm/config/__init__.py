"""Job configuration: one typed dataclass per stage, YAML files and dotted overrides.

A job config is a YAML file whose top-level sections match the fields of ``JobConfig``
(``data``, ``model``, ``train`` ...). Command-line overrides use the same dotted keys:
``train.lr=3e-5 data.max_length=64``. Every key is checked: an unknown key, a value of the
wrong type or out of range raises ``ConfigError`` naming the key and what is allowed.

The package, bottom to top: ``sections`` and ``stages`` (the schema, each field documented
by the string right below it), ``coerce`` (raw mappings into typed sections),
``search_space`` (the sweep's distributions), ``naming`` (folder names, run and sweep
names), ``checks`` (checks across keys), ``loading`` (files and overrides), ``describe``
(``raybm config --describe``). What other modules use is re-exported here.
"""

from raybm.config.checks import extreme_trials, is_loopback, pipeline_stages
from raybm.config.coerce import merge_raw
from raybm.config.describe import describe
from raybm.config.loading import build_config, load_config, parse_overrides
from raybm.config.naming import check_name, config_hash, derived_name, run_name_for, safe_name, sweep_name_for
from raybm.config.sections import (
    AugmentConfig,
    CleanConfig,
    DataConfig,
    ModelConfig,
    RayConfig,
    StorageConfig,
    TrackingConfig,
)
from raybm.config.stages import (
    PIPELINE_STAGES,
    ExportConfig,
    JobConfig,
    PipelineConfig,
    ServeConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "AugmentConfig",
    "CleanConfig",
    "DataConfig",
    "ExportConfig",
    "JobConfig",
    "ModelConfig",
    "PIPELINE_STAGES",
    "PipelineConfig",
    "RayConfig",
    "ServeConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "build_config",
    "check_name",
    "config_hash",
    "derived_name",
    "describe",
    "extreme_trials",
    "is_loopback",
    "load_config",
    "merge_raw",
    "parse_overrides",
    "pipeline_stages",
    "run_name_for",
    "safe_name",
    "sweep_name_for",
]
