"""The trainer: ``python -m astrobio.train`` (see docs/TRAINING.md)."""

from astrobio.train.config import ConfigError, TrainConfig, parse_config
from astrobio.train.trainer import main, run

__all__ = ["ConfigError", "TrainConfig", "main", "parse_config", "run"]
