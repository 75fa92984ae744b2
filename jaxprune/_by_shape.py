"""Layer-scope selection compiled once per leaf shape and dtype, not once per leaf.

``select.topk_by_count(..., "layer")`` unrolls one selection per leaf into the compiled
graph, so its compile time grows with the number of leaves (about 0.25 s each on CPU).
Models repeat shapes (every block of a transformer has the same kernels), so leaves of
one shape and dtype are stacked and selected by ``lax.map`` over the stack: one compiled
selection per shape, whatever the number of layers. Each leaf is still selected on its
own, so the masks are those of ``topk_by_count``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune._compile import eager_jit
from jaxprune.select import topk_by_count


def topk_by_shape(scores: Sequence[jax.Array], removed: Sequence[Any]) -> list[jax.Array]:
  """Masks removing exactly ``removed[i]`` entries of ``scores[i]`` (layer scope).

  Leaves that share a shape and dtype with another leaf are stacked and selected by one
  ``lax.map``; the others go to ``topk_by_count`` together. Counts are ints or int32
  scalars (traced counts are clipped to the leaf sizes, as ``topk_by_count`` does).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._by_shape import topk_by_shape
    >>> a, b = jnp.array([[1., 3.], [2., 0.]]), jnp.array([[5., 4.], [6., 7.]])
    >>> [m.tolist() for m in topk_by_shape([a, b], [3, 2])]
    [[[False, True], [False, False]], [[False, False], [True, True]]]
  """
  scores = list(scores)
  if not scores:
    return []
  removed = [jnp.asarray(r, jnp.int32) for r in removed]
  return _topk_by_shape(scores, removed)


def _topk_by_shape(scores: list[jax.Array], removed: list[jax.Array]) -> list[jax.Array]:
  by_kind: dict[tuple[tuple[int, ...], Any], list[int]] = {}
  for i, s in enumerate(scores):
    by_kind.setdefault((tuple(s.shape), s.dtype), []).append(i)
  out: list[Any] = [None] * len(scores)
  single = [ix[0] for ix in by_kind.values() if len(ix) == 1]
  if single:
    masks = topk_by_count([scores[i] for i in single], [removed[i] for i in single], "layer")
    for i, m in zip(single, masks):
      out[i] = m
  for ix in by_kind.values():
    if len(ix) == 1:
      continue
    stacked = jnp.stack([scores[i] for i in ix])
    counts = jnp.stack([removed[i] for i in ix])
    masks = lax.map(lambda sr: topk_by_count([sr[0]], [sr[1]], "layer")[0], (stacked, counts))
    for j, i in enumerate(ix):
      out[i] = masks[j]
  return out


_topk_by_shape = eager_jit(_topk_by_shape)
