"""AC/DC (Peste et al. 2021): alternating compressed (sparse) and decompressed (dense) phases.

:func:`acdc` is a sparsity :class:`jaxprune.Schedule` for any pruner inside
:func:`jaxprune.masked`: dense until ``warmup``; then phases of ``phase`` steps,
sparse first (the mask chosen by the pruner, e.g. magnitude, at the phase start, the
pruned weights held at zero), then dense (every weight trains again, the ones pruned
in the sparse phase restart from zero); from ``end`` on, sparse to the finish. A sparse
phase starts from all-kept masks, so its mask is a fresh top-k of the current weights.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxprune import _checks
from jaxprune.schedules import Schedule
from jaxprune.select import check_sparsity


def acdc(sparsity: float, *, warmup: int, phase: int, end: int) -> Schedule:
  """The AC/DC schedule: dense warm-up, alternating sparse/dense phases, final sparse phase.

  Args:
    sparsity: the sparsity of every compressed phase.
    warmup: the first sparse phase starts here (steps before are dense).
    phase: the length of each sparse and each dense phase.
    end: the final sparse phase starts here and lasts to the end of training.

  Returns:
    A :class:`jaxprune.Schedule` with levels ``(0, sparsity)``; masks update at every
    phase start.

  Examples:
    >>> import jaxprune
    >>> from jaxprune.sparse import acdc
    >>> s = acdc(0.9, warmup=10, phase=5, end=30)
    >>> [round(float(s.sparsity(t)), 1) for t in (0, 10, 15, 20, 25, 27, 30, 99)]
    [0.0, 0.9, 0.0, 0.9, 0.0, 0.0, 0.9, 0.9]
    >>> [t for t in range(40) if s.is_update(t)]
    [10, 15, 20, 25, 30]
  """
  check_sparsity(sparsity, "acdc: sparsity")
  warmup = _checks.integer(warmup, "warmup", "acdc", low=0, what="the first sparse step")
  phase = _checks.integer(phase, "phase", "acdc", low=1, what="steps per sparse or dense phase")
  end = _checks.integer(end, "end", "acdc", low=0, what="the start of the final sparse phase")
  if end < warmup:
    raise ValueError(f"acdc: end ({end}) must not come before warmup ({warmup}).")

  def level(step):
    t = jnp.asarray(step, jnp.int32)
    sparse = ((t - warmup) // phase) % 2 == 0
    return jnp.where(t < warmup, 0, jnp.where(t >= end, 1, sparse.astype(jnp.int32))).astype(
      jnp.int32
    )

  def is_update(step):
    t = jnp.asarray(step, jnp.int32)
    return (t >= warmup) & (((t < end) & ((t - warmup) % phase == 0)) | (t == end))

  levels = (0.0, float(sparsity))
  table = jnp.asarray(levels, jnp.float32)
  return Schedule(lambda step: table[level(step)], is_update, float(sparsity), levels, level)
