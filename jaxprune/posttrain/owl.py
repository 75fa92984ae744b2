"""OWL (Yin et al. 2024): a block's sparsity from the outliers among its Wanda scores.

For block ``b``, ``D_b`` is the fraction of the Wanda scores ``|W_ij| * ||X_j||_2`` of
all its pruned layers (pooled) that exceed ``M`` times their mean (``M = 5`` in the
paper). Densities grow with ``D_b``: ``1 - s - lambda + 2 lambda (D_b - min D) / (max D
- min D)``, then shifted so that they average ``1 - s`` (the reference code's steps);
each block is pruned to one minus its density. Blocks with more outliers keep more
weights; the mean of the blocks' sparsities is ``s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxprune import select
from jaxprune.posttrain import targets
from jaxprune.posttrain.stats import InputStats
from jaxprune.posttrain.wanda_masks import wanda_scores


class Owl(NamedTuple):
  """OWL's hyperparameters: ``threshold`` (``M``) and ``lam`` (``lambda``).

  Examples:
    >>> from jaxprune import posttrain
    >>> posttrain.Owl(), posttrain.Owl(lam=0.1).lam  # prune(..., owl=posttrain.Owl(...))
    (Owl(threshold=5.0, lam=0.08), 0.1)
  """

  threshold: float = 5.0
  lam: float = 0.08


def outlier_ratios(
  params: Any, stats: dict[str, InputStats], groups: Sequence[Sequence[str]], threshold: float = 5.0
) -> np.ndarray:
  """``D_b`` per group of layers: the fraction of its pooled Wanda scores above
  ``threshold`` times their mean.

  Args:
    params: the params (paths matched to ``stats`` as :func:`~jaxprune.posttrain.wanda`).
    stats: ``{path: InputStats}`` of at least the layers in ``groups``.
    groups: the layers (paths as in ``stats``) of each block, e.g. from
      :func:`~jaxprune.posttrain.group_blocks`.
    threshold: ``M``.

  Examples:
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jaxprune import posttrain
    >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> x = np.ones((8, 4), np.float32) * np.array([100.0, 1, 1, 1], np.float32)
    >>> stats = posttrain.calibrate(model, None, [x])
    >>> posttrain.outlier_ratios(nnx.state(model), stats, [["kernel"]], threshold=2.0)
    array([0.25])
  """
  found = {
    path: (kernel, st) for path, kernel, st in targets.pairs(params, stats, "outlier_ratios")
  }
  by_key = {st.layer.path: found[path] for path, (kernel, st) in found.items()}
  out = []
  for group in groups:
    scores = [
      np.asarray(wanda_scores(st.layer.as_matrix(kernel), st.column_norms())).ravel()
      for kernel, st in (by_key[p] for p in group)
    ]
    pooled = np.concatenate(scores).astype(np.float64)
    out.append(float(np.mean(pooled > threshold * pooled.mean())))
  return np.asarray(out)


def sparsities_from_ratios(
  ratios: Sequence[float] | np.ndarray, sparsity: float, lam: float = 0.08
) -> list[float]:
  """OWL's per-block sparsities from outlier ratios ``D_b`` (see the module docstring).

  Raises:
    ValueError: a block sparsity outside ``[0, 1)`` (``sparsity`` and ``lam`` too large or
      too small together), naming both.
  """
  select.check_sparsity(sparsity, "owl: sparsity")
  if not lam >= 0:
    raise ValueError(f"owl: lam must be >= 0, got {lam}.")
  d = np.asarray(ratios, np.float64)
  span = d.max() - d.min()
  scaled = (d - d.min()) / span * 2 * lam if span > 0 else np.zeros_like(d)
  density = scaled - scaled.mean() + (1 - sparsity)
  out = [float(1 - x) for x in density]
  if min(out) < 0 or max(out) >= 1:
    raise ValueError(
      f"owl: sparsity={sparsity} with lam={lam} gives block sparsities from {min(out):.3f} "
      f"to {max(out):.3f}, outside [0, 1); lower lam."
    )
  return out


def owl_sparsities(
  params: Any,
  stats: dict[str, InputStats],
  groups: Sequence[Sequence[str]],
  sparsity: float,
  *,
  threshold: float = 5.0,
  lam: float = 0.08,
) -> list[float]:
  """OWL's sparsity of each block (in the order of ``groups``), averaging ``sparsity``.

  Args:
    params: the dense params.
    stats: input statistics of the dense model (``calibrate(..., hessian=False)`` is
      enough), with the layers of ``groups``.
    groups: the layers of each block (:func:`~jaxprune.posttrain.group_blocks`).
    sparsity: the target mean sparsity ``s``.
    threshold: ``M``, outliers are scores above ``M`` times the block's mean score.
    lam: ``lambda``, the half-width of the range of the blocks' densities.

  Examples:
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jaxprune import posttrain
    >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (64, 8)) * np.geomspace(0.1, 10, 8)
    >>> stats = posttrain.calibrate(model, None, [x], hessian=False)
    >>> s = posttrain.owl_sparsities(nnx.state(model), stats,
    ...                              [["layers/0/kernel"], ["layers/2/kernel"]], 0.7)
    >>> round(float(np.mean(s)), 6), sorted(round(v, 2) for v in s)
    (0.7, [0.62, 0.78])
  """
  return sparsities_from_ratios(outlier_ratios(params, stats, groups, threshold), sparsity, lam)
