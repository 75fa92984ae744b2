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


def _largest_bin(counts: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Largest bin b with ``#(key >= b) >= k`` and how many of k lie inside bin b."""
  at_or_above = jnp.cumsum(counts[::-1])[::-1]
  b = jnp.sum(at_or_above >= k, dtype=jnp.int32) - 1
  b = jnp.maximum(b, 0)
  return b, k - (at_or_above[b] - counts[b])


def kth_largest_key(keys: list[jax.Array], k: jax.Array) -> jax.Array:
  """The k-th largest of the keys of all arrays together (``1 <= k <= n``)."""
  hi = [(u >> 16).astype(jnp.int32) for u in keys]
  counts = sum(jnp.bincount(h, length=_BINS) for h in hi)
  b, k_in = _largest_bin(counts, k)
  lo = [jnp.where(h == b, (u & 0xFFFF).astype(jnp.int32), _BINS) for u, h in zip(keys, hi)]
  counts = sum(jnp.bincount(low, length=_BINS + 1)[:_BINS] for low in lo)
  b2, _ = _largest_bin(counts, k_in)
  return (b.astype(jnp.uint32) << 16) | b2.astype(jnp.uint32)


def keep_topk(keys: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Flat bool masks keeping exactly the k largest keys over all arrays."""
  k = jnp.asarray(k, jnp.int32)
  t = kth_largest_key(keys, jnp.maximum(k, 1))
  above = sum(jnp.sum(u > t, dtype=jnp.int32) for u in keys)
  ties = [jnp.sum(u == t, dtype=jnp.int32) for u in keys]
  need = k - above

  def all_ties(keys):
    return [u >= t for u in keys]

  def first_ties(keys):
    out, before = [], jnp.int32(0)
    for u, n_eq in zip(keys, ties):
      eq = u == t
      out.append((u > t) | (eq & (jnp.cumsum(eq, dtype=jnp.int32) + before <= need)))
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
