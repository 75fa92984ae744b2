"""The AutoPruner gate as a Flax Linen module (same numbers as the NNX :class:`Gate`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from jaxprune.nn.autopruner.gate import fc_std, gate_vector

FROZEN = "gate_masks"  # the variable collection of frozen gates: <scope>/mask


class Gate(nn.Module):
  """The AutoPruner branch for Linen: pool -> FC -> ``sigmoid(alpha * .)``, times the input.

  ``alpha`` is a call argument (pass the traced schedule value: no recompilation). The
  gate vector is sown into ``"intermediates"`` as ``<scope>/gate_vector`` (the last
  call's value, not a tuple); read it with :func:`jaxprune.nn.gate_vectors`. Params:
  ``kernel (C, C)``, ``bias (C,)``, as in the NNX gate. To fold it after training, use
  :func:`jaxprune.nn.ungate_params`, so place it where folding is exact: right after
  the producer, or after its BatchNorm and a ReLU-like activation.

  The gate depends on the batch, even with ``alpha = inf``: with BatchNorm running
  statistics (``use_running_average=True``) or a single image it can differ from the
  hard masks of a calibration pass. Apply the variables of :func:`freeze_gates` to
  multiply by those masks instead, so the gated model computes the folded one.

  Attributes:
    init_std: the FC kernel's init std; ``None`` follows the paper, :func:`fc_std`.
    param_dtype: the params' dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.nn import linen
    >>> gate = linen.Gate()
    >>> x = jnp.ones((2, 4, 4, 3))
    >>> variables = gate.init(jax.random.key(0), x, 1.0)
    >>> y, state = gate.apply(variables, x, 5.0, mutable=["intermediates"])
    >>> y.shape, state["intermediates"]["gate_vector"].shape
    ((2, 4, 4, 3), (3,))
  """

  init_std: float | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, alpha: Any) -> jax.Array:
    features = x.shape[-1]
    std = fc_std(features) if self.init_std is None else float(self.init_std)
    kernel = self.param(
      "kernel", nn.initializers.normal(std), (features, features), self.param_dtype
    )
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    v = gate_vector(kernel, bias, x, alpha)
    if self.has_variable(FROZEN, "mask"):
      mask = jnp.asarray(self.get_variable(FROZEN, "mask"))
      if mask.shape != v.shape:
        raise ValueError(
          f"The frozen mask of the gate {'/'.join(self.scope.path if self.scope else ())!r} "
          "has shape "
          f"{mask.shape}; the gate has {v.shape}."
        )
      v = mask.astype(v.dtype)
    self.sow(
      "intermediates",
      "gate_vector",
      v.astype(jnp.float32),
      init_fn=lambda: jnp.zeros((), jnp.float32),
      reduce_fn=lambda _, new: new,
    )
    return x * v.astype(x.dtype)


def freeze_gates(variables: Mapping[str, Any], masks: Mapping[str, Any]) -> dict[str, Any]:
  """``variables`` plus the frozen gates: apply them and each gate multiplies by its mask.

  The Linen counterpart of :func:`jaxprune.nn.freeze_gates`: returns a copy of
  ``variables`` with a ``"gate_masks"`` collection holding ``masks[path]`` (as 0/1) at
  each gate's scope, so ``model.apply(frozen, x, alpha)`` equals the model without
  gates applied to the params of :func:`jaxprune.nn.ungate_params`, on any batch. Drop
  the ``"gate_masks"`` entry to make the gates live again.

  Args:
    variables: the model's variables (``{"params": ..., "batch_stats": ...}``).
    masks: ``{gate path: (C,) bool}`` (``/``-joined scope names, e.g. ``"gate1"``), as
      from :func:`jaxprune.nn.hard_masks` of a calibration pass (which lists every
      gate). A gate left out stays live.

  Raises:
    ValueError: for a path without a gate's ``(C, C)`` kernel, or a mask of another
      length.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.nn import linen
    >>> variables = linen.Gate().init(jax.random.key(0), jnp.ones((1, 3)), 1.0)
    >>> frozen = linen.freeze_gates(variables, {"": jnp.array([True, False, True])})
    >>> linen.Gate().apply(frozen, jnp.ones((1, 3)), 1.0).tolist()
    [[1.0, 0.0, 1.0]]
  """
  flat: dict[str, Any] = traverse_util.flatten_dict(unfreeze(variables["params"]), sep="/")
  unknown = sorted(p for p in masks if f"{p}/kernel".lstrip("/") not in flat)
  if unknown:
    raise ValueError(f"No gate params under {unknown}; params: {sorted(flat)}.")
  shapes = {p: flat[f"{p}/kernel".lstrip("/")].shape for p in masks}
  for path, shape in shapes.items():
    keep = jnp.asarray(masks[path])
    if len(shape) != 2 or shape[0] != shape[1] or keep.shape != shape[:1]:
      raise ValueError(
        f"{path!r} is not a gate with {keep.shape[0] if keep.ndim else '?'} channels: its "
        f"kernel has shape {shape}, the mask {keep.shape}."
      )
  frozen = {
    f"{p}/mask".lstrip("/"): jnp.asarray(m).astype(bool).astype(jnp.float32)
    for p, m in masks.items()
  }
  return {**variables, FROZEN: traverse_util.unflatten_dict(frozen, sep="/")}
