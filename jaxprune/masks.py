"""Mask pytrees: apply, count, summarise, pack to bits, combine.

A mask has the structure of the params; a leaf is a bool array of the param's shape
(``True`` = kept) or ``None`` for a param that is never pruned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import table as table_lib
from jaxprune import tree as tree_lib


def apply_mask(params: Any, masks: Any) -> Any:
  """Zeros the pruned weights: ``where(mask, param, 0)`` leaf by leaf.

  Args:
    params: a pytree of arrays (a Linen param dict, an ``nnx.State``, ...).
    masks: a mask pytree with the same leaf paths (``None`` leaves leave params as is;
      its containers may differ: a plain dict for a ``FrozenDict`` or ``nnx.State``).

  Returns:
    The params with pruned entries exactly zero.

  Raises:
    ValueError: naming the first path where the two trees differ.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> p = {"w": jnp.array([1., 2.]), "b": jnp.array([3.])}
    >>> jaxprune.apply_mask(p, {"w": jnp.array([True, False]), "b": None})["w"].tolist()
    [1.0, 0.0]
  """
  tree_lib.check_same_structure(params, masks)
  _check_bool(masks, "apply_mask")
  masks = tree_lib.restructure(params, masks)  # e.g. a dict of masks for a FrozenDict
  return jax.tree.map(
    lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
    masks,
    params,
    is_leaf=tree_lib.is_none,
  )


def _check_bool(masks: Any, fn: str) -> None:
  for path, leaf in tree_lib.leaves_with_paths(masks, is_leaf=tree_lib.is_none):
    if leaf is not None and getattr(leaf, "dtype", None) != jnp.bool_:
      raise TypeError(
        f"{fn} takes bool masks (True = kept), but the mask leaf {path!r} is "
        f"{getattr(leaf, 'dtype', type(leaf).__name__)}; pass masks (e.g. "
        "jaxprune.masks_of(state) or pruner.masks(params)), not params or scores."
      )


def ones_like(params: Any, paths: list[str] | set[str]) -> Any:
  """An all-kept mask for the leaves at ``paths`` and ``None`` elsewhere."""
  paths = set(paths)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [
    jnp.ones(jnp.shape(x), bool) if tree_lib.path_str(p) in paths else None for p, x in flat
  ]
  return jax.tree.unflatten(treedef, leaves)


def combine(*masks: Any) -> Any:
  """Logical AND of mask trees: kept only where every mask keeps (``None`` = all kept)."""
  if not masks:
    raise ValueError("combine() needs at least one mask tree.")

  def both(a, b):
    if a is None:
      return b
    if b is None:
      return a
    return jnp.logical_and(a, b)

  out = masks[0]
  for i, m in enumerate(masks[1:], start=2):
    _check_like(out, m, i)
    m = tree_lib.restructure(out, m)  # the first tree's containers (dict / FrozenDict / ...)
    out = jax.tree.map(both, out, m, is_leaf=tree_lib.is_none)
  return out


def _check_like(first: Any, other: Any, i: int) -> None:
  a = tree_lib.leaves_with_paths(first, is_leaf=tree_lib.is_none)
  b = tree_lib.leaves_with_paths(other, is_leaf=tree_lib.is_none)
  if [p for p, _ in a] != [p for p, _ in b]:
    raise ValueError(
      f"combine(): mask #{i} has the leaves {[p for p, _ in b]}, the masks before it "
      f"{[p for p, _ in a]}."
    )
  for (path, x), (_, y) in zip(a, b):
    if x is not None and y is not None and jnp.shape(x) != jnp.shape(y):
      raise ValueError(
        f"combine(): mask #{i} for {path!r} has shape {jnp.shape(y)}, the masks before it "
        f"{jnp.shape(x)}."
      )


@dataclasses.dataclass(frozen=True)
class LeafStats:
  path: str
  shape: tuple[int, ...]
  size: int
  zeros: int

  @property
  def sparsity(self) -> float:
    return self.zeros / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-leaf zeros and sparsity; ``str()`` gives an aligned table with a total row."""

  rows: tuple[LeafStats, ...]

  @property
  def size(self) -> int:
    return sum(r.size for r in self.rows)

  @property
  def zeros(self) -> int:
    return sum(r.zeros for r in self.rows)

  @property
  def sparsity(self) -> float:
    return self.zeros / self.size if self.size else 0.0

  def __getitem__(self, path: str) -> LeafStats:
    for r in self.rows:
      if r.path == path:
        return r
    raise KeyError(f"No leaf {path!r} in this summary; leaves: {[r.path for r in self.rows]}")

  def as_dict(self) -> dict[str, float]:
    """``{path: sparsity}`` plus ``"total"``."""
    return {**{r.path: r.sparsity for r in self.rows}, "total": self.sparsity}

  def table(self) -> str:
    header = ("param", "shape", "size", "zeros", "sparsity")
    body = [
      (
        r.path,
        "x".join(map(str, r.shape)) or "()",
        f"{r.size:,}",
        f"{r.zeros:,}",
        f"{r.sparsity:.2%}",
      )
      for r in self.rows
    ]
    total = ("total", "", f"{self.size:,}", f"{self.zeros:,}", f"{self.sparsity:.2%}")
    return table_lib.text_table(header, body, [total], left=2)

  def __str__(self) -> str:
    return self.table()


def _prunable_or_mask(path: str, leaf: Any) -> bool:
  return getattr(leaf, "dtype", None) == jnp.bool_ or tree_lib.default_where(path, leaf)


def summary(tree: Any, where: tree_lib.Where = None) -> Summary:
  """Per-leaf shape, size, zeros and sparsity of params (zeros) or masks (``False``).

  Args:
    tree: params or a mask tree. For params a zero entry counts as pruned; for bool
      masks a ``False`` entry does. ``None`` leaves are skipped.
    where: which leaves to list, the same filter as the pruners' ``where``. The
      default ``None`` lists what a pruner prunes by default, so the total is the
      sparsity of the prunable weights: weight matrices and conv kernels (float arrays
      with ``ndim >= 2``; a bias at zero is not a pruned weight), and every leaf of a
      bool mask tree. ``where=""`` lists every array leaf.

  Returns:
    A :class:`Summary`: ``print`` it for a table, or read ``.sparsity``,
    ``summary[path].zeros``, ``.as_dict()``.

  Raises:
    ValueError: ``where`` selects no leaf (the error lists the leaves).

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> params = {"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}
    >>> s = jaxprune.summary(params)
    >>> s["w"].zeros, s.sparsity, jaxprune.summary(params, where="").sparsity
    (3, 0.75, 0.8333333333333334)
  """
  pred = _prunable_or_mask if where is None else tree_lib.as_predicate(where)
  rows = []
  for path, leaf in tree_lib.leaves_with_paths(tree):
    if leaf is None or not hasattr(leaf, "shape") or not pred(path, leaf):
      continue
    x = np.asarray(jax.device_get(leaf))
    zeros = int(x.size - np.count_nonzero(x))
    rows.append(LeafStats(path, tuple(x.shape), int(x.size), zeros))
  if not rows:
    raise tree_lib.no_match_error(tree, where, "summary")
  return Summary(tuple(rows))


def pack_masks(masks: Any) -> Any:
  """Packs every bool mask leaf to ``uint8`` bits (1 bit per weight; ``None`` stays).

  Raises:
    TypeError: a leaf is not a bool array (pack masks, not params).

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> m = {"w": jnp.ones((4, 4), bool)}
    >>> jaxprune.pack_masks(m)["w"].shape
    (2,)
  """
  _check_bool(masks, "pack_masks")
  return jax.tree.map(
    lambda m: None if m is None else jnp.packbits(jnp.ravel(m)), masks, is_leaf=tree_lib.is_none
  )


def unpack_masks(packed: Any, params: Any) -> Any:
  """Inverse of :func:`pack_masks`; ``params`` (or anything shaped like them) gives the shapes."""
  tree_lib.check_same_structure(params, packed, what="packed mask", shapes=False)

  def unpack(bits, p):
    if bits is None:
      return None
    size = int(np.prod(jnp.shape(p)))
    if jnp.shape(bits) != (-(-size // 8),) or jnp.result_type(bits) != jnp.uint8:
      raise ValueError(
        f"A packed mask of {jnp.shape(bits)} {jnp.result_type(bits)} cannot unpack to "
        f"shape {jnp.shape(p)}: expected ({-(-size // 8)},) uint8 from pack_masks."
      )
    return jnp.unpackbits(bits, count=size).astype(bool).reshape(jnp.shape(p))

  return jax.tree.map(unpack, packed, params, is_leaf=tree_lib.is_none)
