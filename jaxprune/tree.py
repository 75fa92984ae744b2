"""Pytree paths and the "which params are pruned" filter.

Every jaxprune function names a leaf by its path string, the pytree keys joined with
``/`` (``"Dense_0/kernel"`` for a Linen dict, ``"fc1/kernel"`` for an ``nnx.State``;
the ``.value`` of an NNX variable is left out). One mechanism decides which leaves are
pruned: a ``where`` filter over ``(path, leaf)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Where = None | str | Iterable[str] | Callable[[str, Any], bool]


def key_str(key: Any) -> str:
  """One pytree key as text: dict keys, attribute names and sequence indices."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(path: tuple) -> str:
  """``(DictKey('Dense_0'), DictKey('kernel'))`` -> ``'Dense_0/kernel'``."""
  parts = [key_str(k) for k in path]
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
    parts = parts[:-1]  # nnx.Variable wraps its array in `.value`
  return "/".join(parts)


def leaves_with_paths(
  tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
  """``[(path string, leaf), ...]`` in the tree's flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), leaf) for p, leaf in flat]


def same_leaf(full: str, short: str) -> bool:
  """Whether ``short`` names the leaf at ``full`` (equal, or a suffix after a ``/``).

  Linen variables put params under ``params/``; a mask tree over the params alone
  names ``Dense_0/kernel`` what the variables call ``params/Dense_0/kernel``.
  """
  return full == short or full.endswith("/" + short)


def is_none(x: Any) -> bool:
  return x is None


def is_float(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def default_where(path: str, leaf: Any) -> bool:
  """Weight matrices and conv kernels: float leaves with ``ndim >= 2``."""
  del path
  return is_float(leaf) and getattr(leaf, "ndim", 0) >= 2


def natural_key(path: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def matches(patterns: str | Iterable[str], path: str) -> bool:
  """True when any regular expression in ``patterns`` is found in ``path``."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  return any(re.search(p, path) for p in patterns)


def as_predicate(where: Where) -> Callable[[str, Any], bool]:
  """Turns a ``where`` spec into a ``(path, leaf) -> bool`` predicate.

  ``None`` selects :func:`default_where`; a string or a list of strings are regular
  expressions searched in the path (and the leaf must still be an array); a callable is
  used as it is.
  """
  if where is None:
    return default_where
  if callable(where):
    return where
  patterns = (where,) if isinstance(where, str) else tuple(where)
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"`where` patterns must be strings, got {p!r} ({type(p).__name__}).")
    re.compile(p)
  return lambda path, leaf: hasattr(leaf, "shape") and matches(patterns, path)


def selected_paths(
  params: Any,
  where: Where = None,
  *,
  dense_first: bool = False,
  dense_last: bool = False,
) -> list[str]:
  """Paths of the leaves a pruner acts on, in natural path order.

  Raises a ``TypeError`` naming the path when the filter selects a non-float leaf.
  ``dense_first`` / ``dense_last`` drop the first / last selected path in natural order
  (``Dense_2`` sorts before ``Dense_10``), i.e. keep the input or output layer dense.
  """
  pred = as_predicate(where)
  chosen = []
  for path, leaf in leaves_with_paths(params):
    if leaf is None or not pred(path, leaf):
      continue
    if not is_float(leaf):
      dtype = getattr(leaf, "dtype", type(leaf).__name__)
      raise TypeError(
        f"Param {path!r} has dtype {dtype}; only floating-point params can be pruned. "
        "Narrow `where=` so it does not select it."
      )
    chosen.append(path)
  chosen.sort(key=natural_key)
  if dense_first and chosen:
    chosen = chosen[1:]
  if dense_last and chosen:
    chosen = chosen[:-1]
  return chosen


def check_same_structure(
  reference: Any, other: Any, *, what: str = "mask", shapes: bool = True
) -> None:
  """Raises ``ValueError`` naming the first path where ``other`` differs from ``reference``.

  ``None`` leaves of ``other`` stand for "not pruned" and match any leaf; with
  ``shapes`` the shapes of array leaves must be equal too.
  """
  ref = leaves_with_paths(reference)
  oth = leaves_with_paths(other, is_leaf=is_none)
  ref_paths = [p for p, _ in ref]
  oth_paths = [p for p, _ in oth]
  if ref_paths != oth_paths:
    for i, (a, b) in enumerate(zip(ref_paths, oth_paths)):
      if a != b:
        raise ValueError(
          f"The {what} tree does not match the params: at leaf {i} the params have "
          f"{a!r} but the {what} has {b!r}."
        )
    longer, name = (ref_paths, "params") if len(ref_paths) > len(oth_paths) else (oth_paths, what)
    raise ValueError(
      f"The {what} tree does not match the params: {longer[min(len(ref_paths), len(oth_paths))]!r} "
      f"is only in the {name} ({len(ref_paths)} param leaves, {len(oth_paths)} {what} leaves)."
    )
  for (path, r), (_, o) in zip(ref, oth):
    if o is None or not shapes:
      continue
    if np.shape(o) != np.shape(r):
      raise ValueError(
        f"The {what} for {path!r} has shape {np.shape(o)} but the param has shape {np.shape(r)}."
      )
