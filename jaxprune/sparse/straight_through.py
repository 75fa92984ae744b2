"""Straight-through sparse training: STE and SR-STE (Zhou et al. 2021).

The forward pass uses ``w * m`` with ``m`` the pruner's mask of the *current* dense
weights (e.g. the top-k of ``|w|``, or N:M), recomputed every step; the gradient with
respect to the masked weights is applied to the dense ``w`` unchanged (straight
through), so pruned weights keep learning and can come back. SR-STE adds the decay
``decay * (1 - m) * w`` to the gradient of the pruned weights (``decay = 2e-4`` in the
paper), which damps the mask flipping of plain STE.

The transform keeps the mask for the next forward pass in its state; the loss needs
one wrapper call, :func:`ste_params`::

  tx = jaxprune.sparse.sr_ste(optax.adam(1e-3), jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, batch):
    def loss_fn(params):
      logits = model.apply({"params": jaxprune.sparse.ste_params(params, state)}, batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  sparse_params = jaxprune.sparse.ste_params(params, state)  # to evaluate or export

The transform must be the outermost one (wrap the whole optimizer as ``inner``): it
predicts the next weights as ``params + updates`` to choose the next mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _checks
from jaxprune import tree as tree_lib
from jaxprune.pruners import Pruner
from jaxprune.transforms import _check_inner


class STEState(NamedTuple):
  """State of :func:`ste` / :func:`sr_ste`: the inner state, the forward masks, the step."""

  inner_state: Any
  masks: Any
  count: jax.Array


def _check_pruner(pruner: Any, name: str) -> None:
  if not isinstance(pruner, Pruner):
    raise TypeError(
      f"{name}(inner, pruner): pruner must be a jaxprune.Pruner, e.g. jaxprune.magnitude(0.9) "
      f"or jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)); got {pruner!r}."
    )


def ste(
  inner: optax.GradientTransformation, pruner: Pruner, *, decay: float = 0.0
) -> optax.GradientTransformationExtraArgs:
  """Straight-through estimator: forward with the pruner's mask of the current weights.

  Each step, the gradient (taken through :func:`ste_params`, so it is the gradient with
  respect to the masked weights, passed to every dense weight) plus
  ``decay * (1 - m) * w`` goes to ``inner``; the updates are the inner ones (dense
  weights change everywhere); the mask for the next forward pass is
  ``pruner.masks(params + updates, step=t + 1)`` (the pruner's schedule gives ``s_t``;
  ``previous`` masks are not used, so pruned weights can return).

  Args:
    inner: any optax ``GradientTransformation``.
    pruner: a :class:`jaxprune.Pruner`: its score, schedule (``s_t``), scope, structure
      (``jaxprune.n_m(2, 4)`` for N:M) and ``where``.
    decay: SR-STE's ``lambda_w`` on the pruned weights (0: plain STE).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`STEState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> from jaxprune.sparse import ste, ste_params
    >>> params = {"w": jnp.array([[1., -4., 2., 3.]])}
    >>> tx = ste(optax.sgd(1.0), jaxprune.magnitude(0.5))
    >>> state = tx.init(params)
    >>> ste_params(params, state)["w"].tolist()
    [[0.0, -4.0, 0.0, 3.0]]
    >>> grads = jax.grad(lambda p: ste_params(p, state)["w"].sum())(params)
    >>> grads["w"].tolist()  # straight through: the pruned weights get gradients too
    [[1.0, 1.0, 1.0, 1.0]]
    >>> updates, state = tx.update(grads, state, params)
    >>> ste_params(optax.apply_updates(params, updates), state)["w"].tolist()
    [[0.0, -5.0, 0.0, 2.0]]
  """
  _check_inner(inner)
  _check_pruner(pruner, "ste")
  _checks.number(decay, "decay", "ste", low=0.0)
  inner_extra = optax.with_extra_args_support(inner)

  def init(params):
    return STEState(
      inner.init(params), pruner.masks(params, step=jnp.int32(0)), jnp.zeros([], jnp.int32)
    )

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "jaxprune.sparse.ste needs the params: call tx.update(grads, state, params)."
      )
    grads = jax.tree.map(
      lambda m, g, p: g if m is None else g + decay * jnp.where(m, 0, p).astype(g.dtype),
      state.masks,
      updates,
      params,
      is_leaf=tree_lib.is_none,
    )
    new_updates, inner_state = inner_extra.update(grads, state.inner_state, params, **extra_args)
    step = state.count + 1
    masks = pruner.masks(optax.apply_updates(params, new_updates), step=step)
    return new_updates, STEState(inner_state, masks, step)

  return optax.GradientTransformationExtraArgs(init, update)


def sr_ste(
  inner: optax.GradientTransformation, pruner: Pruner, *, decay: float = 2e-4
) -> optax.GradientTransformationExtraArgs:
  """SR-STE (Zhou et al. 2021): :func:`ste` with ``decay * (1 - m) * w`` on the pruned weights.

  Args:
    inner: any optax ``GradientTransformation``.
    pruner: a :class:`jaxprune.Pruner`, usually N:M:
      ``jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4))``.
    decay: ``lambda_w`` (2e-4 in the paper).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`STEState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune
    >>> from jaxprune.sparse import sr_ste
    >>> params = {"w": jnp.array([[1.], [-4.], [2.], [3.]])}
    >>> tx = sr_ste(optax.sgd(1.0), jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)), decay=0.5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.zeros((4, 1))}, state, params)
    >>> (updates["w"].ravel() + 0.0).tolist()  # only the pruned 1 and 2 decay
    [-0.5, 0.0, -1.0, 0.0]
  """
  _checks.number(decay, "decay", "sr_ste", low=0.0)
  return ste(inner, pruner, decay=decay)


def _ste_state(state: Any) -> STEState:
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, STEState))
    if isinstance(s, STEState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"Expected one jaxprune.sparse.ste state in this optimizer state, found {len(found)}; "
      "pass the state of the optimizer built with ste(...) or sr_ste(...)."
    )
  return found[0]


def ste_masks(state: Any) -> Any:
  """The masks the next forward pass uses, from a state containing one :func:`ste` state."""
  return _ste_state(state).masks


def ste_params(params: Any, state: Any) -> Any:
  """The params for the forward pass: masked, with the gradient passed straight through.

  ``w + stop_gradient(w * m - w)``: the value is ``w * m`` (the pruned weights exactly
  zero), the gradient with respect to ``w`` is the gradient with respect to ``w * m``.
  Outside a gradient it is simply the sparse model (to evaluate or export).

  Args:
    params: the dense params.
    state: the optimizer state holding one :func:`ste` / :func:`sr_ste` state (for an
      ``nnx.Optimizer``, ``optimizer.opt_state``).

  Returns:
    A pytree like ``params``.
  """
  masks = ste_masks(state)
  tree_lib.check_same_structure(params, masks)
  # leaf by leaf, not tree.map: an nnx.Optimizer's opt_state wraps the masks in OptVariable
  # nodes while nnx params are Param nodes (the same paths, different node types)
  flat_params, treedef = jax.tree.flatten(params, is_leaf=tree_lib.is_none)
  flat_masks = jax.tree.leaves(masks, is_leaf=tree_lib.is_none)
  return jax.tree.unflatten(
    treedef,
    [
      p if m is None else p + jax.lax.stop_gradient(jnp.where(m, p, jnp.zeros((), p.dtype)) - p)
      for m, p in zip(flat_masks, flat_params)
    ],
  )
