"""Sparsity schedules: ``step -> target sparsity`` and ``step -> is this an update step``.

A :class:`Schedule` is two pure functions of the (traced) step, so it jits and the
target can change every step without recompiling. ``final`` is the sparsity reached at
the end; per-layer overrides use it to follow the same progress to their own target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxprune.select import check_sparsity


class Schedule(NamedTuple):
  """``sparsity(step)``, ``is_update(step)`` and the final sparsity.

  Attributes:
    sparsity: ``step -> float32`` target sparsity at that step.
    is_update: ``step -> bool``: whether masks are recomputed at that step.
    final: the target at the end of the schedule (``None`` when unknown).
  """

  sparsity: Callable[[Any], Any]
  is_update: Callable[[Any], Any]
  final: float | None


def _int(value: Any, name: str) -> int:
  if isinstance(value, bool) or int(value) != value:
    raise TypeError(f"{name} must be an integer step, got {value!r}.")
  return int(value)


def one_shot(sparsity: float, at: int = 0) -> Schedule:
  """Sparsity 0 before step ``at``, ``sparsity`` from then on; masks set once, at ``at``.

  Examples:
    >>> import jaxprune
    >>> s = jaxprune.one_shot(0.8, at=100)
    >>> float(s.sparsity(99)), float(s.sparsity(100)), bool(s.is_update(100))
    (0.0, 0.800000011920929, True)
  """
  check_sparsity(sparsity)
  at = _int(at, "at")
  if at < 0:
    raise ValueError(f"at must be >= 0, got {at}.")
  value = float(sparsity)
  return Schedule(
    sparsity=lambda step: jnp.where(jnp.asarray(step) >= at, value, 0.0).astype(jnp.float32),
    is_update=lambda step: jnp.asarray(step) == at,
    final=value,
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
  last update; before ``begin`` it is 0 (no pruning), after ``end`` it is ``final``.
  ``end`` is always an update step, also when ``end - begin`` is not a multiple of
  ``every`` (the formula then reaches ``final`` exactly at ``end``).

  Examples:
    >>> import jaxprune
    >>> s = jaxprune.agp(0.9, begin=0, end=100, every=10)
    >>> [round(float(s.sparsity(t)), 4) for t in (0, 5, 10, 50, 100, 200)]
    [0.0, 0.0, 0.2439, 0.7875, 0.9, 0.9]
  """
  check_sparsity(final, "final")
  check_sparsity(initial, "initial")
  begin, end, every = _int(begin, "begin"), _int(end, "end"), _int(every, "every")
  if every <= 0:
    raise ValueError(f"every must be > 0 (steps between mask updates), got {every}.")
  if begin < 0:
    raise ValueError(f"begin must be >= 0, got {begin}.")
  if end < begin:
    raise ValueError(f"end ({end}) must not come before begin ({begin}).")
  s_f, s_i, span = float(final), float(initial), max(end - begin, 1)

  def last_update(step):
    t = jnp.clip(jnp.asarray(step, jnp.int32), begin, end)
    return jnp.where(t == end, end, begin + (t - begin) // every * every)

  def sparsity(step):
    progress = (last_update(step) - begin).astype(jnp.float32) / span
    s = s_f + (s_i - s_f) * (1.0 - progress) ** 3
    return jnp.where(jnp.asarray(step) < begin, 0.0, s).astype(jnp.float32)

  def is_update(step):
    step = jnp.asarray(step)
    on_grid = (step - begin) % every == 0
    return (step >= begin) & (step <= end) & (on_grid | (step == end))

  return Schedule(sparsity, is_update, s_f)


def iterative(rounds: Sequence[tuple[int, float]]) -> Schedule:
  """Prune/retrain rounds (Han et al. 2015): ``[(step, sparsity), ...]``.

  The target jumps to each round's sparsity at its step and stays there until the
  next round; masks are recomputed at those steps only.

  Examples:
    >>> import jaxprune
    >>> s = jaxprune.iterative([(0, 0.5), (100, 0.75), (200, 0.9)])
    >>> [float(s.sparsity(t)) for t in (0, 150, 999)], bool(s.is_update(150))
    ([0.5, 0.75, 0.8999999761581421], False)
  """
  rounds = [(_int(t, "round step"), float(s)) for t, s in rounds]
  if not rounds:
    raise ValueError("iterative() needs at least one (step, sparsity) round.")
  for t, s in rounds:
    check_sparsity(s, f"sparsity of the round at step {t}")
    if t < 0:
      raise ValueError(f"round steps must be >= 0, got {t}.")
  steps = [t for t, _ in rounds]
  if steps != sorted(set(steps)):
    raise ValueError(f"round steps must be strictly increasing, got {steps}.")
  at = jnp.asarray(steps, jnp.int32)
  values = jnp.asarray([0.0] + [s for _, s in rounds], jnp.float32)

  def sparsity(step):
    return values[jnp.searchsorted(at, jnp.asarray(step, jnp.int32), side="right")]

  return Schedule(sparsity, lambda step: jnp.any(at == jnp.asarray(step)), rounds[-1][1])


def schedule(fn: Callable[[Any], Any], every: int = 1, final: float | None = None) -> Schedule:
  """Any ``step -> sparsity`` function, with masks recomputed every ``every`` steps.

  The function must be traceable (``jnp`` ops on the step). Its values are clipped to
  ``[0, 1]`` by the selector; ``final`` enables float per-layer overrides.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> s = jaxprune.schedule(lambda t: jnp.minimum(t / 1000, 0.8), every=50)
    >>> float(s.sparsity(500)), bool(s.is_update(500)), bool(s.is_update(510))
    (0.5, True, False)
  """
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
