"""Proximal sparsity regularizers as optax transforms: group lasso (SSL) and L1 (slimming).

Both are the proximal step of proximal gradient descent: chained *after* an optimizer,
they map the optimizer's proposed params ``z = params + updates`` to ``prox(z)`` and
return ``prox(z) - params`` as the updates, so ``optax.apply_updates`` lands on
``prox(z)``. Unlike a penalty added to the loss (whose subgradient only makes weights
oscillate around zero), the prox sets groups / weights to *exactly* zero.

Step size. The prox of ``t * strength * R`` thresholds by ``t * strength``, where ``t``
is the step the optimizer just took: the ``learning_rate`` argument (default ``1.0``).

* With ``optax.sgd(lr)`` pass ``learning_rate=lr``: the chain is then exactly proximal
  gradient descent on ``loss + strength * R(params)``.
* With Adam (or any preconditioned optimizer) there is no single step size: keep
  ``learning_rate=1.0`` and read ``strength`` as the shrinkage of a group's norm per
  step. Adam moves a weight by up to about ``lr`` per step whatever the scale of its
  gradient, and a group stays at zero while the norm of Adam's step on it is below
  ``strength``, so set ``strength`` against ``lr`` (in the tests, ``strength = 0.6 *
  lr`` zeroes the irrelevant rows of a minibatch regression, and shrinks the relevant
  ones more than proximal SGD does). With full-batch gradients Adam's steps stay near
  ``lr`` even for tiny gradients; prefer SGD there.
* For a scheduled ``strength`` or ``learning_rate``, wrap the factory:
  ``optax.inject_hyperparams(group_lasso)(strength=schedule)`` (add
  ``static_args="where"`` when ``where`` is a predicate).

Group kinds (Wen et al. 2016) follow Flax's kernel layout: the last axis is the output
features, the second-to-last the input features, leading axes are spatial (a Dense
kernel is ``(in, out)``, a conv kernel ``(kh, kw, in, out)``, a 1-D conv ``(k, in, out)``):

* ``"filter"``: one output channel / neuron, ``w[..., j]`` (``out`` groups).
* ``"channel"``: one input channel / feature, ``w[..., i, :]`` (``in`` groups; a row of a
  Dense kernel).
* ``"shape"``: one filter-shape position across all filters, ``w[kh, kw, i, :]``
  (``kh * kw * in`` groups). For a Dense kernel this is a row, the same as ``"channel"``.
* ``"depth"``: the whole param (one group: the layer), for any rank.

The axes are read from the shape alone, as for the pruners' structures (see
:mod:`jaxprune.structures`): a grouped conv's ``"channel"`` ``i`` is input ``i`` of
every group, a ``transpose_kernel=True`` ConvTranspose has ``(kh, kw, out, in)``, and a
``(in, heads, head_dim)`` kernel's ``"filter"`` is one ``head_dim`` index of all heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _checks
from jaxprune import table as table_lib
from jaxprune import tree as tree_lib

GROUP_KINDS = ("filter", "channel", "shape", "depth")
BATCHNORM_SCALES = r"(?i)(^|/)(bn|batch_?norm)[^/]*/scale$"
"""Default ``where`` of :func:`l1`: the ``scale`` of layers named ``bn*``, ``BatchNorm*``,
``batchnorm*`` or ``batch_norm*`` (any case), e.g. ``BatchNorm_0/scale``, ``bn1/scale``."""

_MIN_NDIM = {"filter": 2, "channel": 2, "shape": 2, "depth": 0}


def _check_groups(groups: str | Iterable[str]) -> tuple[str, ...]:
  if not isinstance(groups, str | Iterable):
    raise TypeError(
      f"groups must be a group kind or a sequence of kinds of {GROUP_KINDS}, got "
      f"{groups!r} ({type(groups).__name__})."
    )
  kinds = (groups,) if isinstance(groups, str) else tuple(groups)
  if not kinds:
    raise ValueError(f"groups must name at least one group kind of {GROUP_KINDS}.")
  for kind in kinds:
    if kind not in GROUP_KINDS:
      raise ValueError(f"Unknown group kind {kind!r}; valid kinds are {GROUP_KINDS}.")
  if len(set(kinds)) != len(kinds):
    raise ValueError(f"groups lists a kind twice: {kinds}.")
  return kinds


def _check_rank(path: str, shape: tuple[int, ...], kind: str) -> None:
  if len(shape) < _MIN_NDIM[kind]:
    raise ValueError(
      f"Group kind {kind!r} needs a kernel with ndim >= {_MIN_NDIM[kind]} (Dense "
      f"(in, out) or conv (..., in, out)), but param {path!r} has shape {tuple(shape)}. "
      "Narrow `where=` so it does not select it, or use groups=('depth',)."
    )


def _check_nonnegative(name: str, value: Any, factory: str, *, hyperparam: bool = True) -> None:
  """Raises unless ``value`` is a finite scalar ``>= 0`` (a traced one is not checked)."""
  if callable(value):
    hint = (
      f"; for a schedule wrap the factory: optax.inject_hyperparams({factory})({name}=schedule)"
      if hyperparam
      else ""
    )
    raise TypeError(f"{factory}() takes a number for {name}, got a function{hint}.")
  _checks.number(value, name, f"{factory}()", low=0.0)


def _group_axes(kind: str, ndim: int) -> tuple[int, ...]:
  if kind == "filter":
    return tuple(range(ndim - 1))
  if kind == "channel":
    return tuple(a for a in range(ndim) if a != ndim - 2)
  if kind == "shape":
    return (ndim - 1,)
  return tuple(range(ndim))


def group_norms(w: jax.Array, kind: str, *, keepdims: bool = False) -> jax.Array:
  """L2 norm of every group of ``kind`` in one kernel (accumulated in at least float32).

  Args:
    w: a kernel in Flax layout (``(..., in, out)``).
    kind: ``"filter"`` (shape ``(out,)``), ``"channel"`` (``(in,)``), ``"shape"``
      (``w.shape[:-1]``) or ``"depth"`` (``()``).
    keepdims: keep the reduced axes with size 1, to broadcast against ``w``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.regularizers import group_norms
    >>> w = jnp.array([[3., 0.], [4., 1.]])  # Dense (in=2, out=2)
    >>> group_norms(w, "filter").tolist(), group_norms(w, "channel").tolist()
    ([5.0, 1.0], [3.0, 4.123105525970459])
  """
  _check_groups(kind)
  _check_rank("w", jnp.shape(w), kind)
  acc = jnp.promote_types(jnp.result_type(w), jnp.float32)
  sq = jnp.square(jnp.asarray(w, acc))
  return jnp.sqrt(jnp.sum(sq, axis=_group_axes(kind, jnp.ndim(w)), keepdims=keepdims))


def block_soft_threshold(w: jax.Array, threshold: Any, kind: str) -> jax.Array:
  """The prox of ``threshold * sum_g ||w_g||_2``: ``w_g * max(0, 1 - threshold / ||w_g||_2)``.

  Groups with ``||w_g||_2 <= threshold`` become exactly ``0.0``; the others keep their
  direction and their norm shrinks by ``threshold``. A group holding a NaN becomes NaN
  (its norm is NaN): a diverged weight is not hidden as a pruned group.

  Args:
    w: a kernel in Flax layout (``(..., in, out)``).
    threshold: ``>= 0`` (a number or a scalar array, may be traced).
    kind: ``"filter"``, ``"channel"``, ``"shape"`` or ``"depth"``.

  Returns:
    An array like ``w``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.regularizers import block_soft_threshold
    >>> w = jnp.array([[3., 0.3], [4., 0.4]])  # filters [3, 4] (norm 5), [.3, .4] (norm .5)
    >>> block_soft_threshold(w, 2.5, "filter").tolist()
    [[1.5, 0.0], [2.0, 0.0]]
  """
  _check_nonnegative("threshold", threshold, "block_soft_threshold", hyperparam=False)
  norm = group_norms(w, kind, keepdims=True)
  keep = ~(norm <= threshold)  # a NaN group stays NaN (not zeroed: a divergence shows)
  factor = jnp.where(keep, 1 - threshold / jnp.where(keep, norm, 1), 0).astype(w.dtype)
  return jnp.where(keep, w * factor, jnp.zeros((), w.dtype))


def soft_threshold(w: jax.Array, threshold: Any) -> jax.Array:
  """The prox of ``threshold * ||w||_1``: ``sign(w) * max(|w| - threshold, 0)``.

  Entries with ``|w| <= threshold`` become exactly ``0.0`` (never ``-0.0``); NaN stays NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.regularizers import soft_threshold
    >>> soft_threshold(jnp.array([-2., -0.5, 0.25, 1.5]), 0.5).tolist()
    [-1.5, 0.0, 0.0, 1.0]
  """
  _check_nonnegative("threshold", threshold, "soft_threshold", hyperparam=False)
  threshold = jnp.asarray(threshold, w.dtype)
  # `<=`, so a NaN entry stays NaN (not zeroed: a divergence shows)
  return jnp.where(jnp.abs(w) <= threshold, jnp.zeros((), w.dtype), w - jnp.sign(w) * threshold)


def _selected(params: Any, where: tree_lib.Where, kinds: Sequence[str], factory: str) -> set[str]:
  """The paths ``where`` selects, checked: float, a supported rank, at least one."""
  paths = tree_lib.selected_paths(params, where, what=f"{factory}()")
  shapes = dict(tree_lib.leaves_with_paths(params))
  for path in paths:
    for kind in kinds:
      _check_rank(path, jnp.shape(shapes[path]), kind)
  return set(paths)


def _proximal(
  prox: Callable[[jax.Array], jax.Array],
  where: tree_lib.Where,
  kinds: Sequence[str],
  factory: str,
) -> optax.GradientTransformationExtraArgs:
  """An optax transform that returns ``prox(params + updates) - params`` on selected leaves."""
  tree_lib.as_predicate(where)  # a malformed `where` fails here, not at init

  def init(params):
    _selected(params, where, kinds, factory)
    return optax.EmptyState()

  def update(updates, state, params=None, **extra_args):
    del extra_args  # optax's `value=`, ...: accepted (nnx.Optimizer passes them), not used
    if params is None:
      raise ValueError(
        f"{factory}() needs the params: call tx.update(grads, state, params) "
        "(it is a proximal step on params + updates)."
      )
    paths = _selected(params, where, kinds, factory)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat_updates = treedef.flatten_up_to(updates)
    out = []
    for (key, p), u in zip(flat, flat_updates):
      if tree_lib.path_str(key) in paths:
        dtype = jnp.result_type(u)
        z = prox(p + u)
        u = jnp.where(z == 0, -p, z - p).astype(dtype)
      out.append(u)
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init, update)


def group_lasso(
  strength: float | jax.Array,
  groups: str | Sequence[str] = ("filter",),
  where: tree_lib.Where = None,
  learning_rate: float | jax.Array = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Structured sparsity learning (SSL, Wen et al. 2016): a proximal group-lasso step.

  Regularizes ``strength * sum_g ||w_g||_2`` over the chosen groups of every selected
  kernel by block soft-thresholding the optimizer's proposed params ``z = params +
  updates``: ``w_g <- z_g * max(0, 1 - t * strength / ||z_g||_2)`` with ``t =
  learning_rate``, so groups whose norm is at most ``t * strength`` become exactly zero.
  Chain it *last*, after the optimizer (it needs the learning rate already applied).
  With several kinds, the prox of each is applied in turn, in the order given (the
  usual approximation of the prox of the sum of overlapping group penalties; a group
  zeroed by one kind stays zero). See the module docstring for the group kinds and how
  to choose ``strength`` with Adam.

  Args:
    strength: ``lambda >= 0``, the penalty weight (threshold per step when
      ``learning_rate=1``).
    groups: one kind or a sequence of kinds of ``("filter", "channel", "shape",
      "depth")``.
    where: which params: ``None`` (float arrays with ``ndim >= 2``: Dense and conv
      kernels), regexes searched in the param path, or a ``(path, leaf) -> bool``
      predicate.
    learning_rate: the step size ``t`` of the prox (the SGD learning rate; ``1.0``
      makes ``strength`` the shrinkage per step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an ``optax.EmptyState``;
    ``update`` needs ``params`` and ignores optax's extra arguments (``value=``, ...).
    Count the zero groups with :func:`zero_groups`.

  Raises:
    TypeError: at construction, for a ``strength`` or ``learning_rate`` that is not a
      number (a schedule: see above), ``groups`` that is not a kind or a sequence of
      kinds, or a malformed ``where``.
    ValueError: at construction, for a negative, non-finite or non-scalar ``strength``
      or ``learning_rate``, an unknown group kind or an invalid ``where`` regex; at
      ``init``, for a param whose rank does not have the requested kind (naming its
      path and shape), or a ``where`` that selects nothing.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxprune.regularizers import group_lasso
    >>> params = {"kernel": jnp.array([[3., 0.3], [4., 0.4]])}  # Dense (in=2, out=2)
    >>> tx = optax.chain(optax.sgd(0.1), group_lasso(2.5, groups="filter"))
    >>> grads = {"kernel": jnp.zeros((2, 2))}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["kernel"].tolist()
    [[1.5, 0.0], [2.0, 0.0]]
    >>> tx = optax.chain(optax.adam(1e-3), group_lasso(1e-2, groups=("filter", "channel")))
    >>> tx = optax.inject_hyperparams(group_lasso)(optax.linear_schedule(0., 1e-2, 1000))
  """
  _check_nonnegative("strength", strength, "group_lasso")
  _check_nonnegative("learning_rate", learning_rate, "group_lasso")
  kinds = _check_groups(groups)
  threshold = strength * learning_rate

  def prox(w):
    for kind in kinds:
      w = block_soft_threshold(w, threshold, kind)
    return w

  return _proximal(prox, where, kinds, "group_lasso")


def l1(
  strength: float | jax.Array,
  where: tree_lib.Where = BATCHNORM_SCALES,
  learning_rate: float | jax.Array = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Proximal L1 (soft-thresholding), e.g. on BatchNorm scales for Network Slimming.

  Regularizes ``strength * sum |w|`` over the selected params by soft-thresholding the
  optimizer's proposed params ``z = params + updates``: ``w <- sign(z) * max(|z| - t *
  strength, 0)`` with ``t = learning_rate``, so weights reach exactly zero. Chain it
  *last*, after the optimizer. Network Slimming (Liu et al. 2017) puts it on the
  BatchNorm scales (gamma), then prunes the channels with the smallest ``|gamma|``.

  The default ``where`` is :data:`BATCHNORM_SCALES`, BatchNorm scales found by path
  (``BatchNorm_0/scale`` in Linen, ``bn1/scale`` in NNX). LayerNorm / RMSNorm scales are
  not matched. When no param matches, ``init`` raises an error listing the paths: pass a
  ``where=`` that matches your layer names (e.g. ``r"norm\\d*/scale$"``). ``where=None``
  selects the kernels (unstructured L1 on all weights).

  Args:
    strength: ``lambda >= 0``, the penalty weight (threshold per step when
      ``learning_rate=1``).
    where: which params (regexes over paths, a predicate, or ``None`` for kernels).
    learning_rate: the step size ``t`` of the prox (the SGD learning rate; ``1.0``
      makes ``strength`` the shrinkage per step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an ``optax.EmptyState``;
    ``update`` needs ``params`` and ignores optax's extra arguments (``value=``, ...).

  Raises:
    TypeError, ValueError: at construction for a bad ``strength``, ``learning_rate``
      or ``where``, at ``init`` for a ``where`` that selects nothing (as
      :func:`group_lasso`).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxprune.regularizers import l1
    >>> params = {"BatchNorm_0": {"scale": jnp.array([1., 0.25]), "bias": jnp.ones(2)}}
    >>> tx = optax.chain(optax.sgd(0.1), l1(0.5))
    >>> grads = {"BatchNorm_0": {"scale": jnp.zeros(2), "bias": jnp.zeros(2)}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["BatchNorm_0"]["scale"].tolist()
    [0.5, 0.0]
  """
  _check_nonnegative("strength", strength, "l1")
  _check_nonnegative("learning_rate", learning_rate, "l1")
  threshold = strength * learning_rate
  return _proximal(lambda w: soft_threshold(w, threshold), where, (), "l1")


@dataclasses.dataclass(frozen=True)
class GroupCount:
  """How many groups of one kind a param (or all params: ``path="total"``) has, and are zero."""

  path: str
  shape: tuple[int, ...]
  kind: str
  groups: int
  zero: int

  @property
  def fraction(self) -> float:
    return self.zero / self.groups if self.groups else 0.0


@dataclasses.dataclass(frozen=True)
class GroupReport:
  """Exactly-zero groups per param and kind; ``str()`` gives a table with totals per kind."""

  rows: tuple[GroupCount, ...]

  @property
  def kinds(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.kind for r in self.rows))

  def __getitem__(self, key: tuple[str, str]) -> GroupCount:
    """``report[path, kind]``."""
    for r in self.rows:
      if (r.path, r.kind) == tuple(key):
        return r
    raise KeyError(f"No {key!r} in this report; params: {sorted({r.path for r in self.rows})}")

  def total(self, kind: str) -> GroupCount:
    """Groups of ``kind`` summed over all params."""
    rows = [r for r in self.rows if r.kind == kind]
    if not rows:
      raise KeyError(f"No group kind {kind!r} in this report; kinds: {self.kinds}.")
    return GroupCount("total", (), kind, sum(r.groups for r in rows), sum(r.zero for r in rows))

  def as_dict(self) -> dict[str, dict[str, int]]:
    """``{path: {kind: zero groups}}`` plus ``"total"``."""
    out: dict[str, dict[str, int]] = {}
    for r in self.rows:
      out.setdefault(r.path, {})[r.kind] = r.zero
    out["total"] = {k: self.total(k).zero for k in self.kinds}
    return out

  def table(self) -> str:
    header = ("param", "shape", "kind", "groups", "zero", "zero %")

    def cells(r: GroupCount, first: bool) -> tuple[str, ...]:
      param = (r.path, "x".join(map(str, r.shape))) if first else ("", "")
      return (*param, r.kind, f"{r.groups:,}", f"{r.zero:,}", f"{r.fraction:.2%}")

    body = [cells(r, i == 0 or self.rows[i - 1].path != r.path) for i, r in enumerate(self.rows)]
    totals = [cells(self.total(k), i == 0) for i, k in enumerate(self.kinds)]
    return table_lib.text_table(header, body, totals, left=3)

  def __str__(self) -> str:
    return self.table()


def zero_groups(
  params: Any,
  groups: str | Sequence[str] = GROUP_KINDS,
  where: tree_lib.Where = None,
) -> GroupReport:
  """Counts the groups of each kind that are exactly zero, per param and in total.

  Args:
    params: a pytree of arrays (a Linen param dict, an ``nnx.State``, ...).
    groups: the kinds to count (see :func:`group_lasso`).
    where: which params (default: kernels, float arrays with ``ndim >= 2``).

  Returns:
    A :class:`GroupReport`: ``print`` it for a table, or read ``report[path, kind].zero``,
    ``report.total(kind)``, ``report.as_dict()``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.regularizers import zero_groups
    >>> w = jnp.array([[1., 0., 2.], [0., 0., 0.]])  # Dense (in=2, out=3)
    >>> report = zero_groups({"Dense_0": {"kernel": w}}, groups=("filter", "channel"))
    >>> report["Dense_0/kernel", "filter"].zero, report.total("channel").zero
    (1, 1)
  """
  kinds = _check_groups(groups)
  paths = _selected(params, where, kinds, "zero_groups")
  rows = []
  for path, leaf in tree_lib.leaves_with_paths(params):
    if path not in paths:
      continue
    x = np.asarray(jax.device_get(leaf))
    for kind in kinds:
      zero = np.all(x == 0, axis=_group_axes(kind, x.ndim))
      rows.append(GroupCount(path, tuple(x.shape), kind, int(np.size(zero)), int(np.sum(zero))))
  return GroupReport(tuple(rows))
