"""Post-training pruning from calibration data: Wanda and SparseGPT.

* :func:`calibrate`: statistics of every linear layer's inputs (``||X_j||_2``, ``X^T X``)
  from the traced forward pass of an NNX or Linen model, optionally over a mesh.
* :func:`wanda`, :func:`sparsegpt`: pure functions over params + statistics, returning
  masks (and, for SparseGPT, updated weights); :func:`wanda_mask` and
  :func:`sparsegpt_layer` do one ``[inputs, outputs]`` kernel.
* :func:`prune`: model + calibration batches -> pruned params and masks, block by block
  (each block calibrated on the outputs of the already-pruned blocks; one pass per
  block from cached hidden states for a :class:`Stack` of blocks) or in one pass;
  uniform sparsity, one per block, or OWL's (:func:`owl_sparsities`).
* Over a ``jax.sharding.Mesh`` (``prune(..., mesh=mesh)``, :mod:`~jaxprune.posttrain.sharded`):
  weights split along their output features (FSDP), calibration batches along the data
  axis, statistics all-reduced; the masks and weights of one device.
* :func:`block_influence`, :func:`drop_blocks`: depth pruning (ShortGPT): remove the
  blocks that change their input least, for a really shorter model.

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

from jaxprune.posttrain.blockwise import Stack, group_blocks, stack_of
from jaxprune.posttrain.calibration import calibrate
from jaxprune.posttrain.depth import block_influence, drop_blocks
from jaxprune.posttrain.layers import Layer, linear_layers
from jaxprune.posttrain.owl import Owl, outlier_ratios, owl_sparsities
from jaxprune.posttrain.sequential import prune
from jaxprune.posttrain.sparsegpt_solver import sparsegpt, sparsegpt_layer
from jaxprune.posttrain.stats import InputStats
from jaxprune.posttrain.wanda_masks import wanda, wanda_mask

__all__ = [
  "block_influence",
  "calibrate",
  "drop_blocks",
  "group_blocks",
  "InputStats",
  "Layer",
  "linear_layers",
  "outlier_ratios",
  "Owl",
  "owl_sparsities",
  "prune",
  "Stack",
  "stack_of",
  "sparsegpt",
  "sparsegpt_layer",
  "wanda",
  "wanda_mask",
]
