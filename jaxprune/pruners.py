"""Pruners: a score function, a sparsity schedule and a scope, bundled.

A :class:`Pruner` is a frozen dataclass of plain values and functions; it computes mask
pytrees and says when to recompute them. :func:`jaxprune.masked` drives it inside an
optax optimizer, and it can be called directly for one-shot pruning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import scores as scores_lib
from jaxprune import select as select_lib
from jaxprune import structures as structures_lib
from jaxprune import tree as tree_lib
from jaxprune._by_shape import topk_by_shape
from jaxprune.distributions import Distribution
from jaxprune.schedules import Schedule, as_schedule, from_levels
from jaxprune.select import check_sparsity, topk_by_count

ScoreFn = Callable[[jax.Array, Any, Any], jax.Array]
Scope = Literal["layer", "global"]


@dataclasses.dataclass(frozen=True)
class Pruner:
  """How to prune: importance scores, a sparsity schedule, a scope and a param filter.

  Attributes:
    score: ``(param, grad, key) -> scores`` for one leaf (see :mod:`jaxprune.scores`).
    schedule: the target sparsity over steps.
    scope: ``"layer"`` (each param gets the target) or ``"global"`` (one threshold over
      all pruned params).
    where: which params are pruned: ``None`` (float arrays with ``ndim >= 2``: weight
      matrices and conv kernels, never biases, 2-D ones included, or norm scales),
      regexes searched in the param path, or a ``(path, leaf) -> bool`` predicate.
    overrides: ``{regex: sparsity or Schedule}`` per-layer targets, pruned layer-wise.
      A float follows the main schedule's progress and update steps: it is reached when
      the main schedule reaches its final value (with a main schedule that ends at 0,
      from its first update step on). A :class:`Schedule` is followed as it is, on its
      own update steps. The first matching regex wins (see :meth:`schedule_of`).
    dense_first: keep the first pruned param (in natural path order) dense.
    dense_last: keep the last one dense (e.g. the classifier head).
    structure: which weights go together (see :mod:`jaxprune.structures`):
      ``"unstructured"``, ``"neurons"``, ``"filters"``, ``"channels"``,
      ``jaxprune.blocks((r, c))`` or ``jaxprune.n_m(n, m)``. Group structures score a
      group by the norm of its weights' scores and count sparsity in groups.
    needs_grads: the score uses gradients.
    seed: seeds the PRNG keys of random scores (folded with the step and the leaf).
    distribution: a :class:`jaxprune.sparse.Distribution` (``uniform``, ``erk``) that
      spreads the schedule's sparsity over the pruned layers: each layer follows the
      schedule scaled to its own final value (as a float override would), resolved from
      the params' shapes when masks are computed (:meth:`resolve`). Layer scope only.
  """

  score: ScoreFn
  schedule: Schedule
  scope: Scope = "layer"
  where: tree_lib.Where = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dense_first: bool = False
  dense_last: bool = False
  structure: structures_lib.Structure = dataclasses.field(
    default_factory=structures_lib.Unstructured
  )  # a name ("filters", ...) is accepted too and turned into its Structure
  needs_grads: bool = False
  seed: int = 0
  distribution: Distribution | None = None

  def __post_init__(self):
    if self.scope not in ("layer", "global"):
      raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}.")
    if not isinstance(self.schedule, Schedule):
      raise TypeError(f"schedule must be a jaxprune.Schedule, got {self.schedule!r}.")
    if not callable(self.score):
      raise TypeError(f"score must be a (param, grad, key) -> scores function, got {self.score!r}.")
    tree_lib.as_predicate(self.where)  # a bad filter fails here, not at the first update
    if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
      raise TypeError(f"seed must be an int, got {self.seed!r} ({type(self.seed).__name__}).")
    for name in ("dense_first", "dense_last", "needs_grads"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
    if not isinstance(self.overrides, Mapping):
      raise TypeError(f"overrides must be a {{regex: sparsity}} dict, got {self.overrides!r}.")
    structure = structures_lib.as_structure(self.structure)
    object.__setattr__(self, "structure", structure)
    if not structure.poolable and (self.scope != "layer" or self.overrides):
      raise ValueError(
        f"The {structure.name} structure counts within each group of a kernel: use "
        "scope='layer' and no overrides."
      )
    structure.check_target(self.schedule.final)
    if self.distribution is not None:
      if not isinstance(self.distribution, Distribution):
        raise TypeError(f"distribution must be a Distribution, got {self.distribution!r}.")
      if self.scope != "layer" or not structure.poolable:
        raise ValueError(
          f"A {self.distribution.kind} distribution sets a sparsity per layer: use "
          "scope='layer' and an unstructured or group structure (not N:M)."
        )
    main_final = self.schedule.final
    for pattern, value in self.overrides.items():
      if not isinstance(pattern, str):
        raise TypeError(f"override keys are regexes over param paths, got {pattern!r}.")
      tree_lib.as_predicate(pattern)
      if isinstance(value, Schedule):
        continue
      check_sparsity(value, f"override sparsity for {pattern!r}")
      if main_final is None or (main_final == 0 and self.schedule.levels is None):
        raise ValueError(
          f"The override {pattern!r}: {value} is a float, which follows the main "
          "schedule's progress (reached when the main schedule reaches its final "
          f"sparsity), but the main schedule's final sparsity is {main_final} and its "
          "steps are not known. Give the "
          f"override its own schedule, e.g. {{{pattern!r}: jaxprune.constant({value})}}."
        )

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

  def resolve(self, params: Any) -> Pruner:
    """This pruner with its distribution turned into per-layer float overrides.

    The overrides given by the user come first (the first matching regex wins); every
    other pruned layer gets its exact path with the distribution's sparsity for it. A
    pruner without a distribution is returned as it is.

    Examples:
      >>> import jax.numpy as jnp, jaxprune
      >>> from jaxprune.sparse import erk
      >>> params = {"a": jnp.ones((2, 2)), "b": jnp.ones((100, 100))}
      >>> dict(jaxprune.magnitude(erk(0.5)).resolve(params).overrides)["^a$"]
      0.0
    """
    if self.distribution is None:
      return self
    paths = self.paths(params)
    by_path = dict(tree_lib.leaves_with_paths(params))
    own = [p for p in paths if not any(tree_lib.matches(o, p) for o in self.overrides)]
    if not own:
      return dataclasses.replace(self, distribution=None)
    shapes = {p: tuple(jnp.shape(by_path[p])) for p in own}
    per_layer = self.distribution.sparsities(shapes)
    overrides = dict(self.overrides)
    overrides.update({f"^{re.escape(p)}$": per_layer[p] for p in own})
    return dataclasses.replace(self, distribution=None, overrides=overrides)

  def init_masks(self, params: Any) -> Any:
    """All-kept masks for the pruned params, ``None`` for the others."""
    return masks_lib.ones_like(params, self.paths(params))

  def schedule_of(self, path: str) -> Schedule:
    """The schedule that the param at ``path`` follows.

    An override given as a :class:`Schedule` is followed as it is (its own targets and
    update steps). An override given as a float ``v`` follows the main schedule, on
    its update steps: scaled so that it reaches ``v`` when the main schedule reaches
    its final value; or, when the main schedule ends at 0 (``magnitude(0.0,
    overrides={...})``: nothing pruned but the named layers), ``v`` from the main
    schedule's first update step on (a one-shot prune there). The first matching regex
    wins.
    """
    for pattern, value in self.overrides.items():
      if tree_lib.matches(pattern, path):
        return value if isinstance(value, Schedule) else _scaled(self.schedule, float(value))
    return self.schedule

  def is_update(self, step: Any) -> jax.Array:
    """Whether masks are recomputed at ``step``: an update step of any param's schedule."""
    update = jnp.asarray(self.schedule.is_update(step))
    for value in self.overrides.values():
      if isinstance(value, Schedule):
        update = update | jnp.asarray(value.is_update(step))
    return update

  def sparsity_of(self, path: str, step: Any) -> jax.Array:
    """The target sparsity of the param at ``path`` at ``step`` (``None``: the end)."""
    self._check_resolved("sparsity_of")
    return _at(self.schedule_of(path), step)

  def _check_resolved(self, name: str) -> None:
    if self.distribution is not None:
      raise ValueError(
        f"{name}: this pruner's per-layer sparsities come from a {self.distribution.kind} "
        f"distribution and depend on the params' shapes: call pruner.resolve(params).{name}(...)."
      )

  def masks(self, params: Any, grads: Any = None, *, step: Any = None, previous: Any = None) -> Any:
    """Masks for ``params`` at ``step`` (``None``: the schedule's final sparsity).

    Args:
      params: the params pytree.
      grads: gradients with the structure of params (needed by saliency scores).
      step: the training step (a scalar integer); selects the target sparsity and
        seeds random scores.
      previous: the current masks; weights they prune keep the lowest score, so masks
        only shrink while the target sparsity grows. With ``step``, a param whose
        schedule has no update at ``step`` keeps its previous mask.

    Returns:
      A mask pytree: exactly ``round(sparsity * n)`` weights (or groups) pruned per
      param (layer scope) or over all non-overridden params together (global scope),
      with Python's ``round`` of the float64 product for the built-in schedules.
      Ties (equal scores, or equal group norms) are broken by position: the lower flat
      index of the weight (or group: filter / channel number, row-major block index) is
      kept, and in global scope the param earlier in natural path order (``layer2``
      before ``layer10``); N:M keeps the lower input index of its group.

    Raises:
      ValueError: a concrete target outside ``[0, 1)`` or NaN (a traced one, known only
        on the device, is clipped to ``[0, 1]``, and NaN keeps the previous masks); a
        concrete NaN or infinite score (a NaN weight or gradient), naming the param
        (traced scores are not checked: a NaN score ranks first, so the weight is kept);
        a concrete ``step`` outside the int32 range (it would wrap to another step).
      TypeError: ``step`` is not a scalar integer.

    Examples:
      >>> import jax.numpy as jnp, jaxprune
      >>> params = {"w": jnp.arange(1., 9.).reshape(2, 4), "b": jnp.ones(4)}
      >>> m = jaxprune.magnitude(0.75).masks(params)
      >>> m["w"].sum().item(), m["b"] is None
      (2, True)
    """
    _check_step(step)
    if self.distribution is not None:
      return self.resolve(params).masks(params, grads, step=step, previous=previous)
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
      prev_of = dict(tree_lib.leaves_with_paths(previous, is_leaf=tree_lib.is_none))
    step_value = 0 if step is None else step
    structure = self.structure
    for path in paths:
      if jnp.size(by_path[path]) == 0:
        raise ValueError(
          f"The param {path!r} has no entries (shape {jnp.shape(by_path[path])}): nothing "
          "to prune there. Leave it out with where= (regexes, or a predicate such as "
          "lambda path, x: x.ndim >= 2 and x.size > 0)."
        )
      structure.check(path, tuple(jnp.shape(by_path[path])))
    raw, ranked = _leaf_scores(
      self.score,
      structure,
      self.seed,
      [by_path[p] for p in paths],
      [grad_of.get(p) for p in paths],
      [prev_of.get(p) for p in paths],
      step_value,
    )
    for path, r, s in zip(paths, raw, ranked):
      _check_finite_scores(path, s if r is None else r)
    scores = dict(zip(paths, ranked))

    overridden = [p for p in paths if any(tree_lib.matches(o, p) for o in self.overrides)]
    pooled = [p for p in paths if p not in overridden]
    layerwise, result = paths, {}
    unit = structures_lib.unit(structure)
    if self.scope == "global" and pooled:
      total = sum(int(jnp.size(scores[p])) for p in pooled)
      _check_keeps_some(self.schedule, total, f"the {len(pooled)} pooled params", unit)
      layerwise = overridden
    for p in layerwise:
      _check_keeps_some(self.schedule_of(p), int(jnp.size(scores[p])), repr(p), unit)
    if self.scope == "global" and pooled:
      removed = _removed(self.schedule, total, step)
      result.update(zip(pooled, topk_by_count([scores[p] for p in pooled], [removed], "global")))
    if structure.poolable and layerwise:  # ranked groups: one selection for all layers
      removed = [_removed(self.schedule_of(p), int(jnp.size(scores[p])), step) for p in layerwise]
      result.update(zip(layerwise, topk_by_shape([scores[p] for p in layerwise], removed)))
    else:
      for p in layerwise:
        schedule = self.schedule_of(p)
        result[p] = structure.select(scores[p], lambda n, s=schedule: _removed(s, n, step))
    result = {p: structure.expand(result[p], tuple(jnp.shape(by_path[p]))) for p in paths}
    if step is not None:
      result = {p: self._hold(p, m, step, prev_of.get(p)) for p, m in result.items()}
    return self._to_tree(params, result)

  def _hold(self, path: str, mask: jax.Array, step: Any, previous: Any) -> jax.Array:
    """``mask``, or the previous one where this param's schedule has no valid update now."""
    schedule = self.schedule_of(path)
    valid = ~jnp.isnan(_at(schedule, step))
    if previous is not None:
      valid = valid & jnp.asarray(schedule.is_update(step))
    if select_lib.is_concrete(valid) and bool(valid):
      return mask
    fallback = jnp.ones_like(mask) if previous is None else previous
    return jnp.where(valid, mask, fallback)

  @staticmethod
  def _to_tree(params: Any, by_path: dict[str, jax.Array]) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [by_path.get(tree_lib.path_str(k)) for k, _ in flat])


def _leaf_scores_eager(score, structure, seed, params, grads, previous, step):
  """Per pruned leaf: the scores ranked (pooled into groups; ``-inf`` where ``previous``
  pruned) and the raw scores for the finite check (``None`` where they are the ranked ones:
  no second copy)."""
  base_key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.int32))
  raw, ranked = [], []
  for i, (param, grad, prev) in enumerate(zip(params, grads, previous)):
    s = score(param, grad, jax.random.fold_in(base_key, i))
    r = structure.group_scores(s)
    if prev is not None:
      r = jnp.where(structure.group_mask(prev), r.astype(select_lib.score_dtype(r.dtype)), -jnp.inf)
    raw.append(None if r is s else s)
    ranked.append(r)
  return raw, ranked


# One compiled program for all leaves' scores (cached per score function, structure,
# seed and leaf shapes): called outside jit, the ops above would each compile on their
# own, once per leaf shape, which costs more than the selection's compile on small models.
_leaf_scores_jit = jax.jit(_leaf_scores_eager, static_argnums=(0, 1, 2))


def _leaf_scores(score, structure, seed, params, grads, previous, step):
  try:
    hash((score, structure, seed))
  except TypeError:  # a custom score or structure that cannot key a compile cache
    return _leaf_scores_eager(score, structure, seed, params, grads, previous, step)
  return _leaf_scores_jit(score, structure, seed, params, grads, previous, step)


def _check_finite_scores(path: str, scores: jax.Array) -> None:
  """A concrete NaN or inf score (a NaN weight, or gradient) would rank first and keep
  the weight: an error naming the leaf. Traced scores (under ``jit``) are not checked."""
  if not select_lib.is_concrete(scores):
    return
  bad = np.argwhere(~np.isfinite(np.asarray(scores, np.float32)))
  if len(bad):
    raise ValueError(
      f"The param {path!r} has a NaN or infinite score at index {tuple(int(i) for i in bad[0])} "
      f"({len(bad)} of {np.size(scores)} entries): its weights (or gradients) are not finite, "
      "and a NaN score would rank first and keep the weight. Fix the params before pruning."
    )


def _check_step(step: Any) -> None:
  """Raises unless ``step`` is ``None`` or a scalar integer that int32 holds.

  Schedules count steps in int32: a larger concrete step (a ``uint32`` or ``int64``
  counter) would wrap around to another step's target, so it is refused.
  """
  if step is None:
    return
  if isinstance(step, bool | np.bool_) or not (
    isinstance(step, int)
    or (jnp.ndim(step) == 0 and jnp.issubdtype(jnp.result_type(step), jnp.integer))
  ):
    raise TypeError(f"step must be a scalar integer, got {step!r} (shape {jnp.shape(step)}).")
  if select_lib.is_concrete(step) and not -(2**31) <= int(step) < 2**31:
    raise ValueError(
      f"step {int(step)} is outside the int32 range that schedules count steps in "
      f"([-2**31, 2**31)); it would wrap around to another step's target."
    )


def _check_keeps_some(schedule: Schedule, n: int, what: str, unit: str) -> None:
  """:func:`select.check_keeps_some` at the schedule's final sparsity (when it has one):
  known before a run, so a run fails at its first mask, not at its end."""
  if schedule.final is not None:
    select_lib.check_keeps_some(n, schedule.final, what, unit)


def _scaled(main: Schedule, value: float) -> Schedule:
  """``main``'s progress scaled to end at ``value`` (the meaning of a float override)."""
  final = main.final
  if final is None:
    raise ValueError("A float override needs a main schedule with a final sparsity.")
  if main.levels is None or main.level is None:  # __post_init__ ensured final != 0 here
    ratio = jnp.float32(value / final)
    return Schedule(lambda step: main.sparsity(step) * ratio, main.is_update, value)
  if final == 0:  # a main schedule that prunes nothing: `value` from its first update on
    levels = [0.0] + [value] * (len(main.levels) - 1)
  else:
    levels = [value if lv == final else lv * value / final for lv in main.levels]
  return from_levels(levels, main.level, main.is_update)


def _at(schedule: Schedule, step: Any) -> jax.Array:
  if step is None:
    if schedule.final is None:
      raise ValueError("This schedule has no final sparsity: pass step=.")
    return jnp.float32(schedule.final)
  return schedule.sparsity(step)


def _removed(schedule: Schedule, size: int, step: Any) -> int | jax.Array:
  """``round(target * size)`` at ``step``: on the host from the schedule's levels when it can.

  A concrete target is checked and counted on the host in float64; a schedule with a
  few known levels counts each on the host and indexes the table on the device; any
  other traced target is counted on the device (float32, clipped, NaN removes none).
  """
  if step is None:
    if schedule.final is None:
      raise ValueError("This schedule has no final sparsity: pass step=.")
    return select_lib.n_pruned(size, schedule.final)
  if schedule.levels is not None and schedule.level is not None:
    level = schedule.level(step)
    if select_lib.is_concrete(level):  # (inside a jit trace even a constant step is traced)
      return select_lib.n_pruned(size, schedule.levels[int(level)])
    table = jnp.asarray([select_lib.n_pruned(size, v) for v in schedule.levels], jnp.int32)
    return table[level]
  target = schedule.sparsity(step)
  if select_lib.is_concrete(target):
    select_lib.check_sparsity(target, f"the schedule's sparsity at step {int(step)}")
  return select_lib.n_pruned(size, target)


def _pruner(score: ScoreFn, sparsity: Any, overrides: Mapping[str, Any] | None, **kw) -> Pruner:
  overrides = {} if overrides is None else overrides
  if isinstance(overrides, Mapping):
    overrides = dict(overrides)
  if isinstance(sparsity, Distribution):
    schedule = as_schedule(sparsity.sparsity)
    return Pruner(score=score, schedule=schedule, overrides=overrides, distribution=sparsity, **kw)
  if "structure" in kw:
    kw["structure"] = structures_lib.as_structure(kw["structure"])
  return Pruner(score=score, schedule=as_schedule(sparsity), overrides=overrides, **kw)


_COMMON_ARGS = """
    sparsity: a float in ``[0, 1)`` (pruned at the first step and kept), a
      :class:`Schedule` (``jaxprune.agp``, ``jaxprune.iterative``, ...), a
      ``step -> sparsity`` function, or a distribution of either over the layers
      (``jaxprune.sparse.erk(0.9)``, ``jaxprune.sparse.uniform(...)``).
    scope: ``"layer"`` or ``"global"``.
    where: which params are pruned (default: weight matrices and conv kernels).
    overrides: per-layer sparsities ``{regex: value}``.
    dense_first: keep the first pruned layer dense.
    dense_last: keep the last pruned layer dense.
    structure: ``"unstructured"`` (default), ``"neurons"``, ``"filters"``,
      ``"channels"``, ``jaxprune.blocks(...)`` or ``jaxprune.n_m(n, m)``."""


def magnitude(
  sparsity: float | Schedule | Callable | Distribution,
  *,
  scope: Scope = "layer",
  where: tree_lib.Where = None,
  overrides: Mapping[str, Any] | None = None,
  dense_first: bool = False,
  dense_last: bool = False,
  structure: str | structures_lib.Structure | None = None,
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
  sparsity: float | Schedule | Callable | Distribution,
  *,
  seed: int = 0,
  scope: Scope = "layer",
  where: tree_lib.Where = None,
  overrides: Mapping[str, Any] | None = None,
  dense_first: bool = False,
  dense_last: bool = False,
  structure: str | structures_lib.Structure | None = None,
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
  sparsity: float | Schedule | Callable | Distribution,
  *,
  scope: Scope = "layer",
  where: tree_lib.Where = None,
  overrides: Mapping[str, Any] | None = None,
  dense_first: bool = False,
  dense_last: bool = False,
  structure: str | structures_lib.Structure | None = None,
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
  _f.__doc__ = (_f.__doc__ or "").format(args=_COMMON_ARGS)
