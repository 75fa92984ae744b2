"""Pytree paths and the "which params are pruned" filter.

Every jaxprune function names a leaf by its path string, the pytree keys joined with
``/`` (``"Dense_0/kernel"`` for a Linen dict, ``"fc1/kernel"`` for an ``nnx.State``;
the ``.value`` of an NNX variable is left out). One mechanism decides which leaves are
pruned: a ``where`` filter over ``(path, leaf)``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
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


def strip_collection(path: str) -> str:
  """``'params/Dense_0/kernel'`` -> ``'Dense_0/kernel'``: Linen's ``params`` collection prefix dropped."""
  return path[len("params/") :] if path.startswith("params/") else path


def same_leaf(a: str, b: str) -> bool:
  """Whether two paths name the same param: equal once a leading ``params/`` is dropped.

  Linen variables put params under ``params/``; a mask tree over the params alone
  names ``Dense_0/kernel`` what the variables call ``params/Dense_0/kernel``. Paths are
  never matched by suffix: ``Dense_0/kernel`` and ``Res_0/Dense_0/kernel`` are
  different layers.
  """
  return strip_collection(a) == strip_collection(b)


def is_none(x: Any) -> bool:
  return x is None


def is_float(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def is_key(leaf: Any) -> bool:
  """A typed PRNG key array (an ``nnx.Rngs`` or ``nnx.Dropout`` key): no numpy form."""
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def default_where(path: str, leaf: Any) -> bool:
  """Weight matrices and conv kernels: float leaves with ``ndim >= 2`` not named ``bias``.

  The name is the last key of the path: the ``(heads, head_dim)`` biases of Linen's
  attention, ``DenseGeneral`` and ``nnx.LinearGeneral`` are 2-D but stay biases.

  Examples:
    >>> import numpy as np
    >>> w = np.ones((4, 2), np.float32)
    >>> default_where("attn/query/kernel", w), default_where("attn/query/bias", w)
    (True, False)
  """
  return is_float(leaf) and getattr(leaf, "ndim", 0) >= 2 and path.rsplit("/", 1)[-1] != "bias"


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

  Raises:
    TypeError: ``where`` is none of these.
    ValueError: a pattern is not a valid regular expression.
  """
  if where is None:
    return default_where
  if callable(where):
    return where
  if isinstance(where, str):
    patterns: tuple = (where,)
  elif isinstance(where, Iterable) and not isinstance(where, bytes | Mapping):
    patterns = tuple(where)
  else:
    raise TypeError(
      "`where` must be None (weight matrices and conv kernels), a regex string, a list "
      f"of regex strings or a (path, leaf) -> bool callable; got {where!r} "
      f"({type(where).__name__})."
    )
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"`where` patterns must be strings, got {p!r} ({type(p).__name__}).")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"`where` pattern {p!r} is not a valid regular expression: {e}.") from e
  return lambda path, leaf: hasattr(leaf, "shape") and matches(patterns, path)


def _describe(leaf: Any) -> str:
  shape = "x".join(map(str, np.shape(leaf))) or "scalar"
  return f"{getattr(leaf, 'dtype', type(leaf).__name__)}[{shape}]"


def no_match_error(params: Any, where: Where, what: str = "pruner") -> ValueError:
  """The error for a ``where`` that selects nothing: lists the paths, suggests a close one."""
  leaves = [(p, x) for p, x in leaves_with_paths(params) if x is not None]
  if not leaves:
    return ValueError(f"{what}: the params tree has no array leaves ({type(params).__name__}).")
  shown = ", ".join(f"{p} {_describe(x)}" for p, x in leaves[:16])
  if len(leaves) > 16:
    shown += f", ... ({len(leaves)} leaves in all)"
  if where is None:
    told = (
      "the default `where` selects floating-point arrays with ndim >= 2 (weight matrices "
      "and conv kernels), and there are none"
    )
  else:
    told = f"where={where!r} selects none of the floating-point params"
  hint = ""
  if isinstance(where, str) or (
    isinstance(where, Iterable) and not callable(where) and not isinstance(where, Mapping)
  ):
    words = {part for p, _ in leaves for part in [p, *p.split("/")]}
    for pattern in (where,) if isinstance(where, str) else where:
      close = difflib.get_close_matches(str(pattern), sorted(words), n=1, cutoff=0.6)
      if close:
        hint = f" Did you mean {close[0]!r}?"
        break
  return ValueError(f"{what}: {told}. Params: [{shown}].{hint}")


def selected_paths(
  params: Any,
  where: Where = None,
  *,
  dense_first: bool = False,
  dense_last: bool = False,
  what: str = "pruner",
) -> list[str]:
  """Paths of the leaves a pruner acts on, in natural path order.

  ``dense_first`` / ``dense_last`` drop the first / last selected path in natural order
  (``Dense_2`` sorts before ``Dense_10``), i.e. keep the input or output layer dense.

  Raises:
    TypeError: naming the path when the filter selects a non-float leaf.
    ValueError: when nothing is selected (listing the params, with a close match for a
      mistyped pattern), or when ``dense_first`` / ``dense_last`` leave nothing.
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
  if not chosen:
    raise no_match_error(params, where, what)
  chosen.sort(key=natural_key)
  kept = chosen[1 if dense_first else 0 : len(chosen) - (1 if dense_last else 0)]
  if not kept:
    raise ValueError(
      f"{what}: `where` selects only {chosen}, and dense_first/dense_last keep "
      f"{'it' if len(chosen) == 1 else 'them'} dense: nothing is left to prune."
    )
  return kept


def check_same_structure(
  reference: Any, other: Any, *, what: str = "mask", shapes: bool = True
) -> None:
  """Raises ``ValueError`` naming the first path where ``other`` differs from ``reference``.

  ``None`` leaves of ``other`` stand for "not pruned" and match any leaf; with
  ``shapes`` the shapes of array leaves must be equal too.
  """
  # None in both trees (a params tree may hold None, optax's convention for "no param")
  # is one leaf each; a None of `other` also matches an array of `reference`.
  ref = leaves_with_paths(reference, is_leaf=is_none)
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
    if r is None:
      raise ValueError(f"The {what} for {path!r} is an array, but the param there is None.")
    if np.shape(o) != np.shape(r):
      raise ValueError(
        f"The {what} for {path!r} has shape {np.shape(o)} but the param has shape {np.shape(r)}."
      )


def restructure(reference: Any, other: Any) -> Any:
  """``other``'s leaves (``None`` included) in ``reference``'s containers.

  For two trees with the same leaf paths (:func:`check_same_structure`) whose containers
  differ: a mask saved as a plain dict for a ``FrozenDict`` or ``nnx.State`` of params,
  a tuple for a list. ``jax.tree.map`` refuses such a pair.
  """
  leaves, other_def = jax.tree.flatten(other, is_leaf=is_none)
  ref_def = jax.tree.structure(reference, is_leaf=is_none)
  return other if other_def == ref_def else jax.tree.unflatten(ref_def, leaves)
