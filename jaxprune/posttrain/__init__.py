"""Post-training pruning from calibration data: Wanda and SparseGPT.

* :func:`calibrate`: statistics of every linear layer's inputs (``||X_j||_2``, ``X^T X``)
  from the traced forward pass of an NNX or Linen model, optionally over a mesh.
* :func:`wanda`, :func:`sparsegpt`: pure functions over params + statistics, returning
  masks (and, for SparseGPT, updated weights); :func:`wanda_mask` and
  :func:`sparsegpt_layer` do one ``[inputs, outputs]`` kernel.
* :func:`prune`: model + calibration batches -> pruned params and masks, block by block
  (each block calibrated on the outputs of the already-pruned blocks) or in one pass.

Examples:
  >>> import jax, jax.numpy as jnp, jaxprune
  >>> from flax import nnx
  >>> from jaxprune import posttrain
  >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  >>> batches = [jax.random.normal(jax.random.key(i), (32, 8)) for i in range(2)]
  >>> params, masks = posttrain.prune(model, None, batches, method="sparsegpt",
  ...                                 structure=jaxprune.n_m(2, 4), blocks=[r"^layers/0/", r"^layers/2/"])
  >>> [int(m.sum()) for m in jax.tree.leaves(masks)]
  [64, 32]
  >>> nnx.update(model, params)
"""

from jaxprune.posttrain.calibration import calibrate
from jaxprune.posttrain.layers import Layer, linear_layers
from jaxprune.posttrain.sequential import group_blocks, prune
from jaxprune.posttrain.sparsegpt_solver import sparsegpt, sparsegpt_layer
from jaxprune.posttrain.stats import InputStats
from jaxprune.posttrain.wanda_masks import wanda, wanda_mask

__all__ = [
  "calibrate",
  "group_blocks",
  "InputStats",
  "Layer",
  "linear_layers",
  "prune",
  "sparsegpt",
  "sparsegpt_layer",
  "wanda",
  "wanda_mask",
]
