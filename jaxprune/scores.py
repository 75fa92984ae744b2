"""Importance scores: ``(params, grads, key) -> scores`` for one leaf.

A score function sees one param array (and its gradient, and a PRNG key derived from
the step and the leaf) and returns an array of the same shape; larger = more important.
Pruners apply it to every selected leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.select import score_dtype


def magnitude(param: jax.Array, grad: Any = None, key: Any = None) -> jax.Array:
  """``|w|`` (Han et al. 2015)."""
  del grad, key
  return jnp.abs(param)


def random(param: jax.Array, grad: Any = None, key: Any = None) -> jax.Array:
  """Uniform random scores: the random-pruning baseline (needs a key)."""
  del grad
  if key is None:
    raise ValueError("random scores need a PRNG key.")
  return jax.random.uniform(key, jnp.shape(param), jnp.float32)


def saliency(param: jax.Array, grad: Any = None, key: Any = None) -> jax.Array:
  """``|w * dL/dw|``: first-order Taylor estimate of the loss change when w is removed."""
  del key
  if grad is None:
    raise ValueError(
      "saliency scores |w * grad| need gradients: call the pruner with grads "
      "(jaxprune.masked passes the incoming gradients)."
    )
  # In float32: a float16 product overflows past 65504 (300 * 300 is inf) and would be
  # refused as a non-finite weight, or under jit rank first.
  dtype = score_dtype(jnp.result_type(param, grad))
  return jnp.abs(param.astype(dtype) * jnp.asarray(grad).astype(dtype))
