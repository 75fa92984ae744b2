"""Export to ``jax.experimental.sparse``: pruned kernels as BCOO / BCSR, and a forward pass.

``jax.experimental.sparse`` is a reference implementation: JAX's maintainers say a
dense matmul wins down to ~1-10% density on accelerators, so export to it for memory
and interoperability and measure before expecting speed (``benchmarks/accelerator.py``).
Its convolution handles only one-dimensional single-channel inputs, so conv kernels
stay dense here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import tree as tree_lib
from jaxprune.surgery import capture

FORMATS = ("bcoo", "bcsr")  # the names of jax.experimental.sparse's BCOO and BCSR


def _sparse() -> Any:
  """``jax.experimental.sparse``, imported on first use: it imports scipy.sparse, 0.4 s of
  every ``import jaxprune`` that never exports."""
  return importlib.import_module("jax.experimental.sparse")


def _is_sparse(x: Any) -> bool:
  # a sparse array exists only once jax.experimental.sparse is imported
  module = sys.modules.get("jax.experimental.sparse")
  return module is not None and isinstance(x, module.JAXSparse)


def to_sparse(
  params: Any, masks: Any = None, *, format: str = "bcoo", where: tree_lib.Where = None
) -> Any:
  """Params with the selected weight matrices as ``jax.experimental.sparse`` arrays.

  Args:
    params: a params pytree (pruned weights zero, or give ``masks``).
    masks: optional bool masks; pruned entries are zeroed first (``apply_mask``).
    format: ``"bcoo"`` (``sparse.BCOO``) or ``"bcsr"`` (``sparse.BCSR``, rows
      compressed: the input axis of a Flax kernel; for storage and interoperability:
      ``jax.experimental.sparse`` multiplies BCSR only as the left operand, and a
      Flax kernel is the right one, ``x @ W``, so :func:`sparse_apply` takes BCOO).
    where: which leaves (default: float matrices, ``ndim == 2``); the stored entries
      are the nonzeros of each.

  Returns:
    The pytree with the selected leaves sparse; run a model on it with
    :func:`sparse_apply`.

  Raises:
    NotImplementedError: a selected leaf is not a matrix (a conv kernel: the BCOO
      convolution of ``jax.experimental.sparse`` is one-dimensional and single-channel).

  Examples:
    >>> import jax, jaxprune
    >>> from jaxprune import export
    >>> w = {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}
    >>> s = export.to_sparse(w, jaxprune.magnitude(0.9).masks(w))
    >>> type(s["kernel"]).__name__, s["kernel"].nse
    ('BCOO', 205)
  """
  if format not in FORMATS:
    raise ValueError(f"to_sparse: format must be one of {sorted(FORMATS)}, got {format!r}.")
  if masks is not None:
    params = masks_lib.apply_mask(params, masks)
  where = where if where is not None else (lambda _, x: tree_lib.is_float(x) and x.ndim == 2)
  chosen = set(tree_lib.selected_paths(params, where, what="to_sparse"))

  def one(path, x):
    name = tree_lib.path_str(path)
    if name not in chosen:
      return x
    if np.ndim(x) != 2:
      raise NotImplementedError(
        f"to_sparse: {name!r} has shape {np.shape(x)}; only matrices are exported "
        "(jax.experimental.sparse convolves only 1-D single-channel inputs, so conv "
        "kernels stay dense)."
      )
    nse = int(np.count_nonzero(np.asarray(x)))
    return getattr(_sparse(), format.upper()).fromdense(x, nse=nse)

  return jax.tree_util.tree_map_with_path(one, params)


def _bind(site: Any, eqn: Any, ins: list) -> list:
  del site
  out = eqn.primitive.bind(*ins, **eqn.params)
  return list(out) if eqn.primitive.multiple_results else [out]


def sparse_apply(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` run with sparse params: ``sparse_apply(fn)(to_sparse(params), *args)``.

  ``fn`` is traced once on dense stand-ins, with custom-derivative functions (ReLU,
  GELU, ...) inlined, and its program evaluated under ``jax.experimental.sparse.sparsify``
  (which cannot evaluate them itself in this JAX), so every matmul with a sparse
  kernel becomes a sparse-dense product. Works under ``jax.jit``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxprune
    >>> from jaxprune import export
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> masks = jaxprune.magnitude(0.5).masks(params)
    >>> dense = model.apply({"params": jaxprune.apply_mask(params, masks)}, x)
    >>> apply = export.sparse_apply(lambda p, x: jax.nn.relu(model.apply({"params": p}, x)))
    >>> bool(jnp.allclose(apply(export.to_sparse(params, masks), x), jax.nn.relu(dense)))
    True
  """

  def wrapped(params: Any, *args: Any) -> Any:
    for path, leaf in tree_lib.leaves_with_paths(params, is_leaf=_is_sparse):
      if isinstance(leaf, _sparse().BCSR):
        raise TypeError(
          f"sparse_apply: {path!r} is BCSR, which jax.experimental.sparse multiplies only "
          "as the left operand (a Flax kernel is the right one: x @ W); export it with "
          "to_sparse(..., format='bcoo')."
        )
    stand_ins = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_sparse(x) else x,
      params,
      is_leaf=_is_sparse,
    )
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(stand_ins, *args)
    leaves = jax.tree.leaves((params, args), is_leaf=_is_sparse)

    def program(*flat):
      return capture.interpret(closed.jaxpr, flat, _bind, consts=closed.consts)

    out = _sparse().sparsify(program)(*leaves)
    return jax.tree.unflatten(jax.tree.structure(shapes), out)

  return wrapped
