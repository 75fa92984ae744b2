"""The training pipeline: datasets, the model zoo, configs, the loop, checkpoints, reports.

See ``docs/training.md``; ``jaxprune train / eval / report`` is its command line.

Examples:
  >>> from jaxprune import train
  >>> config = train.default_config()
  >>> config.data.name, config.model.name, config.prune.schedule
  ('mnist5k', 'lenet300', 'agp')
"""

from jaxprune._extras import require

# Before any import below: without the extra, say which one to install (ruff: E402 is off here).
require(
  "ml_collections",
  "orbax.checkpoint",
  "tensorflow_datasets",
  "array_record",
  "mlxtend",
  "sklearn",
  "tensorboardX",
  "tqdm",
  "matplotlib",
  extra="train",
  by="jaxprune.train",
)

from jaxprune.train.checkpoint import Checkpointer
from jaxprune.train.config import (
  ConfigError,
  apply_override,
  default_config,
  load_config,
  validate_config,
)
from jaxprune.train.data import Dataset, Split
from jaxprune.train.data import load as load_dataset
from jaxprune.train.errors import RunFileError
from jaxprune.train.evaluate import evaluate_checkpoint
from jaxprune.train.loop import PhaseResult, TrainResult, TrainState, train
from jaxprune.train.metrics import MetricsWriter
from jaxprune.train.models import create as create_model
from jaxprune.train.optim import make_learning_rate, make_optimizer, make_pruner, make_schedule
from jaxprune.train.report import write_report
from jaxprune.train.shrink import load_shrunk, shrink_checkpoint
from jaxprune.train.sweep import run_sweep
from jaxprune.train.tfds_source import DatasetNotPrepared

__all__ = [
  "load_shrunk",
  "run_sweep",
  "shrink_checkpoint",
  "Checkpointer",
  "ConfigError",
  "Dataset",
  "DatasetNotPrepared",
  "MetricsWriter",
  "PhaseResult",
  "RunFileError",
  "Split",
  "TrainResult",
  "TrainState",
  "apply_override",
  "create_model",
  "default_config",
  "evaluate_checkpoint",
  "load_config",
  "load_dataset",
  "make_learning_rate",
  "make_optimizer",
  "make_pruner",
  "make_schedule",
  "train",
  "validate_config",
  "write_report",
]
