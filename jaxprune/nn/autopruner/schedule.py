"""The growth of the gates' sigmoid scale ``alpha`` over training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def alpha_schedule(
  start: float = 1.0,
  end: float = 100.0,
  steps: int = 10_000,
  *,
  every: int = 1,
  mode: str = "linear",
) -> Callable[[Any], jax.Array]:
  """``step -> alpha``, growing from ``start`` to ``end`` in stages of ``every`` steps.

  With progress ``p = min(every * floor(t / every) / steps, 1)``: ``"linear"`` gives
  ``alpha_t = start + (end - start) * p`` (the authors' code: ``linspace(1, 100)``
  stepped every 100 iterations over the training), ``"geometric"`` gives
  ``alpha_t = start * (end / start) ** p``. ``end`` holds from step ``steps`` on.
  Traceable, so the step can be a jit argument. ``start = 0`` (linear only) begins
  with every gate at 0.5 and untrained, e.g. to pretrain the network with the gates
  in place.

  Examples:
    >>> from jaxprune.nn import alpha_schedule
    >>> a = alpha_schedule(1.0, 100.0, steps=100, every=10)
    >>> [round(float(a(t)), 1) for t in (0, 9, 10, 55, 100, 500)]
    [1.0, 1.0, 10.9, 50.5, 100.0, 100.0]
    >>> round(float(alpha_schedule(1.0, 100.0, steps=100, mode="geometric")(50)), 1)
    10.0
    >>> float(alpha_schedule(0.0, 100.0, steps=100)(0))
    0.0
  """
  if mode not in ("linear", "geometric"):
    raise ValueError(f"mode must be 'linear' or 'geometric', got {mode!r}.")
  if not 0 <= start <= end or end <= 0:
    raise ValueError(f"Need 0 <= start <= end and end > 0, got start={start}, end={end}.")
  if mode == "geometric" and start == 0:
    raise ValueError("A geometric alpha_schedule needs start > 0 (0 * ratio is 0); got 0.")
  if steps < 1 or every < 1:
    raise ValueError(f"steps and every must be >= 1, got steps={steps}, every={every}.")
  start, end = float(start), float(end)

  def alpha(step):
    stage = jnp.asarray(step, jnp.int32) // every * every
    p = jnp.minimum(stage.astype(jnp.float32) / steps, 1.0)
    if mode == "linear":
      return start + (end - start) * p
    return start * (end / start) ** p

  return alpha
