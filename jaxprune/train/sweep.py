"""``jaxprune sensitivity``: the per-layer sensitivity sweep of a recipe's trained model.

The model is the run's checkpoint (``--step``, default the newest) when the config's
``train.workdir`` / ``checkpoint.dir`` holds one; otherwise it is trained here, dense
(with the recipe's regularizer, if any), for ``prune.begin`` steps: the model the recipe
would prune. The sweep then prunes one layer at a time over ``sensitivity.grid`` and
measures accuracy on the validation slice (the last ``sensitivity.examples`` training
examples):

* channel methods (``l1_filter``, ``slimming``, ``apoz``, ``ssl``) and
  ``prune.structure`` ``filters`` / ``channels``: whole coupled channel groups, smallest
  filter L1 norm first (:func:`jaxprune.analysis.channel_sensitivity`);
* otherwise each kernel alone with ``prune.method`` (magnitude or random) and
  ``prune.structure`` (:func:`jaxprune.analysis.sensitivity`).

It writes ``sensitivity.csv`` and ``sensitivity.png`` and prints the table with the
ratios :func:`jaxprune.analysis.choose_ratios` picks for ``sensitivity.max_drop``.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any

import numpy as np
from flax import nnx

from jaxprune import surgery
from jaxprune.analysis.sweep import (
  Sensitivity,
  channel_sensitivity,
  choose_ratios,
  plot_sensitivity,
  sensitivity,
)
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors, structured
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib
from jaxprune.train.config_type import Config
from jaxprune.train.run import Run
from jaxprune.train.step import TrainState

SWEEP_METHODS = ("magnitude", "random")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sensitivity sweep of a recipe's model and what it wrote.

  Attributes:
    result: the :class:`jaxprune.analysis.Sensitivity` table.
    ratios: ``{layer or group: sparsity}`` within ``sensitivity.max_drop``.
    source: where the model came from (a checkpoint step, or trained here).
    csv: the CSV written.
    png: the plot written.
  """

  result: Sensitivity
  ratios: dict[str, float]
  max_drop: float
  source: str
  csv: pathlib.Path
  png: pathlib.Path

  def report(self) -> str:
    ratios = "\n".join(f"  {layer}: {ratio:g}" for layer, ratio in self.ratios.items())
    return "\n".join([
      f"model: {self.source}",
      str(self.result),
      f"largest sparsity within an accuracy drop of {self.max_drop:g}:",
      ratios,
      f"wrote {self.csv} and {self.png}",
    ])  # fmt: skip


def _channel_sweep(config: Config) -> bool:
  return structured.is_channel_method(config) or config.prune.structure in ("filters", "channels")


def _trained_state(
  config: Config, ds: data.Dataset, step: int | None
) -> tuple[TrainState, Any, str]:
  """The run's checkpoint, or a model trained here for ``prune.begin`` steps."""
  if state_lib.checkpoint_steps(config):
    restored = state_lib.restore(config, ds.image_shape, ds.num_classes, step=step, purpose="sweep")
    meta = restored.meta
    return (
      restored.state,
      restored.graphdef,
      f"checkpoint {restored.directory}, {meta['phase']} step {meta['step']}",
    )
  config = copy.deepcopy(config)
  steps = max(1, config.prune.begin)
  config.prune.method = "none"
  config.train.steps = steps
  config.train.workdir = ""
  config.checkpoint.dir = ""
  result = Run(config, dataset=ds).execute()
  return result.state, result.graphdef, f"trained here, dense, for {steps} steps"


def run_sweep(
  config: Config,
  *,
  step: int | None = None,
  out: str | pathlib.Path | None = None,
  dataset: Any = None,
) -> Sweep:
  """Sweeps the sensitivity of the model ``config`` describes (see the module doc).

  Args:
    config: a validated recipe config.
    step: the checkpoint to sweep (default: the newest; trains a model when there is
      no checkpoint).
    out: the folder for ``sensitivity.csv`` / ``.png`` (default: ``train.workdir``,
      else the current folder).
    dataset: a :class:`jaxprune.train.data.Dataset` instead of ``config.data``.

  Raises:
    ConfigError: for a ``prune.method`` the sweep cannot rank layers with (saliency
      needs gradients).
    FileNotFoundError: when ``step`` is given but the run has no checkpoints.
  """
  p = config.prune
  channel = _channel_sweep(config)
  if not channel and p.method not in SWEEP_METHODS:
    raise config_lib.ConfigError(
      f"prune.method: the sweep prunes each layer with {' or '.join(SWEEP_METHODS)} "
      f"(or whole channel groups); got {p.method!r}. Override it, e.g. "
      "--config.prune.method=magnitude."
    )
  config_lib.validate_config(config)
  errors.check_out_dir(out, "out")
  if step is not None:
    state_lib.require_checkpoints(config, "sweep", step)
  ds = dataset or data.from_config(config.data)
  state, graphdef, source = _trained_state(config, ds, step)
  validation = structured.validation_split(config, ds.train)
  eval_fn = step_lib.make_eval_step(graphdef)

  def evaluate(params):
    return step_lib.evaluate(
      eval_fn, state._replace(params=params), validation, config.data.eval_batch_size
    )

  grid, progress = tuple(config.sensitivity.grid), config.train.progress
  if channel:
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    plan = surgery.plan(model, example_input=ds.test.take(np.arange(1))[0])
    result = channel_sensitivity(plan, state.params, evaluate, grid, progress=progress)
  else:
    result = sensitivity(
      state.params, evaluate, grid, structure=p.structure, method=p.method, progress=progress
    )
  folder = pathlib.Path(out or config.train.workdir or ".")
  csv = result.to_csv(folder / "sensitivity.csv")
  png = plot_sensitivity(result, folder / "sensitivity.png")
  ratios = choose_ratios(result, config.sensitivity.max_drop, regex=False)
  return Sweep(result, ratios, config.sensitivity.max_drop, source, csv, png)
