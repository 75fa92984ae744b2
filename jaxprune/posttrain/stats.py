"""Statistics of a linear layer's inputs over calibration tokens, summed in float32.

For inputs ``X`` (tokens x input features, flattened as the layer's
:attr:`~jaxprune.posttrain.layers.Layer.in_axes`): ``sq_norms[j] = sum_t X_tj^2`` (Wanda
scores with ``||X_j||_2 = sqrt(sq_norms[j])``) and ``xtx = X^T X`` (SparseGPT's Hessian
is ``H = 2/n X^T X``), with ``count = n`` tokens. Sums over batches add, so statistics
from several batches (or devices) are combined with ``+``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jaxprune.surgery.linear import Layer


@struct.dataclass
class InputStats:
  """Summed statistics of one layer's inputs (a pytree: jit, sharding and ``+`` work).

  Attributes:
    sq_norms: ``[n_in]`` float32, the sum over tokens of each input feature squared.
    xtx: ``[n_in, n_in]`` float32 ``X^T X``, or ``None`` when not collected (Wanda
      needs only ``sq_norms``).
    count: the number of tokens (int32 scalar).
    layer: the layer's kernel layout (static).
  """

  sq_norms: jax.Array
  xtx: jax.Array | None
  count: jax.Array
  layer: Layer = struct.field(pytree_node=False)

  def __add__(self, other: InputStats) -> InputStats:
    a, b = self.layer, other.layer
    if (a.path, a.shape, a.in_axes) != (b.path, b.shape, b.in_axes):
      raise ValueError(f"Cannot add statistics of {other.layer.path!r} to {self.layer.path!r}.")
    xtx = None if self.xtx is None or other.xtx is None else self.xtx + other.xtx
    return InputStats(self.sq_norms + other.sq_norms, xtx, self.count + other.count, self.layer)

  def column_norms(self) -> jax.Array:
    """``||X_j||_2`` over all tokens: Wanda's input feature norms."""
    return jnp.sqrt(self.sq_norms)

  def hessian(self) -> jax.Array:
    """SparseGPT's ``H = 2/n X^T X`` (float32)."""
    if self.xtx is None:
      raise ValueError(
        f"Layer {self.layer.path!r}: X^T X was not collected; calibrate with hessian=True."
      )
    return self.xtx * (2.0 / jnp.maximum(self.count, 1).astype(jnp.float32))


def as_rows(x: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
  """A layer input as ``[tokens, features]`` float32: contracted axes last, in order."""
  others = tuple(a for a in range(x.ndim) if a not in contracted)
  n_in = math.prod(x.shape[a] for a in contracted)
  return jnp.transpose(x, others + contracted).astype(jnp.float32).reshape(-1, n_in)


def of_inputs(layer: Layer, inputs: list[jax.Array], hessian: bool) -> InputStats:
  """The statistics of ``inputs`` (one array per read of the layer, with its contraction
  axes in ``layer.inputs``)."""
  sq = jnp.zeros((layer.n_in,), jnp.float32)
  xtx = jnp.zeros((layer.n_in, layer.n_in), jnp.float32) if hessian else None
  count = jnp.zeros((), jnp.int32)
  for x, (_, contracted) in zip(inputs, layer.inputs):
    rows = as_rows(x, contracted)
    sq = sq + jnp.sum(jnp.square(rows), axis=0)
    if xtx is not None:
      xtx = xtx + jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
    count = count + rows.shape[0]
  return InputStats(sq, xtx, count, layer)
