"""jaxprune: neural-network pruning for JAX, Flax and Optax.

Examples:
  >>> import optax, jaxprune
  >>> pruner = jaxprune.magnitude(jaxprune.agp(0.9, begin=1_000, end=10_000, every=100))
  >>> tx = jaxprune.masked(optax.adam(1e-3), pruner)
"""

from jaxprune import export, sparse
from jaxprune.distributions import Distribution, erk, uniform
from jaxprune.masks import Summary, apply_mask, combine, pack_masks, summary, unpack_masks
from jaxprune.pruners import Pruner, magnitude, random, saliency
from jaxprune.quantization import QuantizedArray, compressed_size, dequantize, quantize
from jaxprune.regularizers import GroupReport, group_lasso, l1, zero_groups
from jaxprune.schedules import Schedule, agp, constant, iterative, one_shot, schedule
from jaxprune.select import topk_mask
from jaxprune.sparse import (
  STEState,
  acdc,
  rigl,
  set_sparse,
  sr_ste,
  static_sparse,
  ste,
  ste_params,
)
from jaxprune.sparsify import TopKGradientsState, topk_gradients
from jaxprune.structures import blocks, channels, filters, n_m, neurons
from jaxprune.transforms import MaskedState, masked, masks_of, set_masks

__version__ = "0.1.0"

__all__ = [
  "acdc",
  "agp",
  "apply_mask",
  "blocks",
  "channels",
  "combine",
  "compressed_size",
  "constant",
  "dequantize",
  "Distribution",
  "erk",
  "export",
  "filters",
  "group_lasso",
  "GroupReport",
  "iterative",
  "l1",
  "magnitude",
  "masked",
  "MaskedState",
  "masks_of",
  "n_m",
  "neurons",
  "one_shot",
  "pack_masks",
  "Pruner",
  "quantize",
  "QuantizedArray",
  "random",
  "rigl",
  "saliency",
  "schedule",
  "Schedule",
  "set_masks",
  "set_sparse",
  "sparse",
  "sr_ste",
  "static_sparse",
  "ste",
  "ste_params",
  "STEState",
  "summary",
  "Summary",
  "topk_gradients",
  "topk_mask",
  "TopKGradientsState",
  "uniform",
  "unpack_masks",
  "zero_groups",
]
