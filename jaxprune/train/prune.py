"""``jaxprune prune``: one-shot pruning of a trained run from calibration data, no retraining.

The run's checkpoint (``train.workdir`` or ``checkpoint.dir``, as ``jaxprune eval``
reads it) is restored; ``posttrain.calibration`` sequences of the training split
calibrate the layers; the kernels matching ``posttrain.layers`` (by default every
projection inside the transformer blocks: the embeddings and the head stay dense, as in
the papers) are pruned with ``posttrain.method``:

* ``magnitude``: the smallest ``|w|`` per layer (the baseline of both papers);
* ``wanda``: ``|w| * ||X_j||_2`` per output (:func:`jaxprune.posttrain.wanda`);
* ``sparsegpt``: masks and weight updates from ``X^T X``
  (:func:`jaxprune.posttrain.sparsegpt`);

to ``posttrain.sparsity`` or the N:M ``posttrain.structure`` (along each kernel's
inputs). With ``posttrain.sequential`` the layers are calibrated block by block on the
outputs of the blocks already pruned (:func:`jaxprune.posttrain.prune`): one pass per
block from cached hidden states (``posttrain.one_pass``, ``stack=True``), or the traced
model up to each block (``blocks=posttrain.blocks``). ``posttrain.owl`` gives each block
OWL's sparsity from the outlier ratio of its Wanda scores (mean ``posttrain.sparsity``). The dense and the pruned model are evaluated on the
validation split (perplexity for a language model); the pruned state is saved as a
checkpoint with its masks (``masks.npz``) and a report (``prune.md``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

import jaxprune
from jaxprune import fileio, posttrain
from jaxprune import tree as tree_lib
from jaxprune.structures import NM
from jaxprune.train import checkpoint as checkpoint_lib
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors, models
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib
from jaxprune.train.config_type import Config

METHODS = ("magnitude", "wanda", "sparsegpt")


def target(config: Config) -> tuple[float, NM | None]:
  """``(sparsity, nm)`` of ``config.posttrain``: an N:M structure fixes the sparsity."""
  p = config.posttrain
  if p.structure == "unstructured":
    return float(p.sparsity), None
  n, m = (int(x) for x in p.structure.split(":"))
  nm = jaxprune.n_m(n, m)
  return nm.sparsity, nm


def target_name(config: Config) -> str:
  """``"50%"`` or ``"2:4"``: how tables and directories name the target."""
  p = config.posttrain
  return f"{p.sparsity:.0%}" if p.structure == "unstructured" else p.structure


def selected(pattern: str) -> Callable[[str, Any], bool]:
  """The kernels (``ndim >= 2``) whose path ``pattern`` finds: what ``posttrain.layers`` picks."""
  return lambda path, leaf: np.ndim(leaf) >= 2 and re.search(pattern, path) is not None


def _kernels(params: Any, pattern: str) -> dict[str, tuple[int, ...]]:
  pick = selected(pattern)
  return {
    path: tuple(np.shape(leaf))
    for path, leaf in tree_lib.leaves_with_paths(params)
    if pick(path, leaf)
  }


def check(config: Config) -> None:
  """Checks the ``posttrain`` fields against the model's shapes, before any data or work.

  Raises:
    ConfigError: naming the field: ``posttrain.layers`` matching no kernel (listing
      them), ``posttrain.blocks`` without one group or leaving a selected layer out,
      ``posttrain.structure`` whose M does not divide a selected kernel's inputs
      (naming the layer).
  """
  config_lib.validate_config(config)
  p, m = config.posttrain, config.model
  shape = (config.data.seq_len,) if m.name in models.LANGUAGE_MODELS else None
  shape = shape or data.IMAGE_SHAPES.get(config.data.name) or config_lib.PLACEHOLDER_SHAPE
  abstract = nnx.eval_shape(lambda: models.from_config(m, shape, 10))
  params = nnx.state(abstract, nnx.Param)
  for field, pattern in (("posttrain.layers", p.layers), ("posttrain.blocks", p.blocks)):
    try:
      re.compile(pattern)
    except re.error as e:
      message = f"{field}: {pattern!r} is not a regular expression ({e})."
      raise config_lib.ConfigError(message) from e
  kernels = _kernels(params, p.layers)
  if not kernels:
    every = ", ".join(_kernels(params, ""))
    raise config_lib.ConfigError(
      f"posttrain.layers: {p.layers!r} matches none of the kernels of {m.name}: {every}."
    )
  if p.sequential:
    blocks = re.compile(p.blocks)
    if blocks.groups != 1:
      raise config_lib.ConfigError(
        f"posttrain.blocks: {p.blocks!r} needs exactly one capturing group naming the block "
        "(e.g. '^blocks/(\\d+)/')."
      )
    outside = [k for k in kernels if not blocks.search(k)]
    if outside:
      raise config_lib.ConfigError(
        f"posttrain.blocks: {p.blocks!r} puts the selected layer {outside[0]!r} in no block; "
        "widen it, narrow posttrain.layers, or set posttrain.sequential=False."
      )
  _, nm = target(config)
  if p.owl and (nm is not None or not p.sequential or p.method == "magnitude"):
    raise config_lib.ConfigError(
      "posttrain.owl: OWL sets each block's sparsity for wanda or sparsegpt, block by block "
      f"(posttrain.sequential=True), unstructured; got method {p.method}, structure "
      f"{p.structure}, sequential {p.sequential}."
    )
  for path, kernel_shape in kernels.items():
    if nm is not None and kernel_shape[0] % nm.m:
      raise config_lib.ConfigError(
        f"posttrain.structure: {p.structure} groups {nm.m} consecutive inputs, but layer "
        f"{path!r} has {kernel_shape[0]} inputs (kernel {kernel_shape}), not a multiple of "
        f"{nm.m}; exclude it with posttrain.layers or choose another M."
      )


def calibration_batches(config: Config, split: data.Source) -> list[np.ndarray]:
  """``posttrain.calibration`` random training inputs (seed ``train.seed``), in batches.

  Batches have ``data.batch_size`` examples (the last one fewer).
  """
  n, size = config.posttrain.calibration, config.data.batch_size
  if n > len(split):
    raise config_lib.ConfigError(
      f"posttrain.calibration: {n} sequences, but the training split has {len(split)}."
    )
  rng = np.random.default_rng((config.train.seed, 1))
  indices = np.sort(rng.choice(len(split), n, replace=False))
  return [split.take(indices[i : i + size])[0] for i in range(0, n, size)]


def prune_model(config: Config, model: nnx.Module, batches: list[np.ndarray]) -> tuple[Any, Any]:
  """``(params, masks)``: ``model``'s ``nnx.Param`` state pruned as ``config.posttrain`` says.

  ``model`` is not changed. Masks are ``None`` for the params left dense.
  """
  p = config.posttrain
  sparsity, nm = target(config)
  if p.method == "magnitude":
    params = nnx.state(model, nnx.Param)
    pruner = jaxprune.magnitude(sparsity, where=selected(p.layers), structure=nm)
    masks = pruner.masks(params)
    return jaxprune.apply_mask(params, masks), masks
  options = {"blocksize": p.blocksize, "dampening": p.dampening} if p.method == "sparsegpt" else {}
  one_pass = p.sequential and p.one_pass
  return posttrain.prune(
    model,
    None,
    batches,
    method=p.method,
    sparsity=None if nm else sparsity,
    structure=nm,
    blocks=p.blocks if p.sequential and not one_pass else None,
    stack=True if one_pass else None,
    owl=posttrain.Owl(p.owl_threshold, p.owl_lambda) if p.owl else False,
    where=selected(p.layers),
    **options,
  )


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """What ``jaxprune prune`` did: the target, the scores before and after, per-layer sparsity.

  Attributes:
    method: ``magnitude``, ``wanda`` or ``sparsegpt``.
    target: ``"50%"`` or ``"2:4"``.
    dense: ``{"accuracy", "loss"}`` of the restored model on the validation split.
    pruned: the same for the pruned model.
    summary: :func:`jaxprune.summary` of the pruned kernels.
    language_model: report perplexities (``exp(loss)``).
    out: the directory written (``None``: nothing saved).
    seconds: calibration and pruning time (evaluation excluded).
  """

  method: str
  target: str
  dense: dict[str, float]
  pruned: dict[str, float]
  summary: jaxprune.Summary
  language_model: bool
  out: pathlib.Path | None
  seconds: float

  def table(self) -> str:
    """The markdown table: dense and pruned validation scores."""
    if self.language_model:
      header = "| model | sparsity | val. perplexity | val. token accuracy |"
      row = lambda name, s, sparsity: (  # noqa: E731
        f"| {name} | {sparsity} | {math.exp(s['loss']):.3f} | {s['accuracy']:.2%} |"
      )
    else:
      header = "| model | sparsity | val. loss | val. accuracy |"
      row = lambda name, s, sparsity: (  # noqa: E731
        f"| {name} | {sparsity} | {s['loss']:.4f} | {s['accuracy']:.2%} |"
      )
    return "\n".join(
      [
        header,
        "|---|---|---|---|",
        row("dense", self.dense, "0%"),
        row(self.method, self.pruned, f"{self.target} ({self.summary.sparsity:.1%} measured)"),
      ]
    )

  def report(self) -> str:
    """The table, per-layer sparsity and where the outputs went, as the CLI prints them."""
    lines = [self.table(), "", str(self.summary), f"time (calibrate + prune): {self.seconds:.1f} s"]
    if self.out is not None:
      lines.append(f"pruned checkpoint, masks.npz and prune.md in {self.out}")
    return "\n".join(lines)


def posttrain_out(config: Config, name: str) -> pathlib.Path | None:
  """``posttrain.out``, else ``<train.workdir>/<name>``, else ``None`` (every prune recipe's
  output folder)."""
  if config.posttrain.out:
    return pathlib.Path(config.posttrain.out)
  if not config.train.workdir:
    return None
  return pathlib.Path(config.train.workdir) / name


def output_dir(config: Config) -> pathlib.Path | None:
  """``posttrain.out``, else ``<train.workdir>/<method>_<target>``, else ``None``."""
  target = target_name(config).replace(":", "of").replace("%", "")
  return posttrain_out(config, f"{config.posttrain.method}_{target}")


def prune_checkpoint(
  config: Config, *, step: int | None = None, dataset: data.Dataset | None = None
) -> PruneResult:
  """Restores a run's checkpoint, calibrates, prunes, evaluates and saves the pruned state.

  Args:
    config: the run's config with its ``posttrain`` group.
    step: the checkpoint's step (default: the newest).
    dataset: the data (default: ``config.data``).

  Raises:
    ConfigError: a bad field (:func:`check`) or no checkpoint directory, before any
      data is loaded.
    FileNotFoundError: no checkpoint there.
  """
  check(config)
  errors.check_out_dir(output_dir(config), "posttrain.out")
  state_lib.require_checkpoints(config, "prune", step)
  ds = dataset or data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, step=step, purpose="prune")
  host = sharding_lib.to_host(restored.state)
  model = nnx.merge(restored.graphdef, host.params, host.rest)
  model.eval()
  eval_fn = step_lib.make_eval_step(restored.graphdef)
  batch = config.data.eval_batch_size
  dense = step_lib.scores(eval_fn, host.params, host.rest, ds.test, batch)
  start = time.perf_counter()
  params, masks = prune_model(config, model, calibration_batches(config, ds.train))
  params = jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  pruned = step_lib.scores(eval_fn, params, host.rest, ds.test, batch)
  summary = jaxprune.summary(params, where=selected(config.posttrain.layers))
  result = PruneResult(
    config.posttrain.method,
    target_name(config),
    dense,
    pruned,
    summary,
    config.model.name in models.LANGUAGE_MODELS,
    output_dir(config),
    seconds,
  )
  if result.out is not None and jax.process_index() == 0:
    _save(config, result, host._replace(params=params), masks, restored.meta)
  return result


def _save(config: Config, result: PruneResult, state: Any, masks: Any, meta: dict) -> None:
  out = result.out
  assert out is not None
  out.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(out / "checkpoints", every=1, keep=1)
  numbers = {
    "method": result.method,
    "target": result.target,
    "dense": result.dense,
    "pruned": result.pruned,
    "sparsity": result.summary.as_dict(),
  }
  try:
    ckpt.save(
      meta["step"],
      state,
      {
        **meta,
        "phase": "posttrain",
        "posttrain": numbers,
        "config": config_lib.config_json(config),
      },
      force=True,
    )
  finally:
    ckpt.close()
  kept: dict[str, Any] = {
    p: np.asarray(m) for p, m in tree_lib.leaves_with_paths(masks) if m is not None
  }
  fileio.savez(out / "masks.npz", kept)
  fileio.write_json(out / "prune.json", numbers, indent=2)
  fileio.write_text(
    out / "prune.md", f"# {result.method} at {result.target}\n\n{result.report()}\n"
  )
