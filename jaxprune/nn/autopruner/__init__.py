"""AutoPruner (Luo & Wu 2018): learned channel gates, trained end to end, folded into masks.

A :class:`~jaxprune.nn.Gate` computes one channel vector ``v in [0, 1]^C`` per batch from the feature
map it multiplies: batch-wise pooling (the mean over the batch and every spatial
position, so ``(N, H, W, C) -> (C,)`` and ``(N, C) -> (C,)``), a fully connected layer
``C -> C`` and a scaled sigmoid ``sigmoid(alpha * z)``. The user adds
:func:`~jaxprune.nn.gate_penalty` (``lambda * (||v||_1 / C - r)^2`` per gate, with the
adaptive ``lambda = 100 * |r_b - r|``) to the loss and lets ``alpha`` grow
(:func:`~jaxprune.nn.alpha_schedule`, :func:`~jaxprune.nn.set_alpha`) so the gates end binary.
:func:`~jaxprune.nn.hard_masks` thresholds them at 0.5 and :func:`~jaxprune.nn.ungate`
folds them into the producer layers: a plain model whose removed channels have zero
filters, plus jaxprune masks for surgery.

Hard gates are still computed from each batch: with ``alpha = inf`` a gate is
``1[pool(x) @ W + b > 0]`` of *this* batch, so in eval mode (BatchNorm running
statistics instead of the batch's) or on a batch of one image a few gates can flip
away from the :func:`~jaxprune.nn.hard_masks` of the calibration pass, and evaluating
the gated model is then not evaluating the pruned one. :func:`~jaxprune.nn.freeze_gates` fixes every
gate to its hard mask (Linen: :func:`jaxprune.nn.linen.freeze_gates`), after which the
gated model computes exactly what :func:`~jaxprune.nn.ungate` returns.

Where the gate goes: :class:`~jaxprune.nn.Gated` wraps the producer (a conv or Dense layer), an
optional ``nnx.BatchNorm`` and an optional activation, and gates their output. With a
BatchNorm after the producer, gate after the norm (as the authors do: conv-BN-ReLU-gate),
not between conv and norm: in training mode BatchNorm divides the channel scale ``v``
out again (``BN(v * y) = BN(y)`` up to ``eps``), so a gate before it gets no gradient
from the task loss. Folding is exact either way for hard 0/1 gates: ``m * f(BN(y))`` is
``f(BN'(y))`` with the norm's scale and bias multiplied by ``m`` whenever ``f(0) = 0``
(ReLU, GELU, tanh, ...), and the producer's kernel columns and bias are zeroed too.

Modules: :mod:`~jaxprune.nn.autopruner.gate` (the NNX layers),
:mod:`~jaxprune.nn.autopruner.model` (over a whole model),
:mod:`~jaxprune.nn.autopruner.schedule` (alpha), :mod:`~jaxprune.nn.autopruner.loss`
(keep ratios, penalty, hard masks), :mod:`~jaxprune.nn.autopruner.fold` (gates into
the producers) and :mod:`~jaxprune.nn.autopruner.linen` (the Linen gate). Every public
name is re-exported here and in :mod:`jaxprune.nn`.
"""

from jaxprune.nn.autopruner import linen
from jaxprune.nn.autopruner.fold import ungate, ungate_params
from jaxprune.nn.autopruner.gate import (
  GATE_SCALE,
  Gate,
  GateAlpha,
  Gated,
  GateMask,
  GateVector,
  fc_std,
  gate_vector,
)
from jaxprune.nn.autopruner.loss import (
  adaptive_lambda,
  gate_loss,
  gate_penalty,
  hard_masks,
  keep_ratio,
  keep_ratios,
)
from jaxprune.nn.autopruner.model import freeze_gates, gate_vectors, gates, set_alpha
from jaxprune.nn.autopruner.schedule import alpha_schedule

__all__ = [
  "GATE_SCALE",
  "Gate",
  "GateAlpha",
  "GateMask",
  "GateVector",
  "Gated",
  "adaptive_lambda",
  "alpha_schedule",
  "fc_std",
  "freeze_gates",
  "gate_loss",
  "gate_penalty",
  "gate_vector",
  "gate_vectors",
  "gates",
  "hard_masks",
  "keep_ratio",
  "keep_ratios",
  "linen",
  "set_alpha",
  "ungate",
  "ungate_params",
]
