"""Lottery tickets: iterative magnitude pruning with weight rewinding.

Frankle & Carbin (2019) train a dense network, prune a fraction of its smallest weights,
reset the survivors to their initial values and retrain, for several rounds; Frankle
et al. (2020, "Linear mode connectivity and the lottery ticket hypothesis") reset them
to their values at an early step ``k`` instead ("rewinding"), which keeps the tickets
trainable on larger networks.

:func:`lottery` is an optax transform of the shape of :func:`jaxprune.masked` (it holds
a :class:`jaxprune.MaskedState`, so ``jaxprune.masks_of`` reads its masks): the rounds
are the update steps of the pruner's schedule (e.g. ``jaxprune.iterative``), and the
rewind point lives in the optimizer state, so a checkpoint of the state carries it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import tree as tree_lib
from jaxprune.pruners import Pruner
from jaxprune.transforms import MaskedState, _check_inner, _jit_when_eager, _zero_pruned, masked


class LotteryState(NamedTuple):
  """State of :func:`lottery`.

  Attributes:
    masked: the :class:`jaxprune.MaskedState` (inner state, masks, step).
    rewind_params: the params at step ``rewind`` (before that step: the first params).
    rewind_inner: the inner optimizer's state at step ``rewind`` (e.g. Adam's moments
      and count, so the learning-rate schedule restarts from ``rewind`` too).
  """

  masked: MaskedState
  rewind_params: Any
  rewind_inner: Any


def lottery(
  inner: optax.GradientTransformation, pruner: Pruner, *, rewind: int = 0
) -> optax.GradientTransformationExtraArgs:
  """``jaxprune.masked(inner, pruner)`` that rewinds the survivors after each pruning round.

  At step ``rewind`` the transform copies the params and the inner state. At each
  update step ``t`` of ``pruner`` (a round; ``t > rewind``), the masks are recomputed
  from the trained params as :func:`jaxprune.masked` does (magnitude: the smallest
  ``|w|`` go), then the step's gradient is dropped and the updates take every param to
  its copy from step ``rewind``, times its new mask (unpruned params such as biases
  rewind whole; ``apply_updates`` adds ``copy - w`` to ``w``, which gives the copy to
  within a rounding, and pruned weights exactly 0); the inner state returns to its copy, with the moments of pruned
  weights zeroed. The next round trains the ticket from step ``rewind``'s weights,
  learning rate and moments; other steps are those of ``masked``. ``rewind=0`` is the
  original lottery ticket (back to the initial weights and a fresh optimizer).

  Non-param state of a model (BatchNorm statistics) is not the optimizer's and is not
  rewound.

  Args:
    inner: any optax ``GradientTransformation``.
    pruner: a :class:`jaxprune.Pruner` whose schedule prunes in rounds (e.g.
      ``jaxprune.magnitude(jaxprune.iterative([(1000, 0.5), (2000, 0.75)]))``).
    rewind: the step ``k`` whose weights the survivors return to; every update step
      of the schedule must come after it.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`LotteryState`; ``update`` needs ``params``.

  Raises:
    ValueError: when ``rewind`` is negative or the pruner updates masks at or before
      step ``rewind``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> from jaxprune import sparse
    >>> params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3)}
    >>> pruner = jaxprune.magnitude(jaxprune.iterative([(3, 0.5)]))
    >>> tx = sparse.lottery(optax.sgd(0.1), pruner, rewind=1)
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> grads = {"w": jnp.array([[1.0, -1, 1], [-1, 1, -1]])}
    >>> for _ in range(4):  # step 3 keeps the 3 largest |w| and rewinds them to step 1
    ...   updates, state = update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(w, 3) for w in params["w"].ravel().tolist()]  # w at step 1: w - 0.1 * g
    [0.0, 0.0, 0.0, 4.1, 4.9, 6.1]
  """
  _check_inner(inner)
  if not isinstance(pruner, Pruner):
    raise TypeError(
      f"lottery needs a jaxprune.Pruner whose schedule prunes in rounds, got {pruner!r}."
    )
  if isinstance(rewind, bool) or not isinstance(rewind, int | np.integer) or rewind < 0:
    raise ValueError(f"rewind must be a step >= 0, got {rewind!r}.")
  with jax.ensure_compile_time_eval():  # inject_hyperparams builds the transform under jit
    early = np.flatnonzero(np.asarray(jax.vmap(pruner.is_update)(jnp.arange(rewind + 1))))
  if early.size:
    raise ValueError(
      f"the pruner updates its masks at step {int(early[0])}, not after the rewind step "
      f"{rewind}: the first round must prune weights trained past the rewind point."
    )
  tx = masked(inner, pruner)

  def init(params):
    state = cast(MaskedState, tx.init(params))
    return LotteryState(state, params, state.inner_state)

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sparse.lottery needs the params: call tx.update(grads, state, params).")
    return traced_update(updates, state, params, **extra_args)

  @_jit_when_eager  # an eager update would compile its conds of fresh closures every step
  def traced_update(updates, state, params, **extra_args):
    step = state.masked.count
    rewind_params, rewind_inner = lax.cond(
      step == rewind,
      lambda: (params, state.masked.inner_state),
      lambda: (state.rewind_params, state.rewind_inner),
    )
    new_updates, new_state = tx.update(updates, state.masked, params, **extra_args)
    new_masked = cast(MaskedState, new_state)

    def rewound(new_updates, inner_state):
      del new_updates, inner_state
      masks = new_masked.masks
      back = jax.tree.map(
        lambda m, r, p: (r if m is None else jnp.where(m, r, 0)).astype(p.dtype) - p,
        masks,
        rewind_params,
        params,
        is_leaf=tree_lib.is_none,
      )
      return back, _zero_pruned(inner, rewind_inner, masks)

    new_updates, inner_state = lax.cond(
      pruner.is_update(step) & (step > rewind),
      rewound,
      lambda u, s: (u, s),
      new_updates,
      new_masked.inner_state,
    )
    new_masked = MaskedState(inner_state, new_masked.masks, new_masked.count)
    return new_updates, LotteryState(new_masked, rewind_params, rewind_inner)

  return optax.GradientTransformationExtraArgs(init, update)
