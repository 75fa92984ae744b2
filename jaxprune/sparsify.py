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
import optax

from jaxprune import tree as tree_lib
from jaxprune.select import check_sparsity, topk_leaves


class TopKGradientsState(NamedTuple):
  """The error-feedback residual: gradient mass not yet sent, shaped like the params."""

  residual: Any


def topk_gradients(
  density: float, *, scope: str = "layer", where: tree_lib.Where = ""
) -> optax.GradientTransformation:
  """Keeps the ``density`` fraction of largest-magnitude gradient entries, with error feedback.

  Each step: ``acc = grad + residual``; the top ``density`` of ``|acc|`` (per leaf, or
  over all selected leaves with ``scope="global"``) is passed on, exactly
  ``round(density * n)`` entries, the rest is kept as the new residual. Put it first in
  a chain, before the optimizer: ``optax.chain(jaxprune.topk_gradients(0.01), optax.sgd(0.1))``.
  In data-parallel training the kept entries are what each worker would send.

  Args:
    density: fraction of entries passed on, in ``(0, 1]``.
    scope: ``"layer"`` or ``"global"``.
    where: which leaves are sparsified (default ``""``: every float array); others pass
      through untouched.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`TopKGradientsState`.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> tx = jaxprune.topk_gradients(0.5)
    >>> g = {"w": jnp.array([1.0, -4.0, 2.0, 0.5])}
    >>> state = tx.init(g)
    >>> out, state = tx.update(g, state)
    >>> out["w"].tolist(), state.residual["w"].tolist()
    ([0.0, -4.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.5])
  """
  check_sparsity(1.0 - float(density), "1 - density")
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  pred = tree_lib.as_predicate(where)

  def chosen(tree):
    return [pred(p, x) and tree_lib.is_float(x) for p, x in tree_lib.leaves_with_paths(tree)]

  def init(params):
    return TopKGradientsState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
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

  return optax.GradientTransformation(init, update)
