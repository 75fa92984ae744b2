"""Wanda (Sun et al. 2023): prune by |weight| x input norm, per output, no weight update."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import select
from jaxprune.posttrain import targets
from jaxprune.posttrain.stats import InputStats
from jaxprune.structures import NM


def wanda_scores(kernel: jax.Array, norms: jax.Array) -> jax.Array:
  """``S_ij = |W_ij| * ||X_i||_2`` for a ``[n_in, n_out]`` kernel (float32)."""
  return jnp.abs(kernel.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None]


@jax.jit
def per_output_mask(scores: jax.Array, n_removed: Any) -> jax.Array:
  """Keeps the ``n_in - n_removed`` largest scores of every column (output) of ``[n_in, n_out]``.

  Ties keep the lower input index (a stable descending order), as :mod:`jaxprune.select`.
  ``n_removed`` is an int or int32 scalar, traced: one compiled program per shape serves
  every sparsity (a sparsity sweep, or OWL's per-block sparsities).
  """
  n_in = scores.shape[0]
  # Column by column only (no flattening, no scatter), so columns split over a mesh stay
  # split: an input's rank in its column is where the sorted order puts it.
  keys = select.element_keys(scores)
  order = jnp.argsort(~keys, axis=0, stable=True)  # ~ reverses the unsigned order
  rank = jnp.argsort(order, axis=0)
  return rank < n_in - n_removed


@functools.partial(jax.jit, static_argnames=("nm",))
def _nm_mask(scores: jax.Array, nm: NM) -> jax.Array:
  return nm.keep(scores, jnp.int32(nm.n))


def wanda_mask(
  kernel: jax.Array, norms: jax.Array, sparsity: float | None = None, *, structure: Any = None
) -> jax.Array:
  """The Wanda mask of one ``[n_in, n_out]`` kernel given its inputs' norms ``||X_i||_2``.

  Unstructured: exactly ``round(sparsity * n_in)`` removed in every column (output), by
  Python's float64 ``round``. N:M (``structure=jaxprune.n_m(2, 4)``): ``n`` kept of every
  ``m`` consecutive inputs of every output. Ties keep the lower input index.

  Raises:
    ValueError: a kernel that is not a float matrix, ``norms`` not shaped ``[n_in]``,
      NaN or inf among the norms, a bad sparsity or N:M.
  """
  s, nm = targets.resolve_target(sparsity, structure, "wanda")
  n_in, _ = targets.check_kernel(kernel, "wanda_mask")
  if jnp.shape(norms) != (n_in,):
    raise ValueError(
      f"wanda_mask: norms must be [n_in] = [{n_in}] (one ||X_j||_2 per input feature, a "
      f"row of the kernel), got shape {jnp.shape(norms)}."
    )
  if select.is_concrete(norms):
    bad = np.flatnonzero(~np.isfinite(np.asarray(norms)))
    if bad.size:  # a NaN score would rank first: the feature's weights would all be kept
      raise ValueError(
        f"wanda: the input norms are NaN or inf at input feature {int(bad[0])} ({bad.size} "
        f"of {norms.shape[0]}): the calibration inputs of that feature were not finite."
      )
  scores = wanda_scores(kernel, norms)
  if nm is not None:
    targets.check_nm(nm, "kernel", kernel.shape[0])
    return _nm_mask(scores, nm)
  select.check_keeps_some(n_in, s, "wanda: each output's column", "inputs")
  return per_output_mask(scores, jnp.int32(select.n_pruned(n_in, s)))


def wanda(
  params: Any,
  stats: dict[str, InputStats],
  sparsity: float | None = None,
  *,
  structure: Any = None,
) -> Any:
  """Wanda masks for every layer with statistics; the weights are not changed.

  Each kernel is seen as ``[inputs, outputs]`` (:class:`~jaxprune.surgery.linear.Layer`:
  the axes the traced ``dot_general`` contracts, in the weight's own order, flattened
  into the input features: a Dense kernel as it is, an ``[out, in]`` weight transposed,
  a LinearGeneral ``[in..., out...]`` kernel or an einsum weight reshaped), scored by
  ``|W_ij| * ||X_i||_2`` and pruned per output column. N:M groups are ``m`` consecutive
  inputs of the stored weight (in its memory order).

  Args:
    params: the params (Linen dict or ``nnx.State``); paths are matched to ``stats``
      exactly (a leading ``params/`` aside).
    stats: ``{path: InputStats}`` from :func:`~jaxprune.posttrain.calibrate`.
    sparsity: the fraction removed per output, in ``[0, 1)`` (default 0.5); for N:M,
      ``None`` or ``1 - n/m``.
    structure: ``None`` (unstructured) or ``jaxprune.n_m(n, m)``, groups of ``m``
      consecutive input features.

  Returns:
    A mask tree shaped like ``params`` (bool arrays for the layers in ``stats``,
    ``None`` elsewhere), ready for ``jaxprune.masked(inner, masks)``.

  Raises:
    ValueError: sparsity outside ``[0, 1)``; input features not divisible by ``m``; a
      layer of ``stats`` missing from ``params``, with no captured inputs or with NaN /
      inf among them (each named, with the input feature).
  """
  s, nm = targets.resolve_target(sparsity, structure, "wanda")
  masks = {}
  for path, kernel, st in targets.pairs(params, stats, "wanda"):
    layer = st.layer
    targets.check_nm(nm, path, layer.n_in)
    m = wanda_mask(layer.as_matrix(kernel), st.column_norms(), s, structure=nm)
    masks[path] = layer.from_matrix(m)
  return targets.to_tree(params, masks)
