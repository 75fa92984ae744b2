"""Sparsity schedules: ``step -> target sparsity`` and ``step -> is this an update step``.

A :class:`Schedule` is two pure functions of the (traced) step, so it jits and the
target can change every step without recompiling. ``final`` is the sparsity reached at
the end; per-layer overrides use it to follow the same progress to their own target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxprune.select import check_sparsity, is_concrete


class Schedule(NamedTuple):
  """``sparsity(step)``, ``is_update(step)`` and the final sparsity.

  Attributes:
    sparsity: ``step -> float32`` target sparsity at that step.
    is_update: ``step -> bool``: whether masks are recomputed at that step.
    final: the target at the end of the schedule (``None`` when unknown).
    levels: the values the target takes, as Python floats, when there are few of them
      (``None`` for an arbitrary function). Pruners count the weights to remove from
      these on the host, ``round(level * n)`` in float64, so a count does not depend on
      a float32 product computed on the device.
    level: ``step -> int32`` index into ``levels`` of the target at that step.
  """

  sparsity: Callable[[Any], Any]
  is_update: Callable[[Any], Any]
  final: float | None
  levels: tuple[float, ...] | None = None
  level: Callable[[Any], Any] | None = None


_MAX_LEVELS = 4096  # beyond this many distinct targets, counts are computed on the device


def _int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
    raise TypeError(f"{name} must be an integer step, got {value!r}.")
  if int(value) != value:
    raise TypeError(f"{name} must be an integer step, got {value!r}.")
  if not -(2**31) <= int(value) < 2**31:  # else an OverflowError from jax at the first step
    raise ValueError(
      f"{name} is {int(value)}, outside the int32 range that schedules count steps in "
      "([-2**31, 2**31))."
    )
  return int(value)


def _host_sparsity(value: Any, name: str, fn: str) -> None:
  """Raises unless ``value`` is a sparsity known on the host (checked by ``check_sparsity``).

  A schedule's targets are fixed when it is built; a traced value (a pruner built inside
  ``jit`` from a traced sparsity) has no value there.
  """
  if not is_concrete(value):
    raise TypeError(
      f"{fn}: {name} is a traced value (the pruner or schedule is built inside jit); "
      "targets are fixed when a schedule is built. Build the pruner outside jit, or for "
      "a traced target use jaxprune.schedule(lambda step: target) (counted on the "
      "device) or jaxprune.topk_mask(scores, target)."
    )
  check_sparsity(value, name if fn == "one_shot" else f"{fn}: {name}")


def from_levels(levels: Sequence[float], level: Callable, is_update: Callable) -> Schedule:
  """A schedule whose target at ``step`` is ``levels[level(step)]`` (Python floats)."""
  table = jnp.asarray(levels, jnp.float32)
  return Schedule(
    sparsity=lambda step: table[level(step)],
    is_update=is_update,
    final=float(levels[-1]),
    levels=tuple(float(v) for v in levels),
    level=level,
  )


def one_shot(sparsity: float, at: int = 0) -> Schedule:
  """Sparsity 0 before step ``at``, ``sparsity`` from then on; masks set once, at ``at``.

  Examples:
    >>> import jaxprune
    >>> s = jaxprune.one_shot(0.8, at=100)
    >>> float(s.sparsity(99)), float(s.sparsity(100)), bool(s.is_update(100))
    (0.0, 0.800000011920929, True)
  """
  _host_sparsity(sparsity, "sparsity", "one_shot")
  at = _int(at, "at")
  if at < 0:
    raise ValueError(f"at must be >= 0, got {at}.")
  return from_levels(
    [0.0, float(sparsity)],
    level=lambda step: (jnp.asarray(step) >= at).astype(jnp.int32),
    is_update=lambda step: jnp.asarray(step) == at,
  )


def constant(sparsity: float) -> Schedule:
  """``sparsity`` from the first step on (a one-shot prune at step 0).

  Examples:
    >>> import jaxprune
    >>> float(jaxprune.constant(0.5).sparsity(7))
    0.5
  """
  return one_shot(sparsity, at=0)


def agp(final: float, begin: int, end: int, every: int, initial: float = 0.0) -> Schedule:
  """Automated gradual pruning (Zhu & Gupta 2017), the cubic schedule.

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` at the update steps
  ``t in {t0, t0 + dt, ..., t0 + n * dt}``, with ``t0 = begin``, ``dt = every`` and
  ``t0 + n * dt = end``. Between update steps the target stays at the value of the
  last update; before ``begin`` it is 0 (no pruning), from ``end`` on it is ``final``.
  ``end`` is always an update step, also when ``end - begin`` is not a multiple of
  ``every`` (the formula then reaches ``final`` exactly at ``end``), and also when
  ``begin == end`` (a one-shot prune to ``final`` there).

  Examples:
    >>> import jaxprune
    >>> s = jaxprune.agp(0.9, begin=0, end=100, every=10)
    >>> [round(float(s.sparsity(t)), 4) for t in (0, 5, 10, 50, 100, 200)]
    [0.0, 0.0, 0.2439, 0.7875, 0.9, 0.9]
  """
  _host_sparsity(final, "final", "agp")
  _host_sparsity(initial, "initial", "agp")
  begin, end, every = _int(begin, "begin"), _int(end, "end"), _int(every, "every")
  if every <= 0:
    raise ValueError(f"every must be > 0 (steps between mask updates), got {every}.")
  if begin < 0:
    raise ValueError(f"begin must be >= 0, got {begin}.")
  if end < begin:
    raise ValueError(f"end ({end}) must not come before begin ({begin}).")
  s_f, s_i = float(final), float(initial)
  if s_i > s_f:
    raise ValueError(
      f"initial ({s_i}) must not exceed final ({s_f}): masks only shrink while the target grows."
    )

  def value(t: Any) -> Any:  # the formula at update step t (floats on the host, or traced)
    progress = 1.0 if end == begin else (t - begin) / (end - begin)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3

  def is_update(step):
    step = jnp.asarray(step)
    on_grid = (step - begin) % every == 0
    return (step >= begin) & (step <= end) & (on_grid | (step == end))

  n_updates = -(-(end - begin) // every) + 1  # the grid below `end`, and `end`

  def level(step):
    t = jnp.asarray(step, jnp.int32)
    on_grid = 1 + (jnp.clip(t, begin, end) - begin) // every
    return jnp.where(t < begin, 0, jnp.where(t >= end, n_updates, on_grid)).astype(jnp.int32)

  if n_updates < _MAX_LEVELS:
    grid = [*range(begin, end, every), end] if end > begin else [end]
    return from_levels([0.0, *(value(t) for t in grid)], level, is_update)

  def sparsity(step):
    t = jnp.clip(jnp.asarray(step, jnp.int32), begin, end)
    last = jnp.where(t == end, end, begin + (t - begin) // every * every)
    s = value(last.astype(jnp.float32))
    return jnp.where(jnp.asarray(step) < begin, 0.0, s).astype(jnp.float32)

  return Schedule(sparsity, is_update, s_f)


def iterative(rounds: Sequence[tuple[int, float]]) -> Schedule:
  """Prune/retrain rounds (Han et al. 2015): ``[(step, sparsity), ...]``.

  The target jumps to each round's sparsity at its step and stays there until the
  next round; masks are recomputed at those steps only. Steps strictly increase and
  sparsities do not decrease (masks only shrink).

  Examples:
    >>> import jaxprune
    >>> s = jaxprune.iterative([(0, 0.5), (100, 0.75), (200, 0.9)])
    >>> [float(s.sparsity(t)) for t in (0, 150, 999)], bool(s.is_update(150))
    ([0.5, 0.75, 0.8999999761581421], False)
  """
  if isinstance(rounds, str) or not isinstance(rounds, Sequence | np.ndarray):
    raise TypeError(f"iterative() takes a list of (step, sparsity) pairs, got {rounds!r}.")
  parsed = []
  for r in rounds:
    if not isinstance(r, Sequence | np.ndarray) or isinstance(r, str) or len(r) != 2:
      raise TypeError(f"iterative() takes a list of (step, sparsity) pairs; {r!r} is not a pair.")
    t = _int(r[0], "round step")
    _host_sparsity(r[1], f"sparsity of the round at step {t}", "iterative")
    parsed.append((t, float(r[1])))
  if not parsed:
    raise ValueError("iterative() needs at least one (step, sparsity) round.")
  for t, _ in parsed:
    if t < 0:
      raise ValueError(f"round steps must be >= 0, got {t}.")
  steps = [t for t, _ in parsed]
  if steps != sorted(set(steps)):
    raise ValueError(f"round steps must be strictly increasing, got {steps}.")
  values = [s for _, s in parsed]
  if any(b < a for a, b in zip(values, values[1:])):
    raise ValueError(f"round sparsities must not decrease (masks only shrink), got {values}.")
  at = jnp.asarray(steps, jnp.int32)
  return from_levels(
    [0.0, *values],
    level=lambda step: jnp.searchsorted(at, jnp.asarray(step, jnp.int32), side="right"),
    is_update=lambda step: jnp.any(at == jnp.asarray(step)),
  )


def schedule(fn: Callable[[Any], Any], every: int = 1, final: float | None = None) -> Schedule:
  """Any ``step -> sparsity`` function, with masks recomputed every ``every`` steps.

  The function must be traceable (``jnp`` ops on the step). Where the step is concrete
  (a direct ``pruner.masks(params, step=...)`` call, or ``masked`` run without ``jit``)
  a value outside ``[0, 1)`` or NaN raises. Inside ``jit`` the value is only known on
  the device: it is clipped to ``[0, 1]`` (so above 1 every weight is pruned), and NaN
  leaves the masks as they were. Counts are then ``round(s * n)`` on a float32
  product, which can differ by one from the float64 rule of the built-in schedules.
  ``final`` enables float per-layer overrides.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> s = jaxprune.schedule(lambda t: jnp.minimum(t / 1000, 0.8), every=50)
    >>> float(s.sparsity(500)), bool(s.is_update(500)), bool(s.is_update(510))
    (0.5, True, False)
  """
  if not callable(fn):
    raise TypeError(f"schedule() takes a step -> sparsity function, got {fn!r}.")
  every = _int(every, "every")
  if every <= 0:
    raise ValueError(f"every must be > 0, got {every}.")
  if final is not None:
    check_sparsity(final, "final")
  return Schedule(
    lambda step: jnp.asarray(fn(step), jnp.float32),
    lambda step: jnp.asarray(step) % every == 0,
    final,
  )


def as_schedule(sparsity: Any) -> Schedule:
  """A float -> :func:`constant`; a :class:`Schedule` as it is; a callable -> :func:`schedule`."""
  if isinstance(sparsity, Schedule):
    return sparsity
  if callable(sparsity):
    return schedule(sparsity)
  return constant(sparsity)
