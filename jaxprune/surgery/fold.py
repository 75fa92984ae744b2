"""Folding BatchNorm into the preceding conv or Dense layer, for inference.

In eval mode a BatchNorm is a per-channel affine map of its input,
``y * a + b`` with ``a = scale / sqrt(var + eps)`` and ``b = bias - mean * a``. When its
input is the output of a conv (or Dense) layer that nothing else reads, the map can be
moved into that layer: ``kernel * a`` (over the output axis) and ``bias * a + b``. The
BatchNorm then becomes the identity, and a network of conv-BN-ReLU layers runs as
conv-ReLU: one pass over each feature map fewer, which matters most for small models
whose time is spent as much in elementwise ops as in convolutions.

The pairs are found in the model's program, traced once from shapes
(:mod:`jaxprune.surgery.capture`): a BatchNorm is folded when the array it normalises
(the one its running mean is subtracted from) is the output of a
:class:`flax.nnx.Conv` or :class:`flax.nnx.Linear` (its kernel's dot or conv, plus its
bias) and used by nothing else. Other BatchNorms stay as they are. Nothing is patched:
the modules are matched to the program by the exact paths of their params.
"""

from __future__ import annotations

from typing import Any, TypeGuard, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.surgery import capture
from jaxprune.surgery import check as check_lib


class FoldedBatchNorm(nnx.Module):
  """What a folded BatchNorm becomes: the identity (its affine map is in the layer before).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.surgery.fold import FoldedBatchNorm
    >>> FoldedBatchNorm(4)(jnp.ones((1, 4))).tolist()
    [[1.0, 1.0, 1.0, 1.0]]
  """

  def __init__(self, num_features: int):
    self.num_features = num_features

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    del args, kwargs
    return x


_M = TypeVar("_M", bound=nnx.Module)


def _plain(mod: Any, base: type[_M]) -> TypeGuard[_M]:
  """``mod`` is a ``base`` whose ``__call__`` is ``base``'s own (not overridden)."""
  return isinstance(mod, base) and type(mod).__call__ is base.__call__


def _layer(path: str) -> tuple[str, str]:
  """``("conv1", "kernel")`` for ``"conv1/kernel"``."""
  layer, _, leaf = path.rpartition("/")
  return layer, leaf


def _pairs(traced: capture.Traced) -> list[tuple[str, str, int]]:
  """``(layer, BatchNorm, ndim)`` where the norm's input is the layer's output, read once.

  A layer's output is its kernel's dot/conv (the kernel its rhs), plus its own bias
  when that sum is the dot's only reader; a norm's input is what its running mean is
  subtracted from. Each kernel and mean must be read by one equation only (the layer
  and the norm are called once).
  """
  flow = capture.flow(traced)
  path_of = {v: traced.paths[p.leaf] for v, p in flow.params.items()}
  reads = {traced.paths[leaf]: n for leaf, n in flow.param_reads.items()}
  output_of: dict[int, str] = {}  # value -> the layer whose output it is
  found = []
  for node in flow.nodes:
    name, ins = node.primitive, node.ins
    if name in capture.LINEAR and ins[1] in flow.params and flow.params[ins[1]].same_axes:
      layer, leaf = _layer(path_of[ins[1]])
      if leaf == "kernel" and ins[0] not in flow.params:
        output_of[node.outs[0]] = layer
    elif name == "add" and len(ins) == 2:
      for a, b in (ins, ins[::-1]):
        if a is None or b is None:
          continue
        layer = output_of.get(a)
        if layer is not None and path_of.get(b) == f"{layer}/bias" and flow.uses[a] == 1:
          output_of[node.outs[0]] = layer
    elif name == "sub" and len(ins) == 2 and ins[1] in path_of:
      norm, leaf = _layer(path_of[ins[1]])
      x = ins[0]
      layer = None if x is None else output_of.get(x)
      if leaf != "mean" or x is None or layer is None or flow.uses[x] != 1:
        continue
      if reads.get(f"{layer}/kernel") == 1 and reads.get(f"{norm}/mean") == 1:
        found.append((layer, norm, len(node.eqn.invars[0].aval.shape)))
  return found


def batchnorm_pairs(model: nnx.Module, example_input: Any) -> list[tuple[str, str]]:
  """``[(layer path, BatchNorm path)]``: the BatchNorms :func:`fold_batchnorm` folds.

  A BatchNorm is paired with the conv or Dense layer whose output it normalises when
  nothing else reads that output, each is called once per forward pass, the BatchNorm
  normalises the last axis and uses its running statistics.

  Args:
    model: an ``nnx.Module``.
    example_input: an array or ``jax.ShapeDtypeStruct`` (a tuple for several inputs).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.surgery import batchnorm_pairs
    >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)), nnx.relu)
    >>> batchnorm_pairs(model, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    [('layers/0', 'layers/1')]
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"fold_batchnorm takes a flax nnx.Module, got {type(model).__name__} (for Linen, "
      "fold in the variables and drop the BatchNorm from the module definition)."
    )
  if example_input is None:
    raise ValueError("batchnorm_pairs() needs an example_input (an array or ShapeDtypeStruct).")
  inputs = capture.as_inputs(example_input)
  specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in inputs]
  fn, state = capture.forward(model, None, {})
  try:
    traced = capture.trace(fn, state, *specs)
  except (TypeError, ValueError) as e:
    raise check_lib.example_input_error("batchnorm_pairs", inputs, e) from e
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  pairs = []
  for layer_path, bn_path, ndim in _pairs(traced):
    layer, bn = modules.get(layer_path), modules.get(bn_path)
    if not _plain(bn, nnx.BatchNorm) or not (_plain(layer, nnx.Conv) or _plain(layer, nnx.Linear)):
      continue
    if bn.axis not in (-1, ndim - 1):
      continue
    out = layer.kernel.get_value().shape[-1]
    if bn.mean.get_value().shape != (out,):
      continue
    pairs.append((layer_path, bn_path))
  return pairs


def _module_at(model: nnx.Module, path: str) -> tuple[Any, str | int]:
  """The parent of the module at ``path`` and its key in the parent."""
  parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split("/")]
  parent: Any = model
  for p in parts[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  return parent, parts[-1]


def _get(model: nnx.Module, path: str) -> Any:
  parent, key = _module_at(model, path)
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def fold_batchnorm(
  model: nnx.Module,
  example_input: Any,
  *,
  verify: bool = True,
  rtol: float = 1e-5,
  seed: int = 0,
) -> nnx.Module:
  """An equivalent inference model with each BatchNorm folded into the layer before it.

  Every pair that :func:`batchnorm_pairs` finds is folded: the layer's kernel is scaled
  per output channel by ``scale / sqrt(var + eps)``, its bias (added if it had none)
  becomes ``bias * a + beta - mean * a``, and the BatchNorm is replaced by a
  :class:`FoldedBatchNorm` (the identity). The result computes what ``model`` computes
  in eval mode (with the running statistics); it cannot be trained as before. ``model``
  itself is not changed.

  Args:
    model: an ``nnx.Module`` (conv/Dense followed by ``nnx.BatchNorm``).
    example_input: an input array or ``jax.ShapeDtypeStruct`` (batch axis first).
    verify: run both models in eval mode on random inputs and raise if they differ.
    rtol: tolerance of that check, relative to the largest output magnitude.
    seed: seeds the random inputs of the check.

  Returns:
    A new ``nnx.Module`` in eval mode.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)), nnx.relu)
    >>> folded = surgery.fold_batchnorm(model, jnp.ones((1, 8, 8, 3)))
    >>> type(folded.layers[1]).__name__, folded.layers[0].bias.shape
    ('FoldedBatchNorm', (4,))
  """
  pairs = batchnorm_pairs(model, example_input)
  folded = nnx.clone(model)
  folded.eval()
  for layer_path, bn_path in pairs:
    layer, bn = _get(folded, layer_path), _get(folded, bn_path)
    mean = np.asarray(bn.mean.get_value(), np.float64)
    var = np.asarray(bn.var.get_value(), np.float64)
    scale = np.ones_like(mean) if bn.scale is None else np.asarray(bn.scale.get_value(), np.float64)
    beta = np.zeros_like(mean) if bn.bias is None else np.asarray(bn.bias.get_value(), np.float64)
    a = scale / np.sqrt(var + bn.epsilon)
    kernel = layer.kernel.get_value()
    new_kernel = np.asarray(kernel, np.float64) * a
    old_bias = np.zeros_like(mean) if layer.bias is None else np.asarray(layer.bias.get_value())
    new_bias = old_bias * a + beta - mean * a
    layer.kernel.set_value(jnp.asarray(new_kernel, kernel.dtype))
    if layer.bias is None:
      layer.bias = nnx.Param(jnp.asarray(new_bias, kernel.dtype))
      layer.use_bias = True
    else:
      layer.bias.set_value(jnp.asarray(new_bias, layer.bias.get_value().dtype))
    parent, key = _module_at(folded, bn_path)
    replacement = FoldedBatchNorm(int(mean.shape[0]))
    if isinstance(key, int):
      parent[key] = replacement
    else:
      setattr(parent, key, replacement)
  folded.eval()
  if verify and pairs:
    _check(model, folded, example_input, rtol, seed)
  return folded


def _check(model, folded, example_input, rtol: float, seed: int) -> None:
  inputs = capture.as_inputs(example_input)
  xs = check_lib.random_inputs(inputs, np.random.default_rng(seed + 1))
  reference = nnx.clone(model)
  reference.eval()
  check_lib.check_outputs(
    reference(*xs),
    folded(*xs),
    rtol,
    check="fold_batchnorm",
    model="folded model",
    reference="model",
  )
