"""Evaluating a run from its files: ``jaxprune eval``.

A run is named by its config (the checkpoints are in ``checkpoint.dir`` or
``<train.workdir>/checkpoints``), or by its workdir, whose ``config.json`` holds the
config it ran with.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections

import jaxprune
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors, optim
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib
from jaxprune.train.config_type import Config


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The test accuracy and sparsity of a checkpointed state (``jaxprune eval``)."""

  phase: str
  step: int
  accuracy: float
  summary: jaxprune.Summary

  def report(self) -> str:
    return "\n".join(
      [f"checkpoint: {self.phase} step {self.step}", f"test accuracy: {self.accuracy:.2%}"]
      + [str(self.summary)]
    )


def evaluate_checkpoint(
  config: Config, *, step: int | None = None, dataset: data.Dataset | None = None
) -> Evaluation:
  """Evaluates checkpoint ``step`` (default: the newest) of the run that ``config`` describes.

  Raises:
    ConfigError: for a bad config, or one that names no checkpoint directory (before
      any data is loaded).
    FileNotFoundError: when the directory holds no (such) checkpoint.
  """
  config_lib.validate_config(config)
  state_lib.require_checkpoints(config, "evaluate", step)
  ds = dataset or data.from_config(config.data)
  mesh = sharding_lib.make_mesh(config.parallel.devices)
  restored = state_lib.restore(
    config, ds.image_shape, ds.num_classes, step=step, mesh=mesh, purpose="evaluate"
  )
  state, meta = restored.state, restored.meta
  eval_fn = step_lib.make_eval_step(restored.graphdef)
  accuracy = step_lib.evaluate(eval_fn, state, ds.test, config.data.eval_batch_size, mesh)
  summary = step_lib.sparsity_summary(optim.make_pruner(config), state.params)
  return Evaluation(meta["phase"], meta["step"], accuracy, summary)


def config_from_workdir(workdir: str | pathlib.Path) -> Config:
  """The validated config of the run in ``workdir`` (its ``config.json``).

  Raises:
    FileNotFoundError: when there is no ``config.json``.
    RunFileError: when it is not a JSON object (cut short, or not a run's config).
    ConfigError: when a field's value is bad.
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: not the workdir of a `jaxprune train` run.")
  try:
    values = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.RunFileError(
      f"{path}: not valid JSON ({e}); the run's config is damaged or cut short."
    ) from e
  if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
    raise errors.RunFileError(
      f"{path}: not the config of a `jaxprune train` run (a JSON object of field groups)."
    )
  config: Config = ml_collections.ConfigDict(values)
  for group, values in config_lib.default_config().items():
    if group not in config:  # a group added since the run: its defaults
      config[group] = values
  config.train.workdir = str(workdir)  # the directory may have moved since the run
  config_lib.validate_config(config)
  return config
