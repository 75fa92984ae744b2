"""The training loop: a config in, a trained (and pruned) model and its numbers out.

:func:`train` runs a recipe: train the model dense, prune it with the pruner that
:func:`jaxprune.train.optim.make_pruner` builds from ``config.prune`` (inside the
optimizer, through :func:`jaxprune.masked`), fine-tune, and report the dense and final
test accuracy with the per-layer sparsity. With ``rethink.enabled`` a second phase
trains the pruned network from scratch (Liu et al. 2019): the final masks, fixed,
on re-initialised weights.

The phases, checkpoints and outputs are :class:`jaxprune.train.run.Run`'s; the jitted
step and evaluation (:class:`TrainState`, :func:`make_train_step`, :func:`evaluate`,
...) are :mod:`jaxprune.train.step`'s, re-exported here.
"""

from __future__ import annotations

from jaxprune.train import data
from jaxprune.train.config_type import Config
from jaxprune.train.results import PhaseResult, TrainResult
from jaxprune.train.run import Run
from jaxprune.train.step import (
  TrainState,
  cross_entropy,
  evaluate,
  init_state,
  make_eval_step,
  make_train_step,
  zero_fraction,
)

__all__ = [
  "PhaseResult",
  "TrainResult",
  "TrainState",
  "cross_entropy",
  "evaluate",
  "init_state",
  "make_eval_step",
  "make_train_step",
  "train",
  "zero_fraction",
]


def train(config: Config, *, dataset: data.Dataset | None = None) -> TrainResult:
  """Runs a recipe: validates the config, trains, prunes, fine-tunes, evaluates.

  A tqdm bar (``config.train.progress``) shows the mean loss and accuracy of the last
  ``train.log_every`` steps, the latest test accuracy (every ``train.eval_every``
  steps) and the sparsity. With a ``train.workdir`` the run writes metrics (CSV and
  TensorBoard), checkpoints (``checkpoint.every`` steps; resumed automatically by the
  same command), the final ``params.npz``, ``summary.json`` and ``report.md``.

  Args:
    config: a config with the fields of :func:`jaxprune.train.config.default_config`.
    dataset: use this dataset instead of loading ``config.data``.

  Returns:
    A :class:`TrainResult`; ``print(result.report())`` shows the numbers.

  Raises:
    ConfigError: before any work, naming a bad field.

  Examples:
    >>> from jaxprune.train import config as config_lib, loop
    >>> config = config_lib.default_config()
    >>> config.data.name, config.train.steps, config.train.progress = "digits", 30, False
    >>> result = loop.train(config)
    >>> result.summary["fc1/kernel"].zeros, round(result.summary.sparsity, 3)
    (17280, 0.9)
  """
  return Run(config, dataset=dataset).execute()
