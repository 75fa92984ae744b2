"""Histograms: weights through the prune / fine-tune stages, APoZ per layer (PNG files)."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.analysis import _plot


def _weights(params: Any, where: tree_lib.Where) -> dict[str, np.ndarray]:
  by_path = dict(tree_lib.leaves_with_paths(params))
  return {
    p: np.asarray(jax.device_get(by_path[p]), np.float32).ravel()
    for p in tree_lib.selected_paths(params, where, what="plot_weight_histograms")
  }


def _check_bins(bins: Any) -> None:
  if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
    raise ValueError(f"bins must be an integer >= 1 (the number of bins), got {bins!r}.")


def _bin_edges(values: list[np.ndarray], bins: int) -> np.ndarray:
  """Common bins over the finite non-zero entries of all ``values``."""
  finite = np.concatenate([v[(v != 0) & np.isfinite(v)] for v in values])
  lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
  return np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)


def plot_weight_histograms(
  stages: Mapping[str, Any],
  path: str | os.PathLike,
  *,
  where: tree_lib.Where = None,
  per_layer: bool = False,
  bins: int = 80,
) -> pathlib.Path:
  """One figure of weight histograms, one panel per stage (and per layer if asked).

  Han et al. (2015) show the weights of a layer after training, after pruning (a gap
  around zero) and after fine-tuning (the survivors spread into the gap). Exact zeros
  are the pruned weights: they are left out of the histogram (they would dwarf it) and
  counted in the panel title. The stages of a row share their bins.

  Args:
    stages: ``{stage name: params}`` in display order, e.g.
      ``{"trained": p0, "pruned": p1, "fine-tuned": p2}``.
    path: where the PNG goes (parent folders are created).
    where: which params to include (default: weight matrices and conv kernels).
    per_layer: one row per layer instead of all selected weights pooled.
    bins: the number of histogram bins.

  Returns:
    The path written.

  Examples:
    >>> import jax.numpy as jnp, tempfile, os
    >>> from jaxprune.analysis import plot_weight_histograms
    >>> w = jnp.linspace(-1., 1., 64).reshape(8, 8)
    >>> out = plot_weight_histograms({"trained": {"w": w}, "pruned": {"w": w * (abs(w) > .5)}},
    ...                              os.path.join(tempfile.mkdtemp(), "w.png"))
    >>> out.stat().st_size > 0
    True
  """
  if not stages:
    raise ValueError("`stages` is empty: pass {stage name: params}.")
  _check_bins(bins)
  weights = {name: _weights(params, where) for name, params in stages.items()}
  layers = list(next(iter(weights.values())))
  for name, w in weights.items():
    if list(w) != layers:
      raise ValueError(f"Stage {name!r} has params {list(w)} but the first stage has {layers}.")

  rows = layers if per_layer else [None]
  fig = _plot.figure(len(rows), len(stages), width=3.6, height=2.6)
  axes = np.asarray(fig.subplots(len(rows), len(stages), sharex="row", squeeze=False))
  for i, layer in enumerate(rows):
    row = [
      w[layer] if layer is not None else np.concatenate(list(w.values())) for w in weights.values()
    ]
    edges = _bin_edges(row, bins)
    for j, (name, v) in enumerate(zip(weights, row)):
      zeros = int(v.size - np.count_nonzero(v))
      ax = axes[i, j]
      ax.hist(v[v != 0], bins=edges, color=f"C{j}")
      label = name if layer is None else f"{layer} ({name})"
      ax.set_title(
        f"{label}\n{zeros:,} of {v.size:,} zero ({zeros / max(v.size, 1):.1%})", fontsize=9
      )
      ax.tick_params(labelsize=8)
      if i == len(rows) - 1:
        ax.set_xlabel("weight (zeros left out)", fontsize=8)
      if j == 0:
        ax.set_ylabel("count", fontsize=8)
  return _plot.save(fig, path)


def plot_apoz_histogram(
  apoz_values: Mapping[str, Any], path: str | os.PathLike, *, bins: int = 20
) -> pathlib.Path:
  """Histograms of APoZ over the units of each layer, one panel per layer.

  Args:
    apoz_values: ``{layer path: APoZ per unit}``, as :func:`jaxprune.analysis.apoz`
      returns.
    path: where the PNG goes (parent folders are created).
    bins: bins over ``[0, 1]``.

  Returns:
    The path written.

  Examples:
    >>> import numpy as np, tempfile, os
    >>> from jaxprune.analysis import plot_apoz_histogram
    >>> out = plot_apoz_histogram({"fc1": np.array([0., .5, 1.])},
    ...                           os.path.join(tempfile.mkdtemp(), "apoz.png"))
    >>> out.stat().st_size > 0
    True
  """
  if not apoz_values:
    raise ValueError("`apoz_values` is empty: pass {layer path: APoZ per unit}.")
  _check_bins(bins)
  for layer, values in apoz_values.items():
    v = np.asarray(values, np.float64).ravel()
    if not v.size:
      raise ValueError(f"apoz_values[{layer!r}] is empty: it needs one APoZ per unit.")
    if not np.all((v >= 0) & (v <= 1)):
      bad = v[~((v >= 0) & (v <= 1))][0]
      raise ValueError(
        f"apoz_values[{layer!r}] must be fractions of zero outputs in [0, 1]; found {bad}."
      )
  cols = min(len(apoz_values), 3)
  rows = math.ceil(len(apoz_values) / cols)
  fig = _plot.figure(rows, cols, width=3.6, height=2.6)
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax, (layer, values) in zip(axes, apoz_values.items()):
    v = np.asarray(values, np.float64).ravel()
    ax.hist(v, bins=bins, range=(0.0, 1.0), color="C0")
    ax.set_title(f"{layer}: {v.size} units, mean APoZ {v.mean():.2f}", fontsize=9)
    ax.set_xlabel("APoZ (fraction of zero outputs)", fontsize=8)
    ax.set_ylabel("units", fontsize=8)
    ax.tick_params(labelsize=8)
  for ax in axes[len(apoz_values) :]:
    ax.set_visible(False)
  return _plot.save(fig, path)
