"""The AutoPruner gate as a Flax Linen module (same numbers as the NNX :class:`Gate`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.nn.autopruner import fc_std, gate_vector


class Gate(nn.Module):
  """The AutoPruner branch for Linen: pool -> FC -> ``sigmoid(alpha * .)``, times the input.

  ``alpha`` is a call argument (pass the traced schedule value: no recompilation). The
  gate vector is sown into ``"intermediates"`` as ``<scope>/gate_vector`` (the last
  call's value, not a tuple); read it with :func:`jaxprune.nn.gate_vectors`. Params:
  ``kernel (C, C)``, ``bias (C,)``, as in the NNX gate. To fold it after training, use
  :func:`jaxprune.nn.ungate_params`, so place it where folding is exact: right after
  the producer, or after its BatchNorm and a ReLU-like activation.

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
    self.sow(
      "intermediates",
      "gate_vector",
      v.astype(jnp.float32),
      init_fn=lambda: None,
      reduce_fn=lambda _, new: new,
    )
    return x * v.astype(x.dtype)
