"""AutoPruner's pure functions over gate vectors: keep ratios, the loss, hard masks.

A gate vector ``v`` is a ``(C,)`` array in ``[0, 1]`` (from
:func:`jaxprune.nn.gate_vectors`); ``{path: v}`` maps each gate to its vector. These
need only JAX and work under ``jit`` and ``grad`` (except :func:`keep_ratios`, a report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def keep_ratio(v: jax.Array) -> jax.Array:
  """``||v||_1 / C``: the fraction of the channels a gate keeps (soft, or hard for bools).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import keep_ratio
    >>> float(keep_ratio(jnp.array([1.0, 0.5, 0.0, 0.5]))), float(keep_ratio(jnp.array([True, False])))
    (0.5, 0.5)
  """
  return jnp.mean(jnp.abs(jnp.asarray(v, jnp.float32)))


def keep_ratios(vectors: Mapping[str, jax.Array]) -> dict[str, float]:
  """``{path: ||v||_1 / C}`` as Python floats, plus ``"total"`` over all channels.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import keep_ratios
    >>> keep_ratios({"a": jnp.array([1.0, 0.0]), "b": jnp.array([True, True, True, False])})
    {'a': 0.5, 'b': 0.75, 'total': 0.6666666666666666}
  """
  out = {p: float(keep_ratio(v)) for p, v in vectors.items()}
  sizes = {p: int(jnp.size(v)) for p, v in vectors.items()}
  out["total"] = sum(out[p] * n for p, n in sizes.items()) / max(sum(sizes.values()), 1)
  return out


def gate_loss(v: jax.Array, r: Any) -> jax.Array:
  """``(||v||_1 / C - r)^2``: one gate's distance from the target keep ratio ``r``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import gate_loss
    >>> float(gate_loss(jnp.array([1.0, 0.5, 0.0, 0.5]), 0.25))  # (0.5 - 0.25)^2
    0.0625
  """
  return jnp.square(keep_ratio(v) - r)


def adaptive_lambda(v: jax.Array, r: Any, scale: float = 100.0) -> jax.Array:
  """``100 * |r_b - r|`` with ``r_b = ||v||_1 / C`` the batch's keep ratio; no gradient.

  The weight of :func:`gate_loss` shrinks as the gate nears its target. (The authors'
  code uses the binarised ratio ``mean(v > 0.5)`` averaged over 20 iterations; here
  ``r_b`` is this batch's soft ratio, which equals it once the gates are binary.)

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import adaptive_lambda
    >>> round(float(adaptive_lambda(jnp.array([1.0, 0.5, 0.0, 0.5]), 0.25)), 4)
    25.0
  """
  return jax.lax.stop_gradient(scale * jnp.abs(keep_ratio(v) - r))


def gate_penalty(
  vectors: Mapping[str, jax.Array], r: float | Mapping[str, float], scale: float = 100.0
) -> jax.Array:
  """``sum_l adaptive_lambda(v_l, r_l) * gate_loss(v_l, r_l)``: add it to the task loss.

  Args:
    vectors: ``{path: v}`` from :func:`gate_vectors` (inside the loss function).
    r: the target keep ratio, one for all gates or ``{path: r}`` for each.
    scale: the factor of :func:`adaptive_lambda` (100 in the paper).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import gate_penalty
    >>> v = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([0.0, 1.0])}
    >>> float(gate_penalty(v, 0.5))  # 100 * 0.5 * 0.5^2 + 0
    12.5
  """
  total = jnp.zeros((), jnp.float32)
  for path, v in vectors.items():
    if isinstance(r, Mapping):
      if path not in r:
        raise KeyError(f"No target keep ratio for gate {path!r}; targets: {sorted(r)}.")
      target = r[path]
    else:
      target = r
    total = total + adaptive_lambda(v, target, scale) * gate_loss(v, target)
  return total


def hard_masks(vectors: Mapping[str, jax.Array], threshold: float = 0.5) -> dict[str, jax.Array]:
  """``{path: v > threshold}``: per gate, a bool vector of the channels kept.

  Take ``vectors`` from a calibration pass (e.g. the training set as one batch): the
  gates are batch-wise, and nearly constant across batches once ``alpha`` is large.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import hard_masks
    >>> hard_masks({"conv1/gate": jnp.array([0.9, 0.2, 0.6])})["conv1/gate"].tolist()
    [True, False, True]
  """
  return {p: jnp.asarray(v) > threshold for p, v in vectors.items()}
