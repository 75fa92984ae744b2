"""Top-k gradient sparsification with error feedback, as an optax transform.

Communication-efficient data-parallel training sends only the largest gradient entries
(Aji & Heafield 2017; Lin et al. 2018, "Deep Gradient Compression"). What is not sent is
not lost: it is kept in a residual and added to the next step's gradient (error
feedback), so every coordinate is eventually applied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import select as select_lib
from jaxprune import tree as tree_lib
from jaxprune.select import topk_leaves


class TopKGradientsState(NamedTuple):
  """The error-feedback residual: gradient mass not yet sent, shaped like the params."""

  residual: Any


def _check_density(density: Any) -> None:
  """Raises unless ``density`` is a number in ``(0, 1]`` (a traced one is not checked)."""
  if not select_lib.is_concrete(density):
    return  # a traced hyperparameter (optax.inject_hyperparams under jit)
  v = np.asarray(density)
  if isinstance(density, bool) or not (
    np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)
  ):
    raise TypeError(
      "topk_gradients(): density must be a number in (0, 1], the fraction of gradient "
      f"entries passed on; got {density!r} ({type(density).__name__})."
    )
  if v.ndim != 0 or not 0 < v <= 1:
    raise ValueError(
      "topk_gradients(): density must be in (0, 1], the fraction of gradient entries "
      f"passed on (a scalar); got {density!r}."
    )


def topk_gradients(
  density: float | jax.Array, *, scope: str = "layer", where: tree_lib.Where = ""
) -> optax.GradientTransformationExtraArgs:
  """Keeps the ``density`` fraction of largest-magnitude gradient entries, with error feedback.

  Each step: ``acc = grad + residual``; the top ``density`` of ``|acc|`` (per leaf, or
  over all selected leaves with ``scope="global"``) is passed on, exactly
  ``round(density * n)`` entries, the rest is kept as the new residual. Put it first in
  a chain, before the optimizer: ``optax.chain(jaxprune.topk_gradients(0.01), optax.sgd(0.1))``.
  In data-parallel training the kept entries are what each worker would send.

  Args:
    density: fraction of entries passed on, in ``(0, 1]``; a number, or a scalar array
      (``optax.inject_hyperparams(jaxprune.topk_gradients)(density=0.01)`` makes it a
      hyperparameter that can change during training).
    scope: ``"layer"`` or ``"global"``.
    where: which leaves are sparsified (default ``""``: every float array); others pass
      through untouched.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`TopKGradientsState`; ``update`` ignores optax's extra arguments
    (``value=``, ...).

  Raises:
    TypeError: at construction, for a ``density`` that is not a number or a malformed
      ``where``.
    ValueError: at construction, for a ``density`` outside ``(0, 1]`` or an unknown
      ``scope``; at ``init``, for a ``where`` that selects no floating-point leaf.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> tx = jaxprune.topk_gradients(0.5)
    >>> g = {"w": jnp.array([1.0, -4.0, 2.0, 0.5])}
    >>> state = tx.init(g)
    >>> out, state = tx.update(g, state)
    >>> out["w"].tolist(), state.residual["w"].tolist()
    ([0.0, -4.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.5])
  """
  _check_density(density)
  if scope not in ("layer", "global"):
    raise ValueError(f"topk_gradients(): scope must be 'layer' or 'global', got {scope!r}.")
  pred = tree_lib.as_predicate(where)

  def chosen(tree):
    return [pred(p, x) and tree_lib.is_float(x) for p, x in tree_lib.leaves_with_paths(tree)]

  def init(params):
    if not any(chosen(params)):
      raise tree_lib.no_match_error(params, where, "topk_gradients()")
    return TopKGradientsState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None, **extra_args):
    del params, extra_args  # optax's `value=`, ...: accepted, not used
    acc = jax.tree.map(lambda g, r: g + r.astype(g.dtype), updates, state.residual)
    leaves, treedef = jax.tree.flatten(acc)
    picks = [i for i, ok in enumerate(chosen(acc)) if ok]
    masks = topk_leaves([jnp.abs(leaves[i]) for i in picks], 1.0 - density, scope)
    sent, residual = list(leaves), [jnp.zeros_like(x) for x in leaves]
    for i, m in zip(picks, masks):
      sent[i] = jnp.where(m, leaves[i], 0)
      residual[i] = jnp.where(m, 0, leaves[i])
    return jax.tree.unflatten(treedef, sent), TopKGradientsState(
      jax.tree.unflatten(treedef, residual)
    )

  return optax.GradientTransformationExtraArgs(init, update)
