"""Depth pruning (ShortGPT, Men et al. 2024): remove the blocks that change their input least.

Block Influence ``BI_i = 1 - mean_t cos(x_t, y_t)`` over calibration tokens ``t``, ``x`` the
block's input and ``y`` its output (hidden states of the dense model, one pass per block
from cached states, as :mod:`~jaxprune.posttrain.blockwise`). Removing the ``n`` blocks
of lowest BI gives a really shorter model (:func:`drop_blocks`): its blocks renumbered,
its layer count updated, nothing masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.posttrain import blockwise
from jaxprune.posttrain.calibration import check_batches

_LAYER_COUNTS = ("depth", "num_layers", "num_hidden_layers", "n_layers")


@jax.jit
def _cosine_sum(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum over tokens of cos(x_t, y_t), tokens)``, features on the last axis, float32."""
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  y = y.astype(jnp.float32).reshape(-1, y.shape[-1])
  dot = jnp.sum(x * y, axis=-1)
  norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
  cos = dot / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
  return jnp.sum(cos), jnp.int32(x.shape[0])


def block_influence(
  model: Any,
  batches: Iterable[Any],
  *,
  stack: blockwise.Stack | None = None,
  cache_bytes: float | None = None,
) -> np.ndarray:
  """ShortGPT's Block Influence of every block: ``1 - mean cos(input, output)`` per token.

  Args:
    model: an NNX model whose blocks are a sequence (:func:`~jaxprune.posttrain.stack_of`).
    batches: calibration batches (the model's inputs).
    stack: the model's :class:`~jaxprune.posttrain.Stack` (default: found by
      :func:`~jaxprune.posttrain.stack_of`).
    cache_bytes: the most bytes of hidden states kept on the device (else on the host).

  Returns:
    ``[L]`` float64: the influence of each block, in data-flow order (near 0: the block
    barely changes the residual stream).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import posttrain
    >>> from jaxprune.models.decoder import CharLM
    >>> model = CharLM(16, dim=16, depth=3, num_heads=2, num_kv_heads=1, mlp_dim=32,
    ...                rngs=nnx.Rngs(0))
    >>> bi = posttrain.block_influence(model, [jnp.ones((2, 8), int)])
    >>> bi.shape, bool(((bi >= 0) & (bi <= 2)).all())
    ((3,), True)
  """
  data = check_batches(batches, "block_influence")
  the_stack = stack or blockwise.stack_of(model)
  programs = blockwise.BlockPrograms(None, None)
  budget = blockwise.default_cache_bytes() if cache_bytes is None else cache_bytes
  hidden = blockwise.HiddenCache([the_stack.prefix(*inputs) for inputs in data], budget)
  out = []
  for block in the_stack.blocks:
    _, leaves, run = programs.of(block)
    total, count = 0.0, 0
    outputs = []
    for x in hidden.arrays:
      y = run(leaves, x)
      s, n = _cosine_sum(x, y)
      total, count = total + float(s), count + int(n)
      outputs.append(y)
    out.append(1.0 - total / count)
    hidden = blockwise.HiddenCache(outputs, budget)
  return np.asarray(out, np.float64)


def _updated_count(value: Any, n: int) -> Any:
  """``value`` (a config: dict, dataclass or object) with its layer count set to ``n``."""
  if isinstance(value, dict):
    return {k: (n if k in _LAYER_COUNTS else v) for k, v in value.items()}
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    fields = {f.name for f in dataclasses.fields(value)}
    return dataclasses.replace(value, **{k: n for k in _LAYER_COUNTS if k in fields})
  for k in _LAYER_COUNTS:
    if isinstance(getattr(value, k, None), int):
      setattr(value, k, n)
  return value


def drop_blocks(model: nnx.Module, indices: Sequence[int]) -> nnx.Module:
  """A copy of ``model`` without the blocks ``indices``: a shorter stack, renumbered.

  The model's blocks are its ``blocks`` (or ``layers``) attribute, a sequence of
  ``nnx.Module``; the copy holds the others in order (block ``5`` of a model without
  block ``2`` becomes ``blocks/4``). An integer ``depth`` / ``num_layers`` /
  ``num_hidden_layers`` / ``n_layers`` attribute of the model, or such a field of its
  ``config`` attribute (a dict, a dataclass or an object), is set to the new count.
  ``model`` is not changed.

  Args:
    model: the model (NNX).
    indices: the blocks to remove, e.g. ``np.argsort(block_influence(model, data))[:n]``.

  Raises:
    ValueError: no block sequence, an index out of range or repeated, or every block
      removed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import posttrain
    >>> from jaxprune.models.decoder import CharLM
    >>> model = CharLM(16, dim=16, depth=4, num_heads=2, num_kv_heads=1, mlp_dim=32,
    ...                rngs=nnx.Rngs(0))
    >>> short = posttrain.drop_blocks(model, [1, 2])
    >>> len(short.blocks), short(jnp.ones((1, 5), int)).shape
    (2, (1, 5, 16))
  """
  found = blockwise.attribute(model, blockwise.BLOCK_ATTRIBUTES)
  name = type(model).__name__
  if found is None or not all(isinstance(b, nnx.Module) for b in found[1]):
    raise ValueError(
      f"drop_blocks: {name} has no attribute {' or '.join(blockwise.BLOCK_ATTRIBUTES)} holding "
      "a sequence of nnx.Modules."
    )
  attr, blocks = found
  n = len(blocks)
  chosen = [int(i) for i in indices]
  bad = [i for i in chosen if not 0 <= i < n]
  if bad or len(set(chosen)) != len(chosen):
    raise ValueError(
      f"drop_blocks: indices {chosen} must be distinct blocks of {name}, 0..{n - 1}."
    )
  if len(chosen) == n:
    raise ValueError(f"drop_blocks: removing all {n} blocks of {name} leaves no model.")
  new = nnx.clone(model)
  kept = [b for i, b in enumerate(getattr(new, attr)) if i not in set(chosen)]
  setattr(new, attr, nnx.List(kept))
  count = n - len(chosen)
  for k in _LAYER_COUNTS:
    if isinstance(getattr(new, k, None), int) and not isinstance(getattr(new, k), bool):
      setattr(new, k, count)
  config = getattr(new, "config", None)
  if config is not None:
    setattr(new, "config", _updated_count(config, count))  # noqa: B010
  return new
