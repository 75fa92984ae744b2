"""AutoPruner (Luo & Wu 2018): learned channel gates, trained end to end, folded into masks.

A :class:`Gate` computes one channel vector ``v in [0, 1]^C`` per batch from the feature
map it multiplies: batch-wise pooling (the mean over the batch and every spatial
position, so ``(N, H, W, C) -> (C,)`` and ``(N, C) -> (C,)``), a fully connected layer
``C -> C`` and a scaled sigmoid ``sigmoid(alpha * z)``. The user adds
:func:`~jaxprune.nn.gate_penalty` (``lambda * (||v||_1 / C - r)^2`` per gate, with the
adaptive ``lambda = 100 * |r_b - r|``) to the loss and lets ``alpha`` grow
(:func:`alpha_schedule`, :func:`set_alpha`) so the gates end binary.
:func:`~jaxprune.nn.hard_masks` thresholds them at 0.5 and :func:`~jaxprune.nn.ungate`
folds them into the producer layers: a plain model whose removed channels have zero
filters, plus jaxprune masks for surgery.

Hard gates are still computed from each batch: with ``alpha = inf`` a gate is
``1[pool(x) @ W + b > 0]`` of *this* batch, so in eval mode (BatchNorm running
statistics instead of the batch's) or on a batch of one image a few gates can flip
away from the :func:`~jaxprune.nn.hard_masks` of the calibration pass, and evaluating
the gated model is then not evaluating the pruned one. :func:`freeze_gates` fixes every
gate to its hard mask (Linen: :func:`jaxprune.nn.linen.freeze_gates`), after which the
gated model computes exactly what :func:`~jaxprune.nn.ungate` returns.

Where the gate goes: :class:`Gated` wraps the producer (a conv or Dense layer), an
optional ``nnx.BatchNorm`` and an optional activation, and gates their output. With a
BatchNorm after the producer, gate after the norm (as the authors do: conv-BN-ReLU-gate),
not between conv and norm: in training mode BatchNorm divides the channel scale ``v``
out again (``BN(v * y) = BN(y)`` up to ``eps``), so a gate before it gets no gradient
from the task loss. Folding is exact either way for hard 0/1 gates: ``m * f(BN(y))`` is
``f(BN'(y))`` with the norm's scale and bias multiplied by ``m`` whenever ``f(0) = 0``
(ReLU, GELU, tanh, ...), and the producer's kernel columns and bias are zeroed too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import tree as tree_lib

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


def _path(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def gates(model: nnx.Module) -> dict[str, Gate]:
  """``{path: Gate}`` for every :class:`Gate` in ``model``, in graph traversal order.

  Examples:
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, gates
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(Gated(nnx.Linear(2, 3, rngs=rngs), rngs=rngs), nnx.relu)
    >>> list(gates(model))
    ['layers/0/gate']
  """
  return {_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, Gate)}


def set_alpha(model: nnx.Module, alpha: Any) -> None:
  """Sets every gate's ``alpha`` (a float or a traced array: no recompilation under jit).

  ``alpha = inf`` makes every gate a hard 0/1 vector, but still one computed from the
  batch: in eval mode (BatchNorm running statistics) or on small batches it can differ
  from the :func:`~jaxprune.nn.hard_masks` the model will be folded with. To evaluate
  the pruned model through the gated one, :func:`freeze_gates` it instead.

  Examples:
    >>> from flax import nnx
    >>> from jaxprune.nn import Gate, set_alpha
    >>> gate = Gate(3, rngs=nnx.Rngs(0))
    >>> set_alpha(gate, 50.0)
    >>> float(gate.alpha[...])
    50.0
  """
  found = gates(model)
  if not found:
    raise ValueError(f"{type(model).__name__} has no jaxprune.nn.Gate to set alpha on.")
  value = jnp.asarray(alpha, jnp.float32)
  for gate in found.values():
    gate.alpha.set_value(value)


def freeze_gates(model: nnx.Module, masks: Mapping[str, Any] | None) -> None:
  """Fixes every gate to its hard mask, so the gated model computes the pruned one.

  After ``freeze_gates(model, masks)`` each :class:`Gate` multiplies its input by
  ``masks[path]`` (as 0/1) whatever the batch, BatchNorm mode or ``alpha``, so
  ``model(x)`` equals ``ungate(model, masks)[0](x)`` on any input, one image or many.
  :func:`gate_vectors` then returns the masks. ``freeze_gates(model, None)`` makes the
  gates live again. Values only change, so jitted steps do not recompile.

  Args:
    model: an NNX model with :class:`Gate` layers.
    masks: ``{gate path: (C,) bool}`` for every gate, e.g. from :func:`hard_masks`,
      or ``None`` to unfreeze.

  Raises:
    ValueError: for a missing or extra gate path, or a mask of the wrong length.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, freeze_gates
    >>> block = Gated(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> freeze_gates(block, {"gate": jnp.array([True, False, True])})
    >>> bool((block(jnp.ones((1, 2)))[:, 1] == 0).all())
    True
  """
  found = gates(model)
  if not found:
    raise ValueError(f"{type(model).__name__} has no jaxprune.nn.Gate to freeze.")
  if masks is None:
    for gate in found.values():
      gate.frozen.set_value(jnp.full_like(gate.frozen.get_value(), jnp.nan))
    return
  missing, extra = sorted(set(found) - set(masks)), sorted(set(masks) - set(found))
  if missing or extra:
    raise ValueError(f"Masks do not match the gates: missing {missing}, unknown {extra}.")
  for path, gate in found.items():
    keep = jnp.asarray(masks[path])
    if keep.shape != gate.frozen.shape:
      raise ValueError(
        f"The mask for {path!r} has shape {keep.shape}; the gate has {gate.frozen.shape}."
      )
    gate.frozen.set_value(keep.astype(bool).astype(jnp.float32))


def alpha_schedule(
  start: float = 1.0,
  end: float = 100.0,
  steps: int = 10_000,
  *,
  every: int = 1,
  mode: str = "linear",
) -> Callable[[Any], jax.Array]:
  """``step -> alpha``, growing from ``start`` to ``end`` in stages of ``every`` steps.

  With progress ``p = min(every * floor(t / every) / steps, 1)``: ``"linear"`` gives
  ``alpha_t = start + (end - start) * p`` (the authors' code: ``linspace(1, 100)``
  stepped every 100 iterations over the training), ``"geometric"`` gives
  ``alpha_t = start * (end / start) ** p``. ``end`` holds from step ``steps`` on.
  Traceable, so the step can be a jit argument. ``start = 0`` (linear only) begins
  with every gate at 0.5 and untrained, e.g. to pretrain the network with the gates
  in place.

  Examples:
    >>> from jaxprune.nn import alpha_schedule
    >>> a = alpha_schedule(1.0, 100.0, steps=100, every=10)
    >>> [round(float(a(t)), 1) for t in (0, 9, 10, 55, 100, 500)]
    [1.0, 1.0, 10.9, 50.5, 100.0, 100.0]
    >>> round(float(alpha_schedule(1.0, 100.0, steps=100, mode="geometric")(50)), 1)
    10.0
    >>> float(alpha_schedule(0.0, 100.0, steps=100)(0))
    0.0
  """
  if mode not in ("linear", "geometric"):
    raise ValueError(f"mode must be 'linear' or 'geometric', got {mode!r}.")
  if not 0 <= start <= end or end <= 0:
    raise ValueError(f"Need 0 <= start <= end and end > 0, got start={start}, end={end}.")
  if mode == "geometric" and start == 0:
    raise ValueError("A geometric alpha_schedule needs start > 0 (0 * ratio is 0); got 0.")
  if steps < 1 or every < 1:
    raise ValueError(f"steps and every must be >= 1, got steps={steps}, every={every}.")
  start, end = float(start), float(end)

  def alpha(step):
    stage = jnp.asarray(step, jnp.int32) // every * every
    p = jnp.minimum(stage.astype(jnp.float32) / steps, 1.0)
    if mode == "linear":
      return start + (end - start) * p
    return start * (end / start) ** p

  return alpha


def gate_vectors(source: Any) -> dict[str, jax.Array]:
  """The gate vectors of the last forward pass, ``{gate path: v}``.

  Args:
    source: an NNX model (its :class:`Gate` modules are read), or the Linen
      ``"intermediates"`` collection (or the whole mutated-variables dict) of an
      ``apply(..., mutable=["intermediates"])`` call with Linen gates.

  Returns:
    ``{path: (C,) array}``, e.g. ``{"conv1/gate": v}`` for NNX or ``{"gate1": v}`` for
    a Linen gate named ``gate1``. Differentiable when read inside the loss function.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, gate_vectors
    >>> block = Gated(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> _ = block(jnp.ones((5, 3)))
    >>> {p: v.shape for p, v in gate_vectors(block).items()}
    {'gate': (4,)}
  """
  if isinstance(source, nnx.Module):
    found = {p: g.vector[...] for p, g in gates(source).items()}
  else:
    found = {}
    for path, leaf in tree_lib.leaves_with_paths(source):
      parts = path.split("/")
      if parts[0] == "intermediates":
        parts = parts[1:]
      if parts[-1] == "gate_vector":  # the root module's own gate has the path ""
        found["/".join(parts[:-1])] = leaf
  if not found:
    raise ValueError(
      "No gate vectors found: pass an NNX model with jaxprune.nn.Gate layers, or the "
      "'intermediates' of a Linen apply(..., mutable=['intermediates'])."
    )
  return found
