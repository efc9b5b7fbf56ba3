"""Typed run configuration: YAML recipes -> frozen `Config` -> validated `Layout`.

    cfg = load_config("recipes/wan14b/dpo.yaml", ["parallel.tp=4"])
    layout = validate(cfg, world_size, arch)

Pure python + pyyaml, so it imports fast and can be used by tools without torch.
"""

from .loader import dump_yaml, from_dict, load_config, parse_overrides, with_overrides
from .schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    ReferenceConfig,
    RunConfig,
    ScheduleConfig,
)
from .validate import ArchLike, Layout, validate, video_tokens

__all__ = [
    "ArchLike",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "Layout",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "ReferenceConfig",
    "RunConfig",
    "ScheduleConfig",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_overrides",
    "validate",
    "video_tokens",
    "with_overrides",
]
