"""Pruners: a score function, a sparsity schedule and a scope, bundled.

A :class:`Pruner` is a frozen dataclass of plain values and functions; it computes mask
pytrees and says when to recompute them. :func:`jaxprune.masked` drives it inside an
optax optimizer, and it can be called directly for one-shot pruning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import masks as masks_lib
from jaxprune import scores as scores_lib
from jaxprune import structures as structures_lib
from jaxprune import tree as tree_lib
from jaxprune.schedules import Schedule, as_schedule
from jaxprune.select import check_sparsity, topk_leaves

ScoreFn = Callable[[jax.Array, Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Pruner:
  """How to prune: importance scores, a sparsity schedule, a scope and a param filter.

  Attributes:
    score: ``(param, grad, key) -> scores`` for one leaf (see :mod:`jaxprune.scores`).
    schedule: the target sparsity over steps.
    scope: ``"layer"`` (each param gets the target) or ``"global"`` (one threshold over
      all pruned params).
    where: which params are pruned: ``None`` (float arrays with ``ndim >= 2``: weight
      matrices and conv kernels, never biases or norm scales), regexes searched in the
      param path, or a ``(path, leaf) -> bool`` predicate.
    overrides: ``{regex: sparsity or Schedule}`` per-layer targets, pruned layer-wise.
      A float follows the main schedule's progress: it is reached when the main
      schedule reaches its final value. The first matching regex wins.
    dense_first: keep the first pruned param (in natural path order) dense.
    dense_last: keep the last one dense (e.g. the classifier head).
    structure: which weights go together (see :mod:`jaxprune.structures`):
      ``"unstructured"``, ``"neurons"``, ``"filters"``, ``"channels"``,
      ``jaxprune.blocks((r, c))`` or ``jaxprune.n_m(n, m)``. Group structures score a
      group by the norm of its weights' scores and count sparsity in groups.
    needs_grads: the score uses gradients.
    seed: seeds the PRNG keys of random scores (folded with the step and the leaf).
  """

  score: ScoreFn
  schedule: Schedule
  scope: str = "layer"
  where: tree_lib.Where = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dense_first: bool = False
  dense_last: bool = False
  structure: Any = None
  needs_grads: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.scope not in ("layer", "global"):
      raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}.")
    object.__setattr__(self, "structure", structures_lib.as_structure(self.structure))
    if isinstance(self.structure, structures_lib.NM):
      nm = self.structure
      if self.scope != "layer" or self.overrides:
        raise ValueError(f"{nm.n}:{nm.m} sparsity is per group: use scope='layer', no overrides.")
      if self.schedule.final is None or abs(self.schedule.final - nm.sparsity) > 1e-6:
        raise ValueError(
          f"{nm.n}:{nm.m} sparsity removes {nm.sparsity:g} of the weights, but the "
          f"schedule ends at {self.schedule.final}; pass sparsity={nm.sparsity:g} "
          "(or a schedule that ends there)."
        )
    for pattern, value in self.overrides.items():
      if not isinstance(pattern, str):
        raise TypeError(f"override keys are regexes over param paths, got {pattern!r}.")
      if not isinstance(value, Schedule):
        check_sparsity(value, f"override sparsity for {pattern!r}")

  def paths(self, params: Any) -> list[str]:
    """The paths of the params this pruner acts on, in natural order."""
    paths = tree_lib.selected_paths(
      params, self.where, dense_first=self.dense_first, dense_last=self.dense_last
    )
    for pattern in self.overrides:
      if not any(tree_lib.matches(pattern, p) for p in paths):
        raise ValueError(
          f"The override {pattern!r} matches none of the pruned params {paths}. "
          "Check the path (see jaxprune.summary(params)) or widen `where=`."
        )
    return paths

  def init_masks(self, params: Any) -> Any:
    """All-kept masks for the pruned params, ``None`` for the others."""
    return masks_lib.ones_like(params, self.paths(params))

  def is_update(self, step: Any) -> jax.Array:
    """Whether masks are recomputed at ``step``."""
    return self.schedule.is_update(step)

  def sparsity_of(self, path: str, step: Any) -> jax.Array:
    """The target sparsity of the param at ``path`` at ``step`` (``None``: the end)."""
    main = self.schedule
    for pattern, value in self.overrides.items():
      if tree_lib.matches(pattern, path):
        if isinstance(value, Schedule):
          return _at(value, step)
        if main.final:
          return jnp.float32(value) * _at(main, step) / main.final
        return jnp.float32(value)
    return _at(main, step)

  def masks(self, params: Any, grads: Any = None, *, step: Any = None, previous: Any = None) -> Any:
    """Masks for ``params`` at ``step`` (``None``: the schedule's final sparsity).

    Args:
      params: the params pytree.
      grads: gradients with the structure of params (needed by saliency scores).
      step: the training step; selects the target sparsity and seeds random scores.
      previous: the current masks; weights they prune keep the lowest score, so masks
        only shrink while the target sparsity grows.

    Returns:
      A mask pytree: exactly ``round(sparsity * n)`` weights pruned per param (layer
      scope) or over all non-overridden params together (global scope).

    Examples:
      >>> import jax.numpy as jnp, jaxprune
      >>> params = {"w": jnp.arange(1., 9.).reshape(2, 4), "b": jnp.ones(4)}
      >>> m = jaxprune.magnitude(0.75).masks(params)
      >>> m["w"].sum().item(), m["b"] is None
      (2, True)
    """
    paths = self.paths(params)
    by_path = dict(tree_lib.leaves_with_paths(params))
    if self.needs_grads and grads is None:
      raise ValueError("This pruner scores with gradients: pass grads=.")
    grad_of = {}
    if grads is not None:
      tree_lib.check_same_structure(params, grads, what="grads")
      grad_of = dict(tree_lib.leaves_with_paths(grads))
    prev_of = {}
    if previous is not None:
      tree_lib.check_same_structure(params, previous)
      prev_of = dict(tree_lib.leaves_with_paths(previous))
    step_value = 0 if step is None else step
    base_key = jax.random.fold_in(jax.random.key(self.seed), jnp.asarray(step_value, jnp.int32))
    structure = self.structure
    scores = {}
    for i, path in enumerate(paths):
      structure.check(path, tuple(jnp.shape(by_path[path])))
      s = self.score(by_path[path], grad_of.get(path), jax.random.fold_in(base_key, i))
      s = structure.group_scores(s)
      if prev_of.get(path) is not None:
        kept = structure.group_mask(prev_of[path])
        s = jnp.where(kept, s.astype(jnp.float32), -jnp.inf)
      scores[path] = s

    if isinstance(structure, structures_lib.NM):
      result = {}
      for p in paths:
        n_keep = structure.m - jnp.round(self.sparsity_of(p, step) * structure.m)
        result[p] = structure.keep(scores[p], n_keep.astype(jnp.int32))
      return self._to_tree(params, result)

    overridden = [p for p in paths if any(tree_lib.matches(o, p) for o in self.overrides)]
    pooled = [p for p in paths if p not in overridden]
    result = {}
    if self.scope == "global" and pooled:
      kept = topk_leaves([scores[p] for p in pooled], _at(self.schedule, step), "global")
      result.update(zip(pooled, kept))
      layerwise = overridden
    else:
      layerwise = paths
    for p in layerwise:
      result[p] = topk_leaves([scores[p]], self.sparsity_of(p, step), "layer")[0]
    for p in paths:
      result[p] = structure.expand(result[p], tuple(jnp.shape(by_path[p])))
    return self._to_tree(params, result)

  @staticmethod
  def _to_tree(params: Any, by_path: dict[str, jax.Array]) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [by_path.get(tree_lib.path_str(k)) for k, _ in flat])


def _at(schedule: Schedule, step: Any) -> jax.Array:
  if step is None:
    if schedule.final is None:
      raise ValueError("This schedule has no final sparsity: pass step=.")
    return jnp.float32(schedule.final)
  return schedule.sparsity(step)


def _pruner(score: ScoreFn, sparsity: Any, overrides: Mapping[str, Any] | None, **kw) -> Pruner:
  return Pruner(score=score, schedule=as_schedule(sparsity), overrides=dict(overrides or {}), **kw)


_COMMON_ARGS = """
    sparsity: a float in ``[0, 1)`` (pruned at the first step and kept), a
      :class:`Schedule` (``jaxprune.agp``, ``jaxprune.iterative``, ...) or a
      ``step -> sparsity`` function.
    scope: ``"layer"`` or ``"global"``.
    where: which params are pruned (default: weight matrices and conv kernels).
    overrides: per-layer sparsities ``{regex: value}``.
    dense_first: keep the first pruned layer dense.
    dense_last: keep the last pruned layer dense.
    structure: ``"unstructured"`` (default), ``"neurons"``, ``"filters"``,
      ``"channels"``, ``jaxprune.blocks(...)`` or ``jaxprune.n_m(n, m)``."""


def magnitude(
  sparsity: float | Schedule | Callable,
  *,
  scope: str = "layer",
  where: tree_lib.Where = None,
  overrides: Mapping[str, Any] | None = None,
  dense_first: bool = False,
  dense_last: bool = False,
  structure: Any = None,
) -> Pruner:
  """Magnitude pruning (Han et al. 2015): removes the weights with the smallest ``|w|``.

  Args:{args}

  Returns:
    A :class:`Pruner` for :func:`jaxprune.masked` or direct use.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> params = {{"Dense_0": {{"kernel": jnp.arange(1., 17.).reshape(4, 4), "bias": jnp.ones(4)}}}}
    >>> tx = jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(0.5))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> jaxprune.summary(optax.apply_updates(params, updates))["Dense_0/kernel"].zeros
    8
  """
  return _pruner(
    scores_lib.magnitude,
    sparsity,
    overrides,
    scope=scope,
    where=where,
    dense_first=dense_first,
    dense_last=dense_last,
    structure=structure,
  )


def random(
  sparsity: float | Schedule | Callable,
  *,
  seed: int = 0,
  scope: str = "layer",
  where: tree_lib.Where = None,
  overrides: Mapping[str, Any] | None = None,
  dense_first: bool = False,
  dense_last: bool = False,
  structure: Any = None,
) -> Pruner:
  """Random pruning, the baseline: removes uniformly random weights (or groups).

  Keys are derived from ``seed``, the step and the leaf, so masks are reproducible.
  Weights pruned earlier stay pruned when the target grows.

  Args:{args}
    seed: the PRNG seed.

  Returns:
    A :class:`Pruner`.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> m = jaxprune.random(0.5, seed=1).masks({{"w": jnp.ones((10, 10))}})
    >>> int(m["w"].sum())
    50
  """
  return _pruner(
    scores_lib.random,
    sparsity,
    overrides,
    seed=seed,
    scope=scope,
    where=where,
    dense_first=dense_first,
    dense_last=dense_last,
    structure=structure,
  )


def saliency(
  sparsity: float | Schedule | Callable,
  *,
  scope: str = "layer",
  where: tree_lib.Where = None,
  overrides: Mapping[str, Any] | None = None,
  dense_first: bool = False,
  dense_last: bool = False,
  structure: Any = None,
) -> Pruner:
  """Saliency pruning: removes the weights with the smallest ``|w * dL/dw|``.

  The first-order Taylor estimate of the loss change when a weight is set to zero.
  Inside :func:`jaxprune.masked` the gradients of the update step are used.

  Args:{args}

  Returns:
    A :class:`Pruner` (``needs_grads=True``).

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> p, g = {{"w": jnp.array([[1., 2., 3., 4.]])}}, {{"w": jnp.array([[4., 1., 1., 1.]])}}
    >>> jaxprune.saliency(0.5).masks(p, g)["w"].tolist()
    [[True, False, False, True]]
  """
  return _pruner(
    scores_lib.saliency,
    sparsity,
    overrides,
    needs_grads=True,
    scope=scope,
    where=where,
    dense_first=dense_first,
    dense_last=dense_last,
    structure=structure,
  )


for _f in (magnitude, random, saliency):
  _f.__doc__ = _f.__doc__.format(args=_COMMON_ARGS)
