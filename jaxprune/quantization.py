"""Sparsity-preserving int8 quantization and compressed size on disk.

Symmetric quantization maps 0.0 to the integer 0, so a pruned weight stays exactly zero
after a round trip: ``q = round(w / s)`` with ``s = max|w| / 127`` per output channel
(the last axis) or per tensor, and ``w' = q * s``; ``s`` is at least the smallest normal
float32 (``1.18e-38``: XLA flushes smaller ones to zero). :func:`compressed_size`
measures what pruning buys on disk the way TF-MOT reports it: the gzip size of the saved
arrays.
"""

from __future__ import annotations

import gzip
import io
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.select import is_concrete


class QuantizedArray(NamedTuple):
  """``values`` (int8) times ``scale`` (float32, broadcast over the last axis or scalar)."""

  values: jax.Array
  scale: jax.Array


def quantize(params: Any, where: tree_lib.Where = None, per_channel: bool = True) -> Any:
  """Symmetric int8 quantization of the selected leaves; zeros stay exactly zero.

  Args:
    params: a params pytree.
    where: which leaves (default: weight matrices and conv kernels); others are kept.
    per_channel: one scale per output channel (last axis) instead of per tensor.

  Returns:
    The tree with selected leaves replaced by :class:`QuantizedArray`.

  Raises:
    ValueError: a selected leaf holding NaN or inf (naming it and the first such entry):
      its channel's scale ``max|w| / 127`` would be NaN or inf and every weight of the
      channel would come back as 0 or NaN. Under ``jit`` the leaf is not checked.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> q = jaxprune.quantize({"w": jnp.array([[0.0, 1.0], [-2.0, 0.5]])})
    >>> q["w"].values.tolist(), jaxprune.dequantize(q)["w"].tolist()
    ([[0, 127], [-127, 64]], [[0.0, 1.0], [-2.0, 0.5039370059967041]])
  """
  chosen = set(tree_lib.selected_paths(params, where, what="quantize"))

  def one(path, x):
    if tree_lib.path_str(path) not in chosen:
      return x
    x = jnp.asarray(x, jnp.float32)
    if is_concrete(x) and not bool(jnp.isfinite(x).all()):
      host = np.asarray(x)
      bad = np.argwhere(~np.isfinite(host))[0]
      raise ValueError(
        f"jaxprune.quantize: {tree_lib.path_str(path)!r} has {host[tuple(bad)]} at "
        f"{bad.tolist()}; int8 quantization needs finite weights (a channel's scale is "
        "max |w| / 127)."
      )
    axes = tuple(range(x.ndim - 1)) if per_channel and x.ndim > 1 else None
    peak = jnp.max(jnp.abs(x), axis=axes, initial=0.0)  # 0 for an empty leaf
    # at least the smallest normal float32: XLA flushes subnormals to zero, and a scale
    # of 0 would load every weight of a channel with max |w| < 1.5e-36 as zero
    scale = jnp.where(peak > 0, jnp.maximum(peak / 127.0, jnp.finfo(jnp.float32).tiny), 1.0)
    values = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return QuantizedArray(values, scale.astype(jnp.float32))

  return jax.tree_util.tree_map_with_path(one, params)


def dequantize(tree: Any) -> Any:
  """Float32 arrays back from :func:`quantize` (other leaves unchanged)."""
  return jax.tree.map(
    lambda x: x.values.astype(jnp.float32) * x.scale if isinstance(x, QuantizedArray) else x,
    tree,
    is_leaf=lambda x: isinstance(x, QuantizedArray),
  )


def compressed_size(tree: Any) -> int:
  """Bytes of the gzip-compressed ``.npz`` of every array in ``tree``.

  Examples:
    >>> import jax, jaxprune
    >>> w = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> pruned = jaxprune.apply_mask(w, jaxprune.magnitude(0.9).masks(w))
    >>> jaxprune.compressed_size(pruned) < jaxprune.compressed_size(w) / 4
    True
  """
  arrays = {f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
  buffer = io.BytesIO()
  np.savez(buffer, allow_pickle=False, **arrays)
  return len(gzip.compress(buffer.getvalue(), compresslevel=9))
