"""Optax gradient transformations that prune.

:func:`masked` wraps any optimizer so that pruned weights are exactly zero after
``optax.apply_updates``; its state holds the inner state, the masks and the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxprune import masks as masks_lib
from jaxprune import tree as tree_lib
from jaxprune.pruners import Pruner
from jaxprune.select import is_concrete


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
    # optax.masked / multi_transform (and optimizers built on them, e.g. muon) hold an
    # empty MaskedNode where their inner transform does not see a param: a leaf here.
    is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode),
  )


def _jit_when_eager(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn``, jitted once when called outside a trace, traced inline inside one.

  A transform's ``update`` called eagerly (a training loop without ``jit``) builds fresh
  ``lax.cond`` branch closures at every call, so the cond would compile again at every
  step; jitted once per transform it compiles once per shapes. Inside the caller's
  ``jit`` a nested jit would only lower slower (0.43 -> 0.55 s a LeNet step), so ``fn``
  is traced inline there.
  """
  jitted = jax.jit(fn)

  def call(*args: Any, **kwargs: Any) -> Any:
    traced = any(not is_concrete(x) for x in jax.tree.leaves((args, kwargs)))
    return (fn if traced else jitted)(*args, **kwargs)

  return call


def _check_inner(inner: Any) -> None:
  """Raises ``TypeError`` unless ``inner`` is an optax transform (``init`` and ``update``)."""
  if callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None)):
    return
  if isinstance(inner, Pruner):
    hint = " The arguments are swapped: write jaxprune.masked(optimizer, pruner)."
  elif callable(inner):
    hint = f" Call the factory first, e.g. {getattr(inner, '__name__', 'optax.adam')}(1e-3)."
  else:
    hint = " Pass an optimizer such as optax.adam(1e-3) or optax.chain(...)."
  raise TypeError(
    "masked(inner, pruner): inner must be an optax GradientTransformation (an object "
    f"with init and update), got {inner!r} ({type(inner).__name__}).{hint}"
  )


def _check_fixed_masks(masks: Any) -> Any:
  """Returns ``masks`` when it is a pytree of bool arrays, or raises a ``TypeError`` naming it."""
  leaves = jax.tree.leaves(masks)
  if leaves and all(getattr(x, "dtype", None) == jnp.bool_ for x in leaves):
    return masks
  if callable(getattr(masks, "init", None)) and callable(getattr(masks, "update", None)):
    hint = " The arguments are swapped: write jaxprune.masked(optimizer, pruner)."
  elif isinstance(masks, int | float) and not isinstance(masks, bool):
    hint = f" For a sparsity, pass a pruner: jaxprune.magnitude({masks!r})."
  elif leaves:
    bad = next(x for x in leaves if getattr(x, "dtype", None) != jnp.bool_)
    kind = getattr(bad, "dtype", type(bad).__name__)
    hint = f" It has a leaf of {kind}; masks are bool arrays (True = kept)."
  else:
    hint = " It has no array leaves."
  raise TypeError(
    "masked(inner, pruner): pruner must be a jaxprune.Pruner (e.g. jaxprune.magnitude(0.9)) "
    f"or a fixed mask pytree of bool arrays, got {type(masks).__name__}.{hint}"
  )


def masked(
  inner: optax.GradientTransformation, pruner: Pruner | Any
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that the weights ``pruner`` removes are, and stay, exactly zero.

  On each step: if the pruner's schedule says so, masks are recomputed from the current
  params (and gradients) under ``lax.cond`` (no selection work on other steps); the
  inner state's params-shaped entries (e.g. Adam moments) of pruned weights are kept at
  zero; gradients of pruned weights are masked before ``inner`` sees them, so
  moments cannot revive them; the returned updates take pruned weights to exactly zero
  (``update = -param`` there). So ``optax.apply_updates`` alone leaves a pruned model:
  there is no second call to remember. Extra keyword arguments of ``update`` (optax's
  ``value=``, ``grad=``, ..., e.g. from ``nnx.Optimizer.update(model, grads,
  value=loss)``) are passed on to ``inner`` (``optax.polyak_sgd`` needs ``value``).

  ``masked`` must come last: a transform chained after it
  (``optax.chain(jaxprune.masked(...), optax.add_decayed_weights(1e-4))``) changes the
  updates of pruned weights, which then leave zero. Put such transforms in ``inner``.
  The same holds for a wrapper that moves params itself: ``optax.lookahead(masked(...))``
  resets the fast weights to its slow ones (never pruned) at every sync step.

  Not to be confused with ``optax.masked(inner, mask)``, which applies ``inner`` to a
  chosen subset of params and lets the others pass through untouched. The two compose:
  ``optax.masked`` can keep weight decay off biases inside a pruned AdamW (see the
  example).

  Args:
    inner: any optax ``GradientTransformation`` (``optax.adam(1e-3)``, a chain, an
      ``inject_hyperparams`` optimizer, one that takes extra arguments such as
      ``optax.polyak_sgd()``, ...).
    pruner: a :class:`jaxprune.Pruner` (``jaxprune.magnitude(...)``, ...), or a fixed
      mask pytree (bool arrays, ``None`` for unpruned params; e.g. from
      ``pruner.masks(params)``, APoZ or slimming masks) kept for the whole run.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`MaskedState`;
    ``update`` needs ``params``. Read the masks with :func:`masks_of`.

  Raises:
    TypeError: at construction, when ``inner`` is not an optax transform or ``pruner``
      is neither a Pruner nor a pytree of bool arrays (a number, swapped arguments).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> params = {"w": jnp.arange(1., 7.).reshape(2, 3), "b": jnp.zeros(3)}
    >>> decay_weights_only = optax.masked(optax.add_decayed_weights(1e-4),
    ...                                   {"w": True, "b": False})
    >>> inner = optax.chain(optax.scale_by_adam(), decay_weights_only, optax.scale(-1e-3))
    >>> tx = jaxprune.masked(inner, jaxprune.magnitude(jaxprune.agp(0.5, 0, 10, 5)))
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> for _ in range(11):
    ...   grads = jax.tree.map(jnp.ones_like, params)
    ...   updates, state = update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> (params["w"] == 0).sum().item(), jaxprune.masks_of(state)["w"].sum().item()
    (3, 3)
  """
  _check_inner(inner)
  fixed = None if isinstance(pruner, Pruner) else _check_fixed_masks(pruner)
  inner_extra = optax.with_extra_args_support(inner)

  def init(params):
    if fixed is not None:
      tree_lib.check_same_structure(params, fixed)
    return MaskedState(
      inner_state=inner.init(params),
      # fixed masks in the params' containers (a dict of masks for a FrozenDict, ...)
      masks=pruner.init_masks(params) if fixed is None else tree_lib.restructure(params, fixed),
      count=jnp.zeros([], jnp.int32),
    )

  @_jit_when_eager
  def refresh_or_keep(params, updates, masks, step):
    def refresh(masks, step):
      return pruner.masks(params, updates, step=step, previous=masks)

    # The step is an operand, not a constant closed over: inside the cond it is traced,
    # with or without jit, so the pruner takes one code path in both.
    return lax.cond(pruner.is_update(step), refresh, lambda masks, _: masks, masks, step)

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("jaxprune.masked needs the params: call tx.update(grads, state, params).")
    step = state.count
    masks, inner_state = state.masks, state.inner_state
    if fixed is None:
      # Only the masks go through the cond: a cond over the optimizer state too would
      # copy all of it (e.g. Adam's moments) on every step. The zeroing below is a
      # no-op except right after an update and fuses into the inner update.
      masks = refresh_or_keep(params, updates, masks, step)
      inner_state = _zero_pruned(inner, inner_state, masks)
    grads = masks_lib.apply_mask(updates, masks)
    inner_updates, inner_state = inner_extra.update(
      grads, inner_state, masks_lib.apply_mask(params, masks), **extra_args
    )
    new_updates = jax.tree.map(
      lambda m, u, p: u if m is None else jnp.where(m, u, -p.astype(u.dtype)),
      masks,
      inner_updates,
      params,
      is_leaf=tree_lib.is_none,
    )
    return new_updates, MaskedState(inner_state, masks, step + 1)

  return optax.GradientTransformationExtraArgs(init, update)


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


def set_masks(state: Any, masks: Any) -> Any:
  """The optimizer state with the masks of its one :func:`masked` state replaced.

  Works wherever the :class:`MaskedState` sits (inside ``optax.chain``,
  ``inject_hyperparams``, ...), through ``optax.tree_utils.tree_set``; the new masks
  must have the structure and shapes of the old ones (``None`` where unpruned).

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = optax.chain(optax.clip(1.0), jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(0.5)))
    >>> state = tx.init({"w": jnp.ones(2)[None]})
    >>> state = jaxprune.set_masks(state, {"w": jnp.array([[True, False]])})
    >>> jaxprune.masks_of(state)["w"].tolist()
    [[True, False]]
  """
  old = masks_of(state)  # exactly one jaxprune.masked state, or a clear error
  old_paths = [p for p, _ in tree_lib.leaves_with_paths(old, is_leaf=tree_lib.is_none)]
  new = tree_lib.leaves_with_paths(masks, is_leaf=tree_lib.is_none)
  if old_paths != [p for p, _ in new]:
    raise ValueError(
      f"set_masks: the new masks have the leaves {[p for p, _ in new]}, the state's masks "
      f"{old_paths}."
    )
  for (path, a), (_, b) in zip(tree_lib.leaves_with_paths(old, is_leaf=tree_lib.is_none), new):
    if (a is None) != (b is None) or (a is not None and jnp.shape(a) != jnp.shape(b)):
      raise ValueError(
        f"set_masks: the mask for {path!r} is {None if b is None else jnp.shape(b)}, the "
        f"state's is {None if a is None else jnp.shape(a)}."
      )
  # An int or float mask would be stored and fail only at the next update, inside it.
  masks_lib._check_bool(masks, "set_masks")
  # In the old masks' containers: the inner state's moments are zeroed along them.
  return optax.tree_utils.tree_set(state, masks=tree_lib.restructure(old, masks))
