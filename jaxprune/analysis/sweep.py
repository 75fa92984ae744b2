"""Sensitivity analysis: prune one layer at a time over a sparsity grid.

Li et al. (2017) prune the filters of each conv layer alone, measure accuracy without
retraining, and give layers that lose little a high pruning ratio and sensitive layers
(often the first conv) a low one. :func:`sensitivity` runs the sweep for any pruning
method and structure, :func:`plot_sensitivity` draws one curve per layer and
:func:`choose_ratios` turns a tolerated accuracy drop into per-layer ``overrides=``.
:func:`channel_sensitivity` sweeps whole coupled channel groups instead of one param.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxprune import fileio
from jaxprune import masks as masks_lib
from jaxprune import progress as progress_lib
from jaxprune import pruners as pruners_lib
from jaxprune import structures as structures_lib
from jaxprune import table as table_lib
from jaxprune import tree as tree_lib
from jaxprune.analysis import _plot
from jaxprune.select import check_keeps_some, check_sparsity

CHANNEL_GROUPS = "channel groups"  # the structure name of channel_sensitivity sweeps
_METHODS = {"magnitude": pruners_lib.magnitude, "random": pruners_lib.random}


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """Accuracy with one layer pruned at a time: ``print`` it for a table.

  Attributes:
    sparsities: the grid, ascending.
    accuracy: ``{param path: accuracy at each sparsity}``, layers in natural order.
    dense: the accuracy of the unpruned params.
    structure: the name of the structure pruned (``"unstructured"``, ``"filters"``, ...).
  """

  sparsities: tuple[float, ...]
  accuracy: dict[str, tuple[float, ...]]
  dense: float
  structure: str = "unstructured"

  @property
  def layers(self) -> tuple[str, ...]:
    return tuple(self.accuracy)

  def drop(self, layer: str) -> tuple[float, ...]:
    """``dense - accuracy`` of ``layer`` at each sparsity."""
    return tuple(self.dense - a for a in self.accuracy[layer])

  def to_csv(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes ``layer,sparsity,accuracy,drop`` rows (one per layer and sparsity)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_write(path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["layer", "sparsity", "accuracy", "drop"])
      for layer, row in self.accuracy.items():
        for s, a in zip(self.sparsities, row):
          writer.writerow([layer, s, a, self.dense - a])
    return path

  def table(self) -> str:
    header = ("layer", *(f"s={s:g}" for s in self.sparsities))
    body = [(layer, *(f"{a:.4g}" for a in row)) for layer, row in self.accuracy.items()]
    title = f"accuracy with one layer pruned ({self.structure}); dense: {self.dense:.4g}"
    return table_lib.text_table(header, body, title=title)

  def __str__(self) -> str:
    return self.table()


def sensitivity(
  params: Any,
  evaluate: Callable[[Any], Any],
  sparsities: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9),
  *,
  where: tree_lib.Where = None,
  structure: Any = None,
  method: str | Callable[..., pruners_lib.Pruner] = "magnitude",
  progress: bool = True,
) -> Sensitivity:
  """Prunes each selected layer alone at each sparsity and records ``evaluate``.

  For every param ``p`` chosen by ``where`` and every sparsity ``s``, the masks of
  ``method(s, where="^" + re.escape(p) + "$", structure=structure)`` are applied to
  ``params`` (the other layers stay dense) and ``evaluate`` is called on the result.
  Sparsity 0 reuses the dense accuracy. A progress bar counts the layer x sparsity runs
  (plain lines when stderr is not a terminal, see :mod:`jaxprune.progress`).

  Args:
    params: the trained params pytree.
    evaluate: ``params -> accuracy`` (a number; larger is better), e.g. validation
      accuracy of the model with these params.
    sparsities: the grid, each in ``[0, 1)`` (sorted, duplicates dropped).
    where: which params to sweep (default: weight matrices and conv kernels).
    structure: ``"unstructured"`` (default), ``"filters"`` (Li et al.), ``"neurons"``,
      ``"channels"``, ``jaxprune.blocks(...)``, ...
    method: ``"magnitude"``, ``"random"``, or a factory
      ``(sparsity, *, where, structure) -> Pruner``.
    progress: show the progress bar.

  Returns:
    A :class:`Sensitivity` table.

  Raises:
    ValueError: before any evaluation, for a grid value outside ``[0, 1)``, a layer the
      structure does not fit (``blocks`` that do not divide it, a 1-D param), or one
      whose groups the grid's largest sparsity would all remove (0.9 of 4 filters).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import sensitivity
    >>> params = {"a": jnp.arange(1., 9.).reshape(2, 4), "b": jnp.ones((2, 4))}
    >>> result = sensitivity(params, lambda p: p["a"].sum() + p["b"].sum(), (0.0, 0.5),
    ...                      progress=False)
    >>> result.accuracy
    {'a': (44.0, 34.0), 'b': (44.0, 40.0)}
  """
  grid = _grid(sparsities)
  make = _pruner_factory(method)
  struct = structures_lib.as_structure(structure)
  layers = tree_lib.selected_paths(params, where, what="sensitivity")
  # Before any evaluation: a layer the structure does not fit, or that the grid's largest
  # sparsity would empty, would otherwise fail at its turn, after the layers before it.
  leaves = dict(tree_lib.leaves_with_paths(params))
  for layer in layers:
    shape = tuple(np.shape(leaves[layer]))
    struct.check(layer, shape)
    if struct.poolable:
      n = jax.eval_shape(struct.group_scores, jax.ShapeDtypeStruct(shape, np.float32)).size
      check_keeps_some(n, grid[-1], repr(layer), structures_lib.unit(struct))

  def masks_for(layer, s):
    return make(s, where="^" + re.escape(layer) + "$", structure=structure).masks(params)

  return _sweep(params, evaluate, layers, grid, masks_for, struct.name, progress)


def channel_sensitivity(
  plan: Any,
  params: Any,
  evaluate: Callable[[Any], Any],
  sparsities: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
  *,
  norm: str = "l1",
  progress: bool = True,
) -> Sensitivity:
  """Removes whole channels of one coupled group at a time, smallest filter norm first.

  The sweep of Li et al. (2017) for nets with BatchNorm or residual adds: for every
  prunable group of ``plan`` and every sparsity ``s``, the masks of
  :func:`jaxprune.surgery.channel_masks` remove ``round(s * C)`` of that group's
  channels everywhere they exist (the filters, the norm's scale and bias, the
  consumers' input channels), so the accuracy measured is that of the smaller network
  :func:`jaxprune.surgery.shrink` would build. Masking only a conv's filters before a
  BatchNorm would leave each channel emitting a constant instead.

  Args:
    plan: from :func:`jaxprune.surgery.plan`.
    params: the trained params pytree.
    evaluate: ``params -> accuracy``.
    sparsities: the grid, each in ``[0, 1)``.
    norm: ``"l1"`` or ``"l2"``, the filter norm that ranks the channels.
    progress: show the progress bar.

  Returns:
    A :class:`Sensitivity` keyed by group name (the producer's path):
    ``channel_masks(plan, params, choose_ratios(result, max_drop))`` prunes with the
    ratios it supports.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> from jaxprune.analysis import channel_sensitivity
    >>> net = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
    >>> plan = surgery.plan(net, example_input=jnp.ones((1, 2)))
    >>> params = nnx.state(net, nnx.Param)
    >>> result = channel_sensitivity(
    ...   plan, params, lambda p: (p["layers"][1]["kernel"][...] != 0).sum(), (0.0, 0.5),
    ...   progress=False)
    >>> result.accuracy
    {'layers/0/kernel': (4.0, 2.0)}
  """
  from jaxprune.surgery.channels import channel_masks

  grid = _grid(sparsities)
  layers = [g.name for g in plan.groups if not g.blocked]
  if not layers:
    raise ValueError(f"The plan has no prunable group: {plan}")

  def masks_for(group, s):
    return channel_masks(plan, params, {group: s}, norm=norm)

  return _sweep(
    params, evaluate, layers, grid, masks_for, f"{CHANNEL_GROUPS}, {norm.upper()}", progress
  )


def _grid(sparsities: Sequence[float]) -> tuple[float, ...]:
  if isinstance(sparsities, str | bytes) or not hasattr(sparsities, "__iter__"):
    raise ValueError(f"`sparsities` must be a sequence of numbers in [0, 1), got {sparsities!r}.")
  values = list(sparsities)
  for s in values:
    a = np.asarray(s)
    if a.ndim or a.dtype == bool or not np.issubdtype(a.dtype, np.number):
      raise ValueError(f"`sparsities` must hold numbers in [0, 1); found {s!r}.")
  grid = tuple(sorted({float(s) for s in values}))
  if not grid:
    raise ValueError("`sparsities` is empty: pass a grid such as (0.0, 0.5, 0.9).")
  for s in grid:
    check_sparsity(s)
  return grid


def _score(value: Any, what: str) -> float:
  """``evaluate``'s result as a float: one finite number, or an error saying what came back."""
  array = np.asarray(jax.device_get(value))
  if array.shape != () or not np.issubdtype(array.dtype, np.number):
    raise ValueError(
      f"`evaluate` must return one number (e.g. an accuracy); for {what} it returned "
      f"{type(value).__name__} of shape {array.shape}, dtype {array.dtype}."
    )
  return float(array)


def _sweep(
  params: Any,
  evaluate: Callable[[Any], Any],
  layers: Sequence[str],
  grid: tuple[float, ...],
  masks_for: Callable[[str, float], Any],
  name: str,
  progress: bool,
) -> Sensitivity:
  """Evaluates ``params`` masked by ``masks_for(layer, s)`` for each layer and sparsity."""
  dense = _score(evaluate(params), "the dense params")
  accuracy = {}
  with progress_lib.bar(
    total=len(layers) * len(grid), desc="sensitivity", unit="run", disable=not progress
  ) as bar:
    for layer in layers:
      row = []
      for s in grid:
        bar.set_postfix_str(f"{layer} @ {s:g}")
        if s == 0.0:
          row.append(dense)
        else:
          score = evaluate(masks_lib.apply_mask(params, masks_for(layer, s)))
          row.append(_score(score, f"{layer} at sparsity {s:g}"))
        bar.update()
      accuracy[layer] = tuple(row)
  return Sensitivity(grid, accuracy, dense, name)


def _pruner_factory(method: str | Callable[..., pruners_lib.Pruner]) -> Callable[..., Any]:
  if callable(method):
    return method
  if method not in _METHODS:
    raise ValueError(
      f"Unknown method {method!r}; use {sorted(_METHODS)} or a factory "
      "(sparsity, *, where, structure) -> jaxprune.Pruner."
    )
  return _METHODS[method]


def choose_ratios(
  result: Sensitivity, max_drop: float, *, regex: bool | None = None
) -> dict[str, float]:
  """Per layer, the largest sparsity up to which the accuracy drop stays within ``max_drop``.

  Li et al.'s recipe: walking up the grid, a layer's ratio is the last sparsity before
  the first one whose drop ``dense - accuracy`` exceeds ``max_drop`` (0 if even the
  smallest does). Sensitive layers get small ratios, robust layers large ones.

  Args:
    result: a :class:`Sensitivity` sweep.
    max_drop: the tolerated accuracy loss, in the units ``evaluate`` returns.
    regex: key the result by ``"^" + re.escape(path) + "$"`` so it can be passed as a
      pruner's ``overrides=`` (a bare path would also match longer paths ending in it);
      ``False`` keys it by the plain param path. The default, ``None``, is ``True`` for
      a :func:`sensitivity` sweep and ``False`` for a :func:`channel_sensitivity` one
      (group names, as :func:`jaxprune.surgery.channel_masks` takes them).

  Returns:
    ``{layer: sparsity}``.

  Examples:
    >>> from jaxprune.analysis import Sensitivity, choose_ratios
    >>> r = Sensitivity((0.0, 0.5, 0.9), {"conv1": (0.9, 0.7, 0.2), "fc": (0.9, 0.9, 0.88)}, 0.9)
    >>> choose_ratios(r, 0.05, regex=False)
    {'conv1': 0.0, 'fc': 0.9}
    >>> choose_ratios(r, 0.05)
    {'^conv1$': 0.0, '^fc$': 0.9}
  """
  if max_drop < 0:
    raise ValueError(f"max_drop is a tolerated accuracy loss and must be >= 0, got {max_drop}.")
  if regex is None:
    regex = not result.structure.startswith(CHANNEL_GROUPS)
  ratios = {}
  for layer in result.layers:
    best = 0.0
    for s, drop in zip(result.sparsities, result.drop(layer)):
      if drop > max_drop + 1e-9:  # float slack: 0.9 - 0.89 > 0.01 in binary
        break
      best = s
    ratios["^" + re.escape(layer) + "$" if regex else layer] = best
  return ratios


def plot_sensitivity(
  result: Sensitivity, path: str | os.PathLike, *, title: str | None = None
) -> pathlib.Path:
  """Draws accuracy against sparsity, one curve per layer, the dense accuracy dashed.

  Args:
    result: a :class:`Sensitivity` sweep.
    path: where the PNG goes (parent folders are created).
    title: the figure title (default: names the structure).

  Returns:
    The path written.
  """
  fig = _plot.figure(width=6.0, height=4.0)
  ax = fig.add_subplot()
  for layer, row in result.accuracy.items():
    ax.plot(result.sparsities, row, marker="o", label=layer)
  ax.axhline(result.dense, color="gray", linestyle="--", linewidth=1, label="dense")
  ax.set_xlabel("sparsity of the pruned layer")
  ax.set_ylabel("accuracy")
  ax.set_title(title or f"Sensitivity to pruning one layer ({result.structure})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", ncol=1 + len(result.accuracy) // 12)
  return _plot.save(fig, path)
