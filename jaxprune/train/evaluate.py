"""Evaluating a run from its files: ``jaxprune eval``.

A run is named by its config (the checkpoints are in ``checkpoint.dir`` or
``<train.workdir>/checkpoints``), or by its workdir, whose ``config.json`` holds the
config it ran with.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections

import jaxprune
from jaxprune.train import config as config_lib
from jaxprune.train import data, loop
from jaxprune.train.run import Run


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
  config: ml_collections.ConfigDict, *, step: int | None = None, dataset: data.Dataset | None = None
) -> Evaluation:
  """Evaluates checkpoint ``step`` (default: the newest) of the run that ``config`` describes.

  Raises:
    ConfigError: when the config names no checkpoint directory.
    FileNotFoundError: when the directory holds no (such) checkpoint.
  """
  run, graphdef, state, meta = restore_checkpoint(config, step, dataset, "evaluate")
  eval_fn = loop.make_eval_step(graphdef)
  accuracy = loop.evaluate(eval_fn, state, run.ds.test, config.data.eval_batch_size, run.mesh)
  return Evaluation(meta["phase"], meta["step"], accuracy, run.summary(state.params))


def restore_checkpoint(
  config: ml_collections.ConfigDict,
  step: int | None = None,
  dataset: data.Dataset | None = None,
  purpose: str = "restore",
) -> tuple[Run, Any, loop.TrainState, dict[str, Any]]:
  """``(run, graphdef, state, meta)`` of checkpoint ``step`` (default: the newest).

  Raises:
    ConfigError: when the config names no checkpoint directory.
    FileNotFoundError: when the directory holds no checkpoint, or none of ``step``
      (the message lists the steps there).
  """
  if not (config.checkpoint.dir or config.train.workdir):
    raise config_lib.ConfigError(
      f"checkpoint.dir: no checkpoints to {purpose}; set checkpoint.dir or train.workdir "
      "to the directory of a run."
    )
  run = Run(config, dataset=dataset)
  try:
    steps = run.ckpt.steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {run.ckpt.directory}: has the run started?")
    if step is not None and step not in steps:
      raise FileNotFoundError(
        f"No checkpoint of step {step} in {run.ckpt.directory}; its checkpoints are of "
        f"steps {', '.join(map(str, steps))}."
      )
    main = run.train_phase()
    state, meta = run.ckpt.restore(main.initial, step)
  finally:
    run.ckpt.close()
  return run, main.graphdef, state, meta


def config_from_workdir(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The validated config of the run in ``workdir`` (its ``config.json``)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: not the workdir of a `jaxprune train` run.")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config.train.workdir = str(workdir)  # the directory may have moved since the run
  config_lib.validate_config(config)
  return config
