"""Structural surgery: trace the model, find coupled channels, cut them out.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxprune import surgery
  >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
  >>> print(surgery.plan(model, example_input=jnp.ones((1, 3))).groups[0].name)
  layers/0/kernel
"""

from jaxprune.surgery import scores
from jaxprune.surgery.api import Shrunk, plan, shrink
from jaxprune.surgery.channels import (
  channel_masks,
  group_masks,
  idle_channels,
  pruned_channels,
  slimming_masks,
)
from jaxprune.surgery.fold import FoldedBatchNorm, batchnorm_pairs, fold_batchnorm
from jaxprune.surgery.planning import Group, Plan

__all__ = [
  "FoldedBatchNorm",
  "Group",
  "Plan",
  "Shrunk",
  "batchnorm_pairs",
  "channel_masks",
  "fold_batchnorm",
  "group_masks",
  "idle_channels",
  "plan",
  "pruned_channels",
  "scores",
  "shrink",
  "slimming_masks",
]
