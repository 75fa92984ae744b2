"""Selectors: scores + sparsity -> boolean mask, with exactly k kept.

Exact top-k without sorting. Scores are mapped to order-preserving ``uint32`` keys,
and the k-th largest key is found with two 16-bit histogram passes (radix select), so
selection costs a few linear passes instead of an ``O(n log n)`` argsort. Ties at the
threshold are broken deterministically: the lower flat index (row-major, and for the
global scope the earlier leaf) is kept. Masks equal those of a stable descending
argsort exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune import tree as tree_lib

_BINS = 1 << 16


def check_sparsity(sparsity: Any, name: str = "sparsity") -> None:
  """Raises ``ValueError`` unless a concrete sparsity lies in ``[0, 1)``.

  Traced values (inside ``jit``) cannot be checked and are clipped by the selector.
  """
  if isinstance(sparsity, jax.core.Tracer):
    return
  if isinstance(sparsity, str):
    raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}.")
  try:
    value = float(sparsity)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}.") from e
  if not 0.0 <= value < 1.0:
    raise ValueError(
      f"{name} must be in [0, 1): the fraction of weights removed; got {value}. "
      "1.0 would remove every weight of a layer."
    )


def sortable_keys(scores: jax.Array) -> jax.Array:
  """Flat ``uint32`` keys whose unsigned order is the float order of ``scores``."""
  x = jnp.ravel(scores).astype(jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 -> +0.0 (XLA folds away `x + 0.0`)
  i = lax.bitcast_convert_type(x, jnp.int32)
  i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
  return lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


_ROW = 1024  # block size of the tie cutoff search
_CHUNKS = 4  # independent partial histograms: XLA:CPU runs independent ops in parallel


def _histogram(idx: jax.Array, length: int) -> jax.Array:
  parts = _CHUNKS if idx.size >= (1 << 18) else 1
  step = -(-idx.size // parts)
  return sum(jnp.bincount(idx[i * step : (i + 1) * step], length=length) for i in range(parts))


def _at_or_above(counts: jax.Array) -> jax.Array:
  return jnp.cumsum(counts[::-1])[::-1]  # [b] = #(key bin >= b)


def _nth_true(eq: jax.Array, j: jax.Array) -> jax.Array:
  """Flat index of the j-th ``True`` (``j >= 1``) by blocked counting, not a full cumsum."""
  rows = jnp.pad(eq, (0, (-eq.size) % _ROW)).reshape(-1, _ROW)
  cum = jnp.cumsum(jnp.sum(rows, axis=1, dtype=jnp.int32))
  r = jnp.sum(cum < j, dtype=jnp.int32)
  before = jnp.where(r > 0, cum[jnp.maximum(r - 1, 0)], 0)
  within = jnp.cumsum(lax.dynamic_index_in_dim(rows, r, keepdims=False), dtype=jnp.int32)
  return r * _ROW + jnp.sum(within < j - before, dtype=jnp.int32)


def keep_topk(keys: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Flat bool masks keeping exactly the k largest keys over all arrays.

  Two histogram passes find the k-th largest key ``t`` (its high 16 bits, then its low
  16 bits among the keys in that bin); the counts of keys above ``t`` and equal to it
  come from the same histograms. Ties at ``t`` keep the lowest indices.
  """
  k = jnp.asarray(k, jnp.int32)
  kk = jnp.maximum(k, 1)
  hi = [(u >> 16).astype(jnp.int32) for u in keys]
  counts = sum(_histogram(h, _BINS) for h in hi)
  at_or_above = _at_or_above(counts)
  b = jnp.maximum(jnp.sum(at_or_above >= kk, dtype=jnp.int32) - 1, 0)
  above_bin = at_or_above[b] - counts[b]
  lo = [jnp.where(h == b, (u & 0xFFFF).astype(jnp.int32), _BINS) for u, h in zip(keys, hi)]
  per_leaf = [_histogram(low, _BINS + 1)[:_BINS] for low in lo]
  counts = sum(per_leaf)
  at_or_above = _at_or_above(counts)
  b2 = jnp.maximum(jnp.sum(at_or_above >= kk - above_bin, dtype=jnp.int32) - 1, 0)
  t = (b.astype(jnp.uint32) << 16) | b2.astype(jnp.uint32)
  need = k - (above_bin + at_or_above[b2] - counts[b2])  # ties at t to keep
  ties = [c[b2] for c in per_leaf]

  def all_ties(keys):
    return [u >= t for u in keys]

  def first_ties(keys):
    out, before = [], jnp.int32(0)
    for u, n_eq in zip(keys, ties):
      j = jnp.clip(need - before, 0, n_eq)
      eq = u == t
      cut = jnp.where(j > 0, _nth_true(eq, jnp.maximum(j, 1)), -1)
      out.append((u > t) | (eq & (jnp.arange(u.size) <= cut)))
      before = before + n_eq
    return out

  masks = lax.cond(need == sum(ties), all_ties, first_ties, keys)
  return [m & (k > 0) for m in masks]


def n_keep(size: int, sparsity: Any) -> jax.Array:
  """Weights kept of ``size`` at ``sparsity``: ``size - round(sparsity * size)``."""
  s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  return size - jnp.round(s * size).astype(jnp.int32)


def topk_leaves(scores: list[jax.Array], sparsity: Any, scope: str) -> list[jax.Array]:
  """Masks (shaped like ``scores``) for a list of score arrays (compiled once per shapes)."""
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  if not scores:
    return []
  return _topk_leaves(list(scores), jnp.asarray(sparsity, jnp.float32), scope)


@functools.partial(jax.jit, static_argnames="scope")
def _topk_leaves(scores: list[jax.Array], sparsity: jax.Array, scope: str) -> list[jax.Array]:
  keys = [sortable_keys(s) for s in scores]
  if scope == "layer":
    flat = [keep_topk([u], n_keep(u.size, sparsity))[0] for u in keys]
  else:
    flat = keep_topk(keys, n_keep(sum(u.size for u in keys), sparsity))
  return [m.reshape(jnp.shape(s)) for m, s in zip(flat, scores)]


def topk_mask(scores: Any, sparsity: Any, scope: str = "layer") -> Any:
  """Keeps the largest scores: exactly ``n - round(sparsity * n)`` per layer or overall.

  Args:
    scores: a pytree of score arrays; ``None`` leaves (params that are never pruned)
      stay ``None`` in the mask.
    sparsity: fraction removed, in ``[0, 1)``; a Python float or a scalar array.
    scope: ``"layer"`` keeps the top ``1 - sparsity`` of every leaf; ``"global"`` keeps
      the top ``1 - sparsity`` of all leaves pooled (one threshold).

  Returns:
    A pytree of bool arrays (``True`` = kept) with the structure of ``scores``. Ties
    are broken deterministically by position: the lower flat index, then the earlier
    leaf, is kept.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> m = jaxprune.topk_mask({"w": jnp.array([[3., 1.], [2., 1.]])}, 0.5)
    >>> m["w"].tolist()
    [[True, False], [True, False]]
    >>> m = jaxprune.topk_mask({"a": jnp.array([5., 4.]), "b": jnp.array([1., 2.])}, 0.5,
    ...                        scope="global")
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, True], [False, False])
  """
  check_sparsity(sparsity)
  leaves, treedef = jax.tree.flatten(scores, is_leaf=tree_lib.is_none)
  live = [i for i, s in enumerate(leaves) if s is not None]
  masks = topk_leaves([leaves[i] for i in live], sparsity, scope)
  out = list(leaves)
  for i, m in zip(live, masks):
    out[i] = m
  return jax.tree.unflatten(treedef, out)
