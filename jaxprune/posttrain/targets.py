"""What a post-training method prunes: the params that have statistics, and how much.

Shared by :func:`~jaxprune.posttrain.wanda` and :func:`~jaxprune.posttrain.sparsegpt`:
statistics are matched to params by exact path (a Linen ``params/`` collection prefix
aside), the target is a sparsity or an N:M structure, and the result is a mask tree
shaped like the params (``None`` for params without statistics).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import select
from jaxprune import tree as tree_lib
from jaxprune.posttrain.stats import InputStats
from jaxprune.structures import NM


def resolve_target(sparsity: float | None, structure: Any, what: str) -> tuple[float, NM | None]:
  """``(sparsity, nm)`` from the arguments: unstructured (default 0.5) or N:M."""
  if structure is None or structure == "unstructured":
    s = 0.5 if sparsity is None else sparsity
    select.check_sparsity(s, f"{what}: sparsity")
    return float(s), None
  if isinstance(structure, NM):
    if sparsity is not None:
      structure.check_target(float(sparsity))
    return structure.sparsity, structure
  raise TypeError(
    f"{what}: structure must be None (unstructured) or jaxprune.n_m(n, m), got {structure!r}."
  )


def check_kernel(kernel: Any, what: str, name: str = "kernel") -> tuple[int, int]:
  """``(n_in, n_out)`` of a float ``[n_in, n_out]`` kernel, or a ``ValueError`` naming it."""
  shape = tuple(getattr(kernel, "shape", ()))
  dtype = getattr(kernel, "dtype", None)
  if len(shape) != 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    label = "kernel" if name == "kernel" else f"the kernel of layer {name!r}"
    raise ValueError(
      f"{what}: {label} must be a float [n_in, n_out] matrix (input features are rows, a "
      f"Flax Dense kernel), got {dtype}{list(shape)}."
    )
  return shape[0], shape[1]


def check_nm(nm: NM | None, path: str, n_in: int) -> None:
  if nm is not None and n_in % nm.m:
    raise ValueError(
      f"Layer {path!r}: {nm.n}:{nm.m} sparsity groups {nm.m} consecutive input features, "
      f"but the layer has {n_in} input features, which do not divide by {nm.m}."
    )


def pairs(
  params: Any, stats: dict[str, InputStats], what: str
) -> list[tuple[str, Any, InputStats]]:
  """``[(param path, kernel, stats)]`` for every layer in ``stats``, in params order.

  Raises:
    ValueError: a layer of ``stats`` is not in ``params`` (naming it and the params'
      paths), its kernel's shape differs, it saw no calibration tokens, or NaN / inf
      among its inputs (naming the input feature).
  """
  if not stats:
    raise ValueError(f"{what}: no layer statistics given (calibrate returned nothing?).")
  leaves = tree_lib.leaves_with_paths(params)
  by_stripped = {tree_lib.strip_collection(p): (p, x) for p, x in leaves}
  out = []
  for key, st in stats.items():
    if not isinstance(st, InputStats):
      raise TypeError(f"{what}: stats[{key!r}] is a {type(st).__name__}, not InputStats.")
    found = by_stripped.get(tree_lib.strip_collection(key))
    if found is None:
      shown = ", ".join(p for p, _ in leaves[:16])
      raise ValueError(
        f"{what}: layer {key!r} has statistics but is not in the params ([{shown}])."
      )
    path, kernel = found
    if tuple(jax.numpy.shape(kernel)) != st.layer.shape:
      raise ValueError(
        f"{what}: layer {path!r} has shape {jax.numpy.shape(kernel)} but its statistics were "
        f"collected for shape {st.layer.shape}."
      )
    if select.is_concrete(st.count) and int(st.count) == 0:
      raise ValueError(
        f"{what}: layer {path!r} has no captured inputs (0 calibration tokens reached it)."
      )
    if select.is_concrete(st.sq_norms):
      st.layer.check_finite(st.sq_norms, what)
    out.append((path, kernel, st))
  order = {p: i for i, (p, _) in enumerate(leaves)}
  return sorted(out, key=lambda t: order[t[0]])


def to_tree(params: Any, by_path: dict[str, Any], default: Any = None) -> Any:
  """A tree shaped like ``params`` with ``by_path[path]`` (else ``default(leaf)`` or None)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = []
  for k, x in flat:
    p = tree_lib.path_str(k)
    leaves.append(by_path[p] if p in by_path else (default(x) if default else None))
  return jax.tree.unflatten(treedef, leaves)
