"""Sparse training: masks that move while each layer's sparsity stays fixed.

* :func:`static_sparse`, :func:`set_sparse`, :func:`rigl`: optax transforms of the
  shape of :func:`jaxprune.masked` (state :class:`jaxprune.MaskedState`);
* :func:`ste`, :func:`sr_ste` with :func:`ste_params` for the forward pass;
* :func:`acdc`: the AC/DC sparsity schedule for :func:`jaxprune.masked`;
* :func:`lottery`: iterative pruning that rewinds the survivors to step ``k`` after each
  round (lottery tickets, state :class:`LotteryState`);
* :func:`uniform`, :func:`erk`: sparsity distributions over layers, accepted by every
  pruner and sparse trainer where a sparsity is.
"""

from jaxprune.distributions import Distribution, erk, layer_sparsities, uniform
from jaxprune.sparse.acdc_schedule import acdc
from jaxprune.sparse.dynamic import cosine_drop, rigl, set_sparse, static_sparse
from jaxprune.sparse.straight_through import STEState, sr_ste, ste, ste_masks, ste_params
from jaxprune.sparse.tickets import LotteryState, lottery

__all__ = [
  "acdc",
  "cosine_drop",
  "Distribution",
  "erk",
  "layer_sparsities",
  "lottery",
  "LotteryState",
  "rigl",
  "set_sparse",
  "sr_ste",
  "ste",
  "ste_masks",
  "ste_params",
  "STEState",
  "static_sparse",
  "uniform",
]
