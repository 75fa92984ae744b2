"""Optax gradient transformations that prune.

:func:`masked` wraps any optimizer so that pruned weights are exactly zero after
``optax.apply_updates``; its state holds the inner state, the masks and the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxprune import masks as masks_lib
from jaxprune import tree as tree_lib
from jaxprune.pruners import Pruner


class MaskedState(NamedTuple):
  """State of :func:`masked`: the inner optimizer's state, the masks, the step count."""

  inner_state: Any
  masks: Any
  count: jax.Array


def _zero_pruned(inner: optax.GradientTransformation, inner_state: Any, masks: Any) -> Any:
  """Zeros the params-shaped parts of an optimizer state (e.g. Adam moments) where pruned."""

  def zero(leaf, mask):
    if mask is None or not hasattr(leaf, "shape") or jnp.shape(leaf) != jnp.shape(mask):
      return leaf
    return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))

  return optax.tree_utils.tree_map_params(
    inner,
    zero,
    inner_state,
    masks,
    transform_non_params=lambda leaf, *_: leaf,
    is_leaf=tree_lib.is_none,
  )


def masked(inner: optax.GradientTransformation, pruner: Pruner) -> optax.GradientTransformation:
  """Wraps ``inner`` so that the weights ``pruner`` removes are, and stay, exactly zero.

  On each step: if the pruner's schedule says so, masks are recomputed from the current
  params (and gradients) under ``lax.cond`` (no selection work on other steps); the
  inner state's params-shaped entries (e.g. Adam moments) of pruned weights are kept at
  zero; gradients of pruned weights are masked before ``inner`` sees them, so
  moments cannot revive them; the returned updates take pruned weights to exactly zero
  (``update = -param`` there). So ``optax.apply_updates`` alone leaves a pruned model:
  there is no second call to remember.

  Not to be confused with ``optax.masked(inner, mask)``, which applies ``inner`` to a
  chosen subset of params and lets the others pass through untouched. The two compose:
  ``optax.masked`` can keep weight decay off biases inside a pruned AdamW (see the
  example).

  Args:
    inner: any optax ``GradientTransformation`` (``optax.adam(1e-3)``, a chain, an
      ``inject_hyperparams`` optimizer, ...).
    pruner: a :class:`jaxprune.Pruner` (``jaxprune.magnitude(...)``, ...), or a fixed
      mask pytree (bool arrays, ``None`` for unpruned params; e.g. from
      ``pruner.masks(params)``, APoZ or slimming masks) kept for the whole run.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`MaskedState`;
    ``update`` needs ``params``. Read the masks with :func:`masks_of`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> params = {"w": jnp.arange(1., 7.).reshape(2, 3), "b": jnp.zeros(3)}
    >>> decay_weights_only = optax.masked(optax.add_decayed_weights(1e-4),
    ...                                   {"w": True, "b": False})
    >>> inner = optax.chain(optax.scale_by_adam(), decay_weights_only, optax.scale(-1e-3))
    >>> tx = jaxprune.masked(inner, jaxprune.magnitude(jaxprune.agp(0.5, 0, 10, 5)))
    >>> state = tx.init(params)
    >>> for _ in range(11):
    ...   grads = jax.tree.map(jnp.ones_like, params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> (params["w"] == 0).sum().item(), jaxprune.masks_of(state)["w"].sum().item()
    (3, 3)
  """
  fixed = None
  if not isinstance(pruner, Pruner):
    leaves = jax.tree.leaves(pruner)
    if not leaves or not all(getattr(x, "dtype", None) == jnp.bool_ for x in leaves):
      raise TypeError(
        "masked() takes a jaxprune.Pruner (e.g. jaxprune.magnitude(0.9)) or a fixed "
        f"mask pytree of bool arrays, got {type(pruner).__name__}."
      )
    fixed = pruner

  def init(params):
    if fixed is not None:
      tree_lib.check_same_structure(params, fixed)
    return MaskedState(
      inner_state=inner.init(params),
      masks=pruner.init_masks(params) if fixed is None else fixed,
      count=jnp.zeros([], jnp.int32),
    )

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("jaxprune.masked needs the params: call tx.update(grads, state, params).")
    step = state.count

    def refresh(masks):
      return pruner.masks(params, updates, step=step, previous=masks)

    masks, inner_state = state.masks, state.inner_state
    if fixed is None:
      # Only the masks go through the cond: a cond over the optimizer state too would
      # copy all of it (e.g. Adam's moments) on every step. The zeroing below is a
      # no-op except right after an update and fuses into the inner update.
      masks = lax.cond(pruner.is_update(step), refresh, lambda masks: masks, masks)
      inner_state = _zero_pruned(inner, inner_state, masks)
    grads = masks_lib.apply_mask(updates, masks)
    inner_updates, inner_state = inner.update(
      grads, inner_state, masks_lib.apply_mask(params, masks)
    )
    new_updates = jax.tree.map(
      lambda m, u, p: u if m is None else jnp.where(m, u, -p.astype(u.dtype)),
      masks,
      inner_updates,
      params,
      is_leaf=tree_lib.is_none,
    )
    return new_updates, MaskedState(inner_state, masks, step + 1)

  return optax.GradientTransformation(init, update)


def masks_of(state: Any) -> Any:
  """The current masks inside an optimizer state that contains one :func:`masked`.

  Finds the :class:`MaskedState` wherever it sits (inside ``optax.chain``,
  ``optax.inject_hyperparams``, ...). For an ``nnx.Optimizer`` pass
  ``optimizer.opt_state``.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = optax.chain(optax.clip(1.0), jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(0.5)))
    >>> jaxprune.masks_of(tx.init({"w": jnp.ones((2, 2))}))["w"].all().item()
    True
  """
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MaskedState))
    if isinstance(s, MaskedState)
  ]
  if not found:
    raise ValueError("No jaxprune.masked state found in this optimizer state.")
  if len(found) > 1:
    raise ValueError(
      f"This optimizer state holds {len(found)} jaxprune.masked states; "
      "read the one you want from its position in the state."
    )
  return found[0].masks
