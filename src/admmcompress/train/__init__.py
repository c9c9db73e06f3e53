"""Reference training: configuration, loop, checkpoints and the compression pipeline."""

from admmcompress.train.averaging import WeightAverage
from admmcompress.train.config import ADMMPhaseConfig, ConfigError, OptimizerConfig, PhaseConfig, RunConfig, StageConfig
from admmcompress.train.loop import TrainingDiverged, evaluate
from admmcompress.train.runner import Runner

__all__ = [
    "ADMMPhaseConfig",
    "ConfigError",
    "OptimizerConfig",
    "PhaseConfig",
    "RunConfig",
    "Runner",
    "StageConfig",
    "TrainingDiverged",
    "WeightAverage",
    "evaluate",
]
