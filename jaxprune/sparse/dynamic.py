"""Sparse training from the start: static random masks, SET and RigL.

Each trainer is an optax transform of the shape of :func:`jaxprune.masked`: its state is
a :class:`jaxprune.MaskedState` (inner state, masks, step), so ``jaxprune.masks_of`` and
``jaxprune.set_masks`` work on it, and ``optax.apply_updates`` alone leaves the sparse
weights. Every layer keeps exactly ``n - round(s_l * n)`` weights for the whole run: masks
with other counts put in with ``jaxprune.set_masks`` go back to those counts at the next
mask update (the missing weights grow at 0); to train with the counts of given masks, pass
the masks as the sparsity.

On a mask update step ``t`` (``0 < t < end``, ``t % every == 0``), per layer, with
``a`` active weights and drop fraction ``f_t``:

1. drop: the ``d = round(f_t * a)`` active weights with the smallest ``|w|`` leave
   (ties: the higher flat index leaves first);
2. grow: ``d`` weights join among those not kept in step 1 (so a just-dropped weight can
   come back): at random (SET, Mocanu et al. 2018) or where the dense gradient ``|g|``
   of the current batch is largest (RigL, Evci et al. 2020; ties: the lower flat index).

The weights that joined (new mask and not old mask) are exactly 0 after the step and
their optimizer moments are zeroed (every params-shaped leaf of the inner state); the
weights that left go to exactly 0. Only the masks pass through ``lax.cond``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxprune import _checks
from jaxprune import masks as masks_lib
from jaxprune import tree as tree_lib
from jaxprune._by_shape import topk_by_shape
from jaxprune._compile import eager_jit
from jaxprune.distributions import Distribution, as_distribution
from jaxprune.schedules import Schedule
from jaxprune.select import n_pruned, score_dtype
from jaxprune.transforms import MaskedState, _check_inner, _jit_when_eager, _zero_pruned


def cosine_drop(initial: float = 0.3, end: int = 1) -> Callable[[Any], jax.Array]:
  """RigL's drop-fraction schedule: ``f_t = initial / 2 * (1 + cos(pi * t / end))``.

  Examples:
    >>> from jaxprune.sparse import cosine_drop
    >>> f = cosine_drop(0.3, end=1000)
    >>> [round(float(f(t)), 4) for t in (0, 500, 1000)]
    [0.3, 0.15, 0.0]
  """
  _check_fraction(initial, "initial", "cosine_drop")
  end = _checks.integer(end, "end", "cosine_drop", low=1, what="the step where it reaches 0")

  def fraction(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, float(end))
    return (initial / 2.0 * (1.0 + jnp.cos(jnp.pi * t / end))).astype(jnp.float32)

  return fraction


def _check_fraction(value: Any, name: str, fn: str) -> None:
  """A drop fraction in ``(0, 1]``: at 0 no mask would ever move."""
  try:
    _checks.number(value, name, fn, low=0.0, high=1.0, low_open=True)
  except ValueError as e:
    raise ValueError(
      f"{e} The fraction of each layer's active weights dropped and regrown; at 0 the "
      "masks never move (static_sparse keeps them fixed)."
    ) from e


def _is_mask_tree(sparsity: Any) -> bool:
  leaves = jax.tree.leaves(sparsity)
  return bool(leaves) and all(getattr(x, "dtype", None) == jnp.bool_ for x in leaves)


def _check_not_a_mask_tree(sparsity: Any, name: str) -> None:
  """A pytree of arrays that are not bool is refused as a mask tree, by name."""
  if isinstance(sparsity, Distribution | Schedule | str) or hasattr(sparsity, "dtype"):
    return  # a distribution, a schedule, or a number / array (check_sparsity names those)
  for path, leaf in tree_lib.leaves_with_paths(sparsity):
    if hasattr(leaf, "dtype") and leaf.dtype != jnp.bool_:
      raise TypeError(
        f"{name}: the sparsity is a tree, so it is read as the initial masks, which must be "
        f"bool arrays (None for dense params); {path!r} has dtype {leaf.dtype}. Convert it "
        "with .astype(bool), or pass a float or a distribution (jaxprune.sparse.erk(0.9))."
      )


class _Layout:
  """Which params are sparse and how many weights each keeps (known from shapes alone)."""

  def __init__(self, sparsity: Any, where, dense_first: bool, dense_last: bool, name: str):
    self.name, self.where = name, where
    self.dense_first, self.dense_last = dense_first, dense_last
    self.fixed = sparsity if _is_mask_tree(sparsity) else None
    if self.fixed is None:
      if isinstance(sparsity, Schedule) or (
        isinstance(sparsity, Distribution) and isinstance(sparsity.sparsity, Schedule)
      ):
        raise TypeError(
          f"{name}: the sparsity of a sparse trainer is fixed for the whole run; pass a float "
          "or a distribution of a float (jaxprune.sparse.erk(0.9)), not a schedule."
        )
      _check_not_a_mask_tree(sparsity, name)
      self.distribution = as_distribution(sparsity)

  def initial_masks(self, params: Any, seed: int) -> Any:
    """Random masks with exactly the layer counts (or the given masks, checked)."""
    if self.fixed is not None:
      tree_lib.check_same_structure(params, self.fixed)
      return self.fixed
    paths = tree_lib.selected_paths(
      params, self.where, dense_first=self.dense_first, dense_last=self.dense_last, what=self.name
    )
    by_path = dict(tree_lib.leaves_with_paths(params))
    shapes = {p: tuple(jnp.shape(by_path[p])) for p in paths}
    sparsities = self.distribution.sparsities(shapes)
    removed = [n_pruned(math.prod(shapes[p]), sparsities[p]) for p in paths]
    # the selection is its own (cached) computation, shared with magnitude masks of
    # the same shapes
    masks = topk_by_shape(_random_scores(seed, tuple(shapes[p] for p in paths)), removed)
    chosen = dict(zip(paths, masks))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [chosen.get(tree_lib.path_str(k)) for k, _ in flat])


def regrowth_scores(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """SET's random growth scores: uniform in ``[0, 1)`` from a counter hash, no RNG loop.

  ``s = jax.random.bits(key, (), uint32)``; entry ``j`` (flat, row-major) hashes
  ``x = j * 0x9E3779B9 + s`` (mod 2**32) with the lowbias32 mix (``x ^= x >> 16;
  x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``), a bijection of
  ``uint32``, and keeps its top 23 bits as the mantissa of a float in ``[1, 2)``, minus 1
  (as ``jax.random.uniform`` maps bits). One elementwise pass that fuses: threefry over a
  layer compiles on XLA:CPU to a loop that copies two ``uint32`` arrays of the layer's size
  per draw (43 MB per SET update on a 5.36M-weight MLP).

  Examples:
    >>> import jax
    >>> from jaxprune.sparse.dynamic import regrowth_scores
    >>> s = regrowth_scores(jax.random.key(0), (100, 10))
    >>> s.shape, bool((s >= 0).all() & (s < 1).all())
    ((100, 10), True)
  """
  s = jax.random.bits(key, (), jnp.uint32)
  x = lax.iota(jnp.uint32, math.prod(shape)) * jnp.uint32(0x9E3779B9) + s
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  one = lax.bitcast_convert_type((x >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  return (one - 1.0).reshape(shape)


def _random_scores(seed: int, shapes: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
  """``uniform(fold_in(key(seed), i), shapes[i])`` for every leaf in one compiled
  computation (eager ``jax.random.uniform`` compiles a threefry program per shape)."""
  key = jax.random.key(seed)
  return [jax.random.uniform(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)]


_random_scores = eager_jit(
  _random_scores,
  static_argnums=(0, 1),
  extra_elements=lambda seed, shapes: sum(math.prod(s) for s in shapes),
)


def _kept_counts(masks: list[jax.Array], layout: _Layout) -> list[Any]:
  """Active weights per sparse leaf: from the shapes, or counted when masks were given.

  Every update keeps each layer's count, so counting the current masks gives the count
  of the given initial masks (on the device: they may be traced, e.g. when
  ``inject_hyperparams`` builds the transform inside ``jit``).
  """
  if layout.fixed is not None:
    return [jnp.sum(m, dtype=jnp.int32) for m in masks]
  paths = [str(i) for i in range(len(masks))]
  sparsities = layout.distribution.sparsities(dict(zip(paths, (m.shape for m in masks))))
  return [m.size - n_pruned(m.size, sparsities[p]) for m, p in zip(masks, paths)]


def _regrow(
  masks: list[jax.Array],
  params: list[jax.Array],
  grow_scores: list[jax.Array],
  active: list[int],
  fraction: jax.Array,
) -> list[jax.Array]:
  """New masks: drop the smallest ``|w|`` of each layer, grow the largest ``grow_scores``."""
  f = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  drops = [jnp.round(f * a).astype(jnp.int32) for a in active]
  keep_scores = [
    jnp.where(m, jnp.abs(p).astype(score_dtype(p.dtype)), -jnp.inf) for m, p in zip(masks, params)
  ]
  survivors = topk_by_shape(
    keep_scores, [m.size - (a - d) for m, a, d in zip(masks, active, drops)]
  )
  scores = [
    jnp.where(s, jnp.inf, jnp.nan_to_num(g.astype(score_dtype(g.dtype)), nan=0.0, posinf=0.0))
    for s, g in zip(survivors, grow_scores)
  ]
  return topk_by_shape(scores, [m.size - a for m, a in zip(masks, active)])


def _sparse_trainer(
  inner: optax.GradientTransformation,
  sparsity: Any,
  grow: str | None,
  *,
  end: int | None,
  drop_fraction: float | Callable,
  every: int,
  seed: int,
  where: tree_lib.Where,
  dense_first: bool,
  dense_last: bool,
  name: str,
) -> optax.GradientTransformationExtraArgs:
  _check_inner(inner)
  _checks.integer(seed, "seed", name)
  _checks.flag(dense_first, "dense_first", name)
  _checks.flag(dense_last, "dense_last", name)
  layout = _Layout(sparsity, where, dense_first, dense_last, name)
  inner_extra = optax.with_extra_args_support(inner)
  if grow is not None:
    every = _checks.integer(every, "every", name, low=1, what="steps between mask updates")
    end = _checks.integer(
      end, "end", name, low=1, what="the step from which masks stop changing; RigL: 75% of training"
    )
    if every >= end:
      raise ValueError(
        f"{name}: every ({every}) must be smaller than end ({end}): masks move at steps "
        f"every, 2 * every, ... below end, so with end <= every they never move. Lower "
        "every or raise end (RigL: every=100, end at 75% of training)."
      )
    if callable(drop_fraction):
      fraction_at = drop_fraction
    else:
      _check_fraction(drop_fraction, "drop_fraction", name)
      fraction_at = cosine_drop(float(drop_fraction), end)

  def init(params):
    return MaskedState(
      inner.init(params), layout.initial_masks(params, seed), jnp.zeros([], jnp.int32)
    )

  @_jit_when_eager  # an eager update would compile the cond of fresh closures every step
  def new_masks(ms, ps, gs, step):
    """The masks after step ``step``: regrown on an update step, else ``ms``."""
    active = _kept_counts(ms, layout)

    def refresh(ms, step):
      if grow == "random":
        key = jax.random.fold_in(jax.random.key(seed), step)
        scores = [regrowth_scores(jax.random.fold_in(key, i), m.shape) for i, m in enumerate(ms)]
      else:
        scores = [jnp.abs(g) for g in gs]
      fraction = fraction_at(step)
      if jnp.ndim(fraction) != 0:
        raise ValueError(
          f"{name}: drop_fraction(step) must return a scalar (the fraction of each layer's "
          f"active weights dropped at that step), got shape {jnp.shape(fraction)}."
        )
      return _regrow(ms, ps, scores, active, fraction)

    is_update = (step > 0) & (step < end) & (step % every == 0)
    return lax.cond(is_update, refresh, lambda ms, _: list(ms), ms, step)

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        f"jaxprune.sparse.{name} needs the params: call tx.update(grads, state, params)."
      )
    step, masks = state.count, state.masks
    inner_state, keep = state.inner_state, masks
    if grow is not None:
      flat_masks, treedef = jax.tree.flatten(masks, is_leaf=tree_lib.is_none)
      live = [i for i, m in enumerate(flat_masks) if m is not None]
      flat_params = treedef.flatten_up_to(params)
      flat_grads = treedef.flatten_up_to(updates)
      ms = [flat_masks[i] for i in live]
      ps, gs = [flat_params[i] for i in live], [flat_grads[i] for i in live]
      new = new_masks(ms, ps, gs if grow == "gradient" else [], step)
      out, kept = list(flat_masks), list(flat_masks)
      for i, m_old, m_new in zip(live, ms, new):
        out[i], kept[i] = m_new, m_old & m_new
      masks, keep = jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, kept)
      inner_state = _zero_pruned(inner, inner_state, keep)
    grads = masks_lib.apply_mask(updates, keep)
    inner_updates, inner_state = inner_extra.update(
      grads, inner_state, masks_lib.apply_mask(params, keep), **extra_args
    )
    new_updates = jax.tree.map(
      lambda m, u, p: u if m is None else jnp.where(m, u, -p.astype(u.dtype)),
      keep,
      inner_updates,
      params,
      is_leaf=tree_lib.is_none,
    )
    return new_updates, MaskedState(inner_state, masks, step + 1)

  return optax.GradientTransformationExtraArgs(init, update)


_COMMON = """
    inner: any optax ``GradientTransformation`` (``optax.adam(1e-3)``, a chain, ...).
    sparsity: the fraction of each pruned layer that is zero, fixed for the run: a
      float in ``[0, 1)``, a distribution (``jaxprune.sparse.erk(0.9)``,
      ``uniform(0.9)``), or a mask pytree (bool arrays, ``None`` for dense params): the
      initial masks, whose per-layer counts are kept.
    seed: seeds the random initial masks{seed_extra}.
    where: which params are sparse (default: weight matrices and conv kernels).
    dense_first: keep the first sparse layer (in natural path order) dense.
    dense_last: keep the last one (e.g. the classifier head) dense."""

_DYNAMIC = """
    end: the step from which masks stop changing (RigL: 75% of training).
    drop_fraction: ``f0`` of the cosine schedule ``f0 / 2 * (1 + cos(pi t / end))``
      (:func:`cosine_drop`), or any traceable ``step -> fraction`` function.
    every: steps between mask updates (``dT``)."""


def static_sparse(
  inner: optax.GradientTransformation,
  sparsity: float | Distribution | Any,
  *,
  seed: int = 0,
  where: tree_lib.Where = None,
  dense_first: bool = False,
  dense_last: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Static sparse training: a random mask at init, never changed (the baseline of SET/RigL).

  Args:{common}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`jaxprune.MaskedState` (read the masks with ``jaxprune.masks_of``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> from jaxprune.sparse import static_sparse
    >>> params = {{"w": jnp.ones((10, 10)), "b": jnp.ones(10)}}
    >>> tx = static_sparse(optax.sgd(0.1), 0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> int((optax.apply_updates(params, updates)["w"] != 0).sum())
    10
  """
  return _sparse_trainer(
    inner,
    sparsity,
    None,
    end=None,
    drop_fraction=0.0,
    every=1,
    seed=seed,
    where=where,
    dense_first=dense_first,
    dense_last=dense_last,
    name="static_sparse",
  )


def set_sparse(
  inner: optax.GradientTransformation,
  sparsity: float | Distribution | Any,
  *,
  end: int,
  drop_fraction: float | Callable = 0.3,
  every: int = 100,
  seed: int = 0,
  where: tree_lib.Where = None,
  dense_first: bool = False,
  dense_last: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018): drop the smallest ``|w|``, regrow as many at random.

  Growth at step ``t`` in layer ``i`` (the ``i``-th sparse leaf in flattening order)
  ranks ``regrowth_scores(fold_in(fold_in(key(seed), t), i), shape)`` (uniform in
  ``[0, 1)`` from a counter hash: :func:`jaxprune.sparse.dynamic.regrowth_scores`), so it
  is reproducible from ``seed``.

  Args:{common}{dynamic}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`jaxprune.MaskedState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> from jaxprune.sparse import set_sparse
    >>> params = {{"w": jnp.ones((10, 10))}}
    >>> tx = set_sparse(optax.sgd(0.1), 0.8, end=100, every=2)
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> int(jaxprune.masks_of(state)["w"].sum()), int((params["w"] != 0).sum()) <= 20
    (20, True)
  """
  return _sparse_trainer(
    inner,
    sparsity,
    "random",
    end=end,
    drop_fraction=drop_fraction,
    every=every,
    seed=seed,
    where=where,
    dense_first=dense_first,
    dense_last=dense_last,
    name="set_sparse",
  )


def rigl(
  inner: optax.GradientTransformation,
  sparsity: float | Distribution | Any,
  *,
  end: int,
  drop_fraction: float | Callable = 0.3,
  every: int = 100,
  seed: int = 0,
  where: tree_lib.Where = None,
  dense_first: bool = False,
  dense_last: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020): drop the smallest ``|w|``, regrow the largest dense ``|g|``.

  The gradient passed to ``update`` is the dense gradient of the current batch (the
  gradient of the loss with respect to every weight, zero or not), so RigL costs no
  extra pass. Grown weights start at exactly 0 with zeroed optimizer moments.

  Args:{common}{dynamic}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`jaxprune.MaskedState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune
    >>> from jaxprune.sparse import rigl, erk
    >>> params = {{"a": jnp.ones((20, 20)), "b": jnp.ones((20, 2))}}
    >>> tx = rigl(optax.adam(1e-2), erk(0.8), end=30, every=10)
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> for _ in range(21):
    ...   grads = jax.tree.map(jnp.ones_like, params)
    ...   updates, state = update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> {{k: int(m.sum()) for k, m in jaxprune.masks_of(state).items()}}
    {{'a': 57, 'b': 31}}
  """
  return _sparse_trainer(
    inner,
    sparsity,
    "gradient",
    end=end,
    drop_fraction=drop_fraction,
    every=every,
    seed=seed,
    where=where,
    dense_first=dense_first,
    dense_last=dense_last,
    name="rigl",
  )


static_sparse.__doc__ = (static_sparse.__doc__ or "").format(common=_COMMON.format(seed_extra=""))
for _f in (set_sparse, rigl):
  _extra = " and SET's growth" if _f is set_sparse else ""
  _f.__doc__ = (_f.__doc__ or "").format(common=_COMMON.format(seed_extra=_extra), dynamic=_DYNAMIC)
