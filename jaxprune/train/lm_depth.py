"""``jaxprune prune`` with ``posttrain.method=shortgpt``: a shallower language model.

Depth pruning (ShortGPT, Men et al. 2024) of a trained ``charlm``: restore the run's
checkpoint (as ``jaxprune prune`` does), measure every block's Block Influence
``1 - mean cos(x_in, x_out)`` on ``posttrain.calibration`` training sequences
(:func:`jaxprune.posttrain.block_influence`), remove the ``posttrain.drop_blocks``
blocks of lowest influence (:func:`jaxprune.posttrain.drop_blocks`: a shorter model,
blocks renumbered), and report the validation perplexity next to the dense model and
to removing the last blocks instead. Writes ``depth.md``, ``depth.json`` (the numbers
and the shorter model's config: ``model.depth`` updated, so
``models.from_config(config.model, ...)`` rebuilds it) and ``shallow.npz`` (its params)
into ``posttrain.out`` (default ``<train.workdir>/shortgpt_<n>``).

Examples:
  >>> from jaxprune.train import lm_depth
  >>> lm_depth.METHODS
  ('shortgpt',)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import time
from typing import Any, cast

import jax
import numpy as np
from flax import nnx

from jaxprune import fileio, posttrain
from jaxprune import tree as tree_lib
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors
from jaxprune.train import prune as prune_lib
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib
from jaxprune.train.config_type import Config

METHODS = ("shortgpt",)
NPZ_NAME, JSON_NAME, REPORT_NAME = "shallow.npz", "depth.json", "depth.md"


@dataclasses.dataclass(frozen=True)
class DepthResult:
  """What depth pruning did.

  Attributes:
    influence: each block's Block Influence, in order.
    removed: the blocks removed (lowest influence), ascending.
    perplexity: ``dense``, ``pruned`` (lowest influence removed) and ``last`` (the last
      blocks removed instead), validation perplexities.
    depth: ``(blocks before, blocks after)``.
    config: the shorter model's config (``model.depth`` updated).
    out: the directory written (``None``: nothing saved).
    seconds: wall time of the whole recipe.
  """

  influence: list[float]
  removed: list[int]
  perplexity: dict[str, float]
  depth: tuple[int, int]
  config: Config
  out: pathlib.Path | None
  seconds: float

  def report(self) -> str:
    n = len(self.removed)
    last = list(range(self.depth[0] - n, self.depth[0]))
    influence = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(self.influence))
    lines = [
      "| model | blocks | val. perplexity |",
      "|---|---|---|",
      f"| dense | {self.depth[0]} | {self.perplexity['dense']:.3f} |",
      f"| lowest Block Influence removed ({', '.join(map(str, self.removed))}) | "
      f"{self.depth[1]} | {self.perplexity['pruned']:.3f} |",
      f"| last blocks removed ({', '.join(map(str, last))}) | {self.depth[1]} | "
      f"{self.perplexity['last']:.3f} |",
      "",
      f"Block Influence (1 - mean cos(x_in, x_out)) per block: {influence}",
    ]
    if self.out is not None:
      lines.append(f"shorter model ({NPZ_NAME}, config in {JSON_NAME}) in {self.out}")
    return "\n".join(lines)


def check(config: Config) -> None:
  """The fields this recipe needs, before any data is loaded.

  Raises:
    ConfigError: naming the field: ``model.name`` not ``charlm``, ``posttrain.method``
      not ``shortgpt``, ``posttrain.drop_blocks`` not below ``model.depth``.
  """
  config_lib.validate_config(config)
  p = config.posttrain
  if config.model.name != "charlm":
    raise config_lib.ConfigError(
      f"model.name: posttrain.method={p.method!r} removes blocks of charlm, got "
      f"{config.model.name!r}."
    )
  if p.method not in METHODS:
    raise config_lib.ConfigError(f"posttrain.method: {p.method!r} is not {METHODS[0]}.")
  if p.drop_blocks >= config.model.depth:
    raise config_lib.ConfigError(
      f"posttrain.drop_blocks: {p.drop_blocks} blocks removed from a model of "
      f"model.depth={config.model.depth} leaves none; remove fewer."
    )


def output_dir(config: Config) -> pathlib.Path | None:
  """``posttrain.out``, else ``<train.workdir>/shortgpt_<n>``, else ``None``."""
  return prune_lib.posttrain_out(config, f"shortgpt_{config.posttrain.drop_blocks}")


def shorter_config(config: Config, n_blocks: int) -> Config:
  """A copy of ``config`` whose ``model.depth`` is ``n_blocks``."""
  new = copy.deepcopy(config)
  new.model.depth = n_blocks
  return new


def _perplexity(model: nnx.Module, split: data.Source, batch_size: int) -> float:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  got = step_lib.scores(step_lib.make_eval_step(graphdef), params, rest, split, batch_size)
  return math.exp(got["loss"])


def prune_depth(
  config: Config, *, step: int | None = None, dataset: data.Dataset | None = None
) -> DepthResult:
  """Restores, measures Block Influence, removes the lowest blocks, evaluates, saves.

  Raises:
    ConfigError: a bad field (:func:`check`) or no checkpoint directory, before any
      data is loaded.
    FileNotFoundError: no checkpoint there.
  """
  check(config)
  errors.check_out_dir(output_dir(config), "posttrain.out")
  state_lib.require_checkpoints(config, "prune", step)
  started = time.perf_counter()
  ds = dataset or data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, step=step, purpose="prune")
  host = sharding_lib.to_host(restored.state)
  model = nnx.merge(restored.graphdef, host.params, host.rest)
  model.eval()
  batch = config.data.eval_batch_size
  n, depth = config.posttrain.drop_blocks, config.model.depth
  influence = posttrain.block_influence(model, prune_lib.calibration_batches(config, ds.train))
  removed = sorted(int(i) for i in np.argsort(influence, kind="stable")[:n])
  shallow = posttrain.drop_blocks(model, removed)
  last = posttrain.drop_blocks(model, list(range(depth - n, depth)))
  perplexity = {
    "dense": _perplexity(model, ds.test, batch),
    "pruned": _perplexity(shallow, ds.test, batch),
    "last": _perplexity(last, ds.test, batch),
  }
  result = DepthResult(
    [float(v) for v in influence],
    removed,
    perplexity,
    (depth, depth - n),
    shorter_config(config, depth - n),
    output_dir(config),
    0.0,
  )
  result = dataclasses.replace(result, seconds=time.perf_counter() - started)
  if result.out is not None and jax.process_index() == 0:
    _save(result, shallow)
  return result


def _save(result: DepthResult, model: nnx.Module) -> None:
  out = result.out
  assert out is not None
  out.mkdir(parents=True, exist_ok=True)
  params = nnx.state(model, nnx.Param)
  arrays = {p: np.asarray(x) for p, x in tree_lib.leaves_with_paths(params)}
  fileio.savez(out / NPZ_NAME, cast(dict[str, Any], arrays))
  numbers = {
    "influence": result.influence,
    "removed": result.removed,
    "perplexity": result.perplexity,
    "depth": list(result.depth),
    "config": config_lib.config_json(result.config),
  }
  fileio.write_json(out / JSON_NAME, numbers, indent=2, default=str)
  fileio.write_text(
    out / REPORT_NAME, f"# Depth pruning of charlm (ShortGPT)\n\n{result.report()}\n"
  )
