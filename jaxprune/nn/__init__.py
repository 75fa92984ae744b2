"""Flax layers for pruning: AutoPruner channel gates (NNX, and Linen in ``linen``).

The gates live in the :mod:`jaxprune.nn.autopruner` package; its names are re-exported
here. The AutoPruner training recipe is :mod:`jaxprune.train.autopruner`.

Evaluate a gated model as the pruned one by freezing its gates to their hard masks
(:func:`freeze_gates`; Linen: :func:`linen.freeze_gates`): live gates, even with
``alpha = inf``, follow each batch and the BatchNorm mode.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxprune import nn
  >>> block = nn.Gated(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), activation=nnx.relu,
  ...                  rngs=nnx.Rngs(1))
  >>> nn.set_alpha(block, 100.0)
  >>> _ = block(jnp.ones((8, 3)))
  >>> v = nn.gate_vectors(block)
  >>> penalty = nn.gate_penalty(v, r=0.5)
  >>> plain, masks = nn.ungate(block, nn.hard_masks(v))
  >>> type(plain).__name__
  'Sequential'
"""

from jaxprune.nn.autopruner import (
  Gate,
  GateAlpha,
  Gated,
  GateMask,
  GateVector,
  adaptive_lambda,
  alpha_schedule,
  fc_std,
  freeze_gates,
  gate_loss,
  gate_penalty,
  gate_vector,
  gate_vectors,
  gates,
  hard_masks,
  keep_ratio,
  keep_ratios,
  linen,
  set_alpha,
  ungate,
  ungate_params,
)

__all__ = [
  "adaptive_lambda",
  "alpha_schedule",
  "fc_std",
  "freeze_gates",
  "Gate",
  "gate_loss",
  "gate_penalty",
  "gate_vector",
  "gate_vectors",
  "GateAlpha",
  "Gated",
  "GateMask",
  "gates",
  "GateVector",
  "hard_masks",
  "keep_ratio",
  "keep_ratios",
  "linen",
  "set_alpha",
  "ungate",
  "ungate_params",
]
