"""The training pipeline: datasets, the model zoo, configs and the training loop.

Examples:
  >>> from jaxprune import train
  >>> config = train.default_config()
  >>> config.data.name, config.model.name, config.prune.schedule
  ('mnist5k', 'lenet300', 'agp')
"""

from jaxprune.train.config import (
  ConfigError,
  apply_override,
  default_config,
  load_config,
  make_optimizer,
  make_pruner,
  make_schedule,
  validate_config,
)
from jaxprune.train.data import Dataset, Split
from jaxprune.train.data import load as load_dataset
from jaxprune.train.loop import TrainResult, TrainState, train
from jaxprune.train.models import create as create_model

__all__ = [
  "ConfigError",
  "Dataset",
  "Split",
  "TrainResult",
  "TrainState",
  "apply_override",
  "create_model",
  "default_config",
  "load_config",
  "load_dataset",
  "make_optimizer",
  "make_pruner",
  "make_schedule",
  "train",
  "validate_config",
]
