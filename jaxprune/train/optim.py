"""The optimizer of a run, built from its config: pruner, sparsity and learning-rate schedules.

:func:`make_optimizer` wraps Adam or SGD in :func:`jaxprune.masked` with the pruner that
``config.prune`` describes, so the pruned weights are zero after every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

import jaxprune
from jaxprune import sparse
from jaxprune.train import structured
from jaxprune.train.config_type import Config

PRUNERS = {
  "magnitude": jaxprune.magnitude,
  "random": jaxprune.random,
  "saliency": jaxprune.saliency,
}


SPARSE_TRAINERS = ("static", "set", "rigl")  # masks from step 0, fixed sparsity (jaxprune.sparse)


def make_schedule(config: Config) -> jaxprune.Schedule:
  """The sparsity schedule of ``config.prune``.

  ``iterative`` prunes ``rounds`` times, ``every`` steps apart from ``begin``; each
  round removes the same fraction of the remaining weights, ending at ``sparsity``.
  ``lottery`` has the rounds of ``iterative`` (:func:`make_optimizer` adds the rewinding).

  Examples:
    >>> from jaxprune.train import config as config_lib, optim
    >>> config = config_lib.default_config()
    >>> config.prune.schedule, config.prune.sparsity, config.prune.rounds = "iterative", 0.75, 2
    >>> s = optim.make_schedule(config)
    >>> [round(float(s.sparsity(t)), 3) for t in (999, 1000, 1100)]
    [0.0, 0.5, 0.75]
  """
  p = config.prune
  if p.method in SPARSE_TRAINERS:
    return jaxprune.constant(p.sparsity)
  if p.schedule == "acdc":
    return sparse.acdc(p.sparsity, warmup=p.begin, phase=p.every, end=p.end)
  if p.schedule == "agp":
    return jaxprune.agp(p.sparsity, p.begin, p.end, p.every)
  if p.schedule == "one_shot":
    return jaxprune.one_shot(p.sparsity, at=p.begin)
  if p.schedule == "constant":
    return jaxprune.constant(p.sparsity)
  rounds = [
    (p.begin + i * p.every, 1 - (1 - p.sparsity) ** ((i + 1) / p.rounds))
    for i in range(p.rounds - 1)
  ]
  return jaxprune.iterative([*rounds, (p.begin + (p.rounds - 1) * p.every, p.sparsity)])


def make_pruner(config: Config) -> jaxprune.Pruner | None:
  """The pruner that ``config.prune`` describes.

  ``None`` for ``method="none"``, for the channel methods of
  :mod:`jaxprune.train.structured`, which set fixed masks at ``prune.begin`` instead,
  and for ``autopruner`` (:mod:`jaxprune.train.autopruner`, its own runner).

  Examples:
    >>> from jaxprune.train import config as config_lib, optim
    >>> config = config_lib.default_config()
    >>> config.prune.overrides = {"fc3": 0.5}
    >>> pruner = optim.make_pruner(config)
    >>> pruner.scope, dict(pruner.overrides), pruner.schedule.final
    ('layer', {'fc3': 0.5}, 0.9)
  """
  p = config.prune
  if p.method in SPARSE_TRAINERS:  # the trainer's target, paths and initial random masks
    return _sparse_pruner(config)
  if p.method not in PRUNERS:  # none, a channel method, autopruner: no pruner in the optimizer
    return None
  schedule = make_schedule(config)
  return PRUNERS[p.method](
    schedule if p.distribution == "uniform" else sparse.erk(schedule),
    scope=p.scope,
    overrides=dict(p.overrides),
    dense_first=p.dense_first,
    dense_last=p.dense_last,
    structure=p.structure,
    **({"seed": config.train.seed} if p.method == "random" else {}),
  )


def _sparse_pruner(config: Config) -> jaxprune.Pruner:
  """A random pruner at the constant target: what a sparse trainer prunes, for reports."""
  p = config.prune
  return jaxprune.random(
    _distribution(config),
    seed=config.train.seed,
    dense_first=p.dense_first,
    dense_last=p.dense_last,
  )


def _distribution(config: Config) -> sparse.Distribution:
  p = config.prune
  return sparse.erk(p.sparsity) if p.distribution == "erk" else sparse.uniform(p.sparsity)


def make_sparse_trainer(
  config: Config, inner: optax.GradientTransformation
) -> optax.GradientTransformation:
  """``static`` | ``set`` | ``rigl`` (:mod:`jaxprune.sparse`) around ``inner``, from ``config.prune``.

  The sparsity (``prune.sparsity`` spread by ``prune.distribution``) holds from step 0;
  SET and RigL update masks every ``prune.every`` steps until ``prune.end`` with a
  cosine drop fraction starting at ``prune.drop_fraction``; the masks are seeded by
  ``train.seed``.

  Examples:
    >>> import optax
    >>> from jaxprune.train import config as config_lib, optim
    >>> config = config_lib.default_config()
    >>> config.prune.update(method="rigl", distribution="erk", every=100, end=2250)
    >>> tx = optim.make_sparse_trainer(config, optax.adam(1e-3))
  """
  p = config.prune
  common = dict(seed=config.train.seed, dense_first=p.dense_first, dense_last=p.dense_last)
  if p.method == "static":
    return sparse.static_sparse(inner, _distribution(config), **common)
  trainer = sparse.set_sparse if p.method == "set" else sparse.rigl
  return trainer(
    inner,
    _distribution(config),
    end=p.end,
    every=p.every,
    drop_fraction=float(p.drop_fraction),
    **common,
  )


def _never(step):
  return jnp.zeros(jnp.shape(step), bool)


def frozen(pruner: jaxprune.Pruner) -> jaxprune.Pruner:
  """The pruner with masks that never change: keeps the masks set in the optimizer state.

  For the "rethinking" run (Liu et al. 2019): put the final masks of a pruned run into
  a fresh :class:`jaxprune.MaskedState` and train re-initialised weights with them.

  Examples:
    >>> import jaxprune
    >>> from jaxprune.train import optim
    >>> bool(optim.frozen(jaxprune.magnitude(0.5)).is_update(0))
    False
  """
  final = pruner.schedule.final
  schedule = jaxprune.Schedule(lambda step: jnp.float32(final), _never, final)
  return dataclasses.replace(pruner, schedule=schedule)


def make_learning_rate(config: Config, steps: int) -> optax.Schedule:
  """``step -> learning rate``: ``train.lr_schedule`` over ``steps`` after ``warmup_steps``.

  Examples:
    >>> from jaxprune.train import config as config_lib, optim
    >>> config = config_lib.default_config()
    >>> config.train.update(lr_schedule="cosine", warmup_steps=10, learning_rate=0.1)
    >>> lr = optim.make_learning_rate(config, 110)
    >>> [round(float(lr(t)), 3) for t in (0, 5, 10, 60, 110)]
    [0.0, 0.05, 0.1, 0.05, 0.0]
  """
  t = config.train
  if t.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(steps, t.warmup_steps + 1)
    )
  if t.warmup_steps:
    return optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
  return optax.constant_schedule(t.learning_rate)


def make_regularizer(
  config: Config, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation | None:
  """The proximal step of ``config.regularize`` (``None`` for ``method="none"``).

  ``group_lasso`` (SSL) or ``l1`` (Network Slimming, default: the BatchNorm scales),
  with ``strength`` until ``prune.begin`` for the channel methods (they prune there and
  fine-tune without it) and for the whole run otherwise. With SGD the prox step is the
  learning rate of the step (exact proximal gradient descent); with Adam it is 1 and
  ``strength`` is the shrinkage per step (see :mod:`jaxprune.regularizers`).

  Examples:
    >>> from jaxprune.train import config as config_lib, optim
    >>> config = config_lib.default_config()
    >>> config.regularize.update(method="l1", strength=1e-4)
    >>> optim.make_regularizer(config, optim.make_learning_rate(config, 10)) is not None
    True
  """
  r = config.regularize
  if r.method == "none":
    return None
  until = config.prune.begin if structured.is_channel_method(config) else None

  def strength(step):
    on = jnp.ones((), bool) if until is None else step < until
    return jnp.where(on, jnp.float32(r.strength), 0.0)

  step_size = learning_rate if config.train.optimizer == "sgd" else 1.0
  where = r.where or None
  if r.method == "group_lasso":
    factory = optax.inject_hyperparams(jaxprune.group_lasso, static_args=("groups", "where"))
    return factory(strength=strength, groups=tuple(r.groups), where=where, learning_rate=step_size)
  factory = optax.inject_hyperparams(jaxprune.l1, static_args=("where",))
  return factory(strength=strength, learning_rate=step_size, **({"where": where} if where else {}))


def make_optimizer(
  config: Config,
  pruner: jaxprune.Pruner | None,
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  masks: Any = None,
) -> optax.GradientTransformation:
  """Adam, or SGD with Nesterov momentum 0.9, inside :func:`jaxprune.masked` when pruning.

  Args:
    config: the run's config (``train.optimizer``, ``train.learning_rate``,
      ``regularize``).
    pruner: from :func:`make_pruner`; ``None`` trains dense (or with fixed ``masks``).
    learning_rate: a schedule (default: :func:`make_learning_rate` over
      ``train.steps``).
    masks: fixed masks over every param (the channel methods start from all-``True``
      masks and set theirs into the optimizer state at ``prune.begin``).
  """
  if learning_rate is None:
    learning_rate = make_learning_rate(config, config.train.steps)
  if config.train.optimizer == "sgd":
    inner = optax.sgd(learning_rate, momentum=0.9, nesterov=True)
  else:
    inner = optax.adam(learning_rate)
  regularizer = make_regularizer(config, learning_rate)
  if regularizer is not None:
    inner = optax.chain(inner, regularizer)
  if (
    config.prune.method in SPARSE_TRAINERS
    and pruner is not None
    and pruner.schedule.is_update is not _never  # a frozen pruner keeps the masks it is given
  ):
    return make_sparse_trainer(config, inner)
  if (
    config.prune.schedule == "lottery"
    and pruner is not None
    and pruner.schedule.is_update is not _never  # the random re-init keeps the final masks
  ):
    return sparse.lottery(inner, pruner, rewind=config.prune.rewind)
  if pruner is not None:
    return jaxprune.masked(inner, pruner)
  return inner if masks is None else jaxprune.masked(inner, masks)
