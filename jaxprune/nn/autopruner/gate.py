"""The AutoPruner gate (NNX): a scaled sigmoid over batch-pooled features, per channel.

:class:`Gate` computes one channel vector ``v in [0, 1]^C`` per batch and multiplies its
input by it; :class:`Gated` wraps a producer (conv or Dense), an optional BatchNorm and
activation, and gates their output. See :mod:`jaxprune.nn.autopruner` for the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

GATE_SCALE = 10.0  # the paper's factor over He init: std = 10 * sqrt(2 / n)


def fc_std(fan_in: int) -> float:
  """The paper's gate FC init std, ``10 * sqrt(2 / n)``, with ``n`` the FC's fan-in.

  The authors' layer pools the batch only and feeds the ``C x H' x W'`` map to an FC,
  so their ``n = C * H' * W'`` (``C * H * W`` in the paper) is that FC's fan-in: He's
  ``sqrt(2 / fan_in)`` times 10, which makes the initial logits' variance
  ``200 * E[input^2]``. Our gates also pool over the spatial positions, so the FC's
  input is the pooled ``C``-vector and ``n = C`` keeps that scale; ``n = C * H * W``
  with a ``C``-vector input would shrink the initial logits by ``sqrt(H * W)``.

  Examples:
    >>> from jaxprune.nn import autopruner
    >>> round(autopruner.fc_std(32), 4)
    2.5
  """
  return GATE_SCALE * math.sqrt(2.0 / fan_in)


def gate_vector(kernel: jax.Array, bias: jax.Array, x: jax.Array, alpha: Any) -> jax.Array:
  """The gate of a feature map: ``sigmoid(alpha * (pool(x) @ kernel + bias))``, shape ``(C,)``.

  ``pool`` is the mean over every axis but the last (batch and spatial positions).
  ``alpha = inf`` gives the hard gate ``1[z > 0]``, which is ``v > 0.5`` at any
  finite ``alpha > 0``. Both :class:`Gate` and the Linen gate call this.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import autopruner
    >>> x = jnp.array([[1.0, -1.0], [3.0, -3.0]])  # (N, C) = (2, 2), pooled [2, -2]
    >>> autopruner.gate_vector(jnp.eye(2), jnp.zeros(2), x, jnp.inf).tolist()
    [1.0, 0.0]
  """
  pooled = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
  z = pooled.astype(kernel.dtype) @ kernel + bias
  alpha = jnp.asarray(alpha, z.dtype)
  hard = jnp.isinf(alpha)
  soft = jax.nn.sigmoid(jnp.where(hard, 0.0, alpha) * z)  # no inf * 0 -> NaN in grads
  return jnp.where(hard, (z > 0).astype(z.dtype), soft)


class GateAlpha(nnx.Variable):
  """A gate's sigmoid scale ``alpha`` (a float32 scalar), set by :func:`set_alpha`."""


class GateVector(nnx.Variable):
  """The gate vector ``v`` of a gate's last forward pass (NaN before the first)."""


class GateMask(nnx.Variable):
  """A gate's frozen 0/1 vector, set by :func:`freeze_gates` (NaN: the gate is live)."""


class Gate(nnx.Module):
  """The AutoPruner branch: pool -> FC -> ``sigmoid(alpha * .)``, multiplying its input.

  ``alpha`` lives in a :class:`GateAlpha` variable, so a jitted train step that calls
  :func:`set_alpha` with a traced value never recompiles when it changes; the last
  ``v`` is kept in a :class:`GateVector` variable for :func:`gate_vectors`. To fold the
  gate into its producer later, wrap the producer in :class:`Gated` instead.

  The gate depends on the batch it sees, even with ``alpha = inf``: in eval mode, or
  on a single image, it can differ from the hard mask of a calibration pass. After
  :func:`freeze_gates` it multiplies by that mask (kept in a :class:`GateMask`
  variable) whatever the input; the FC then gets no gradient.

  Args:
    features: the number of channels ``C`` (the input's last axis).
    init_std: the FC kernel's init std; ``None`` follows the paper, :func:`fc_std`.
    alpha: the initial sigmoid scale.
    rngs: the random streams (``params`` draws the FC kernel; its bias starts at 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gate
    >>> gate = Gate(4, rngs=nnx.Rngs(0))
    >>> y = gate(jnp.ones((2, 5, 5, 4)))
    >>> y.shape, gate.vector.shape, bool(((y >= 0) & (y <= 1)).all())
    ((2, 5, 5, 4), (4,), True)
  """

  def __init__(
    self,
    features: int,
    *,
    init_std: float | None = None,
    alpha: float = 1.0,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    std = fc_std(features) if init_std is None else float(init_std)
    key = rngs.params()
    self.kernel = nnx.Param(std * jax.random.normal(key, (features, features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    self.alpha = GateAlpha(jnp.asarray(alpha, jnp.float32))
    self.vector = GateVector(jnp.full((features,), jnp.nan, jnp.float32))
    self.frozen = GateMask(jnp.full((features,), jnp.nan, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.bias.shape[0]:
      raise ValueError(
        f"This Gate has {self.bias.shape[0]} channels but its input has "
        f"{x.shape[-1]} on the last axis (shape {x.shape})."
      )
    v = gate_vector(self.kernel[...], self.bias[...], x, self.alpha[...])
    frozen = self.frozen[...]
    v = jnp.where(jnp.isnan(frozen), v, frozen.astype(v.dtype))
    self.vector.set_value(v.astype(jnp.float32))
    return x * v.astype(x.dtype)


def _out_features(layer: nnx.Module) -> int:
  kernel = getattr(layer, "kernel", None)
  if not isinstance(kernel, nnx.Param) or kernel.ndim < 2:
    raise TypeError(
      f"Gated needs a producer with a kernel whose last axis is its output features "
      f"(nnx.Conv, nnx.Linear); got {type(layer).__name__}."
    )
  return int(kernel.shape[-1])


class Gated(nnx.Module):
  """A producer layer (conv or Dense), optional BatchNorm and activation, then a :class:`Gate`.

  Computes ``gate(activation(norm(layer(x))))``. :func:`ungate` replaces it by the
  layer (or ``nnx.Sequential(layer, norm, activation)``) with the hard gate folded into
  the layer's kernel and bias and the norm's scale and bias. Keep the ``activation``
  zero at zero (``relu``, ``gelu``, ``tanh``) so the folding stays exact.

  With a BatchNorm, the gate in eval mode pools the output of the running statistics,
  not of the batch's, so even hard gates (``alpha = inf``) can disagree with the masks
  of a training-mode calibration pass; :func:`freeze_gates` the model to evaluate what
  :func:`ungate` will give.

  Args:
    layer: the producer, e.g. ``nnx.Conv`` or ``nnx.Linear`` (a ``kernel`` param with
      the output features last, an optional ``bias``).
    norm: an optional ``nnx.BatchNorm`` over the layer's output channels.
    activation: an optional elementwise function applied before the gate.
    init_std, alpha: passed to :class:`Gate`.
    rngs: the random streams for the gate's FC.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated
    >>> rngs = nnx.Rngs(0)
    >>> block = Gated(nnx.Conv(1, 8, (3, 3), rngs=rngs), norm=nnx.BatchNorm(8, rngs=rngs),
    ...               activation=nnx.relu, rngs=rngs)
    >>> block(jnp.ones((2, 6, 6, 1))).shape
    (2, 6, 6, 8)
  """

  def __init__(
    self,
    layer: nnx.Module,
    *,
    norm: nnx.BatchNorm | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    init_std: float | None = None,
    alpha: float = 1.0,
    rngs: nnx.Rngs,
  ):
    features = _out_features(layer)
    if norm is not None and not isinstance(norm, nnx.BatchNorm):
      raise TypeError(
        f"Gated folds the gate into a per-channel norm; got {type(norm).__name__}, whose "
        "statistics mix channels. Use nnx.BatchNorm, or put the gate before the norm."
      )
    if norm is not None and norm.num_features != features:
      raise ValueError(f"The norm has {norm.num_features} features, the layer {features}.")
    self.layer = layer
    self.norm = norm
    self.activation = activation
    self.gate = Gate(features, init_std=init_std, alpha=alpha, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.layer(x)
    if self.norm is not None:
      y = self.norm(y)
    if self.activation is not None:
      y = self.activation(y)
    return self.gate(y)
