"""Folding BatchNorm into the preceding conv or Dense layer, for inference.

In eval mode a BatchNorm is a per-channel affine map of its input,
``y * a + b`` with ``a = scale / sqrt(var + eps)`` and ``b = bias - mean * a``. When its
input is the output of a conv (or Dense) layer that nothing else reads, the map can be
moved into that layer: ``kernel * a`` (over the output axis) and ``bias * a + b``. The
BatchNorm then becomes the identity, and a network of conv-BN-ReLU layers runs as
conv-ReLU: one pass over each feature map fewer, which matters most for small models
whose time is spent as much in elementwise ops as in convolutions.

The pairs are found by tracing the model once (shapes only): a BatchNorm is folded
when the array it normalises is produced by a :class:`flax.nnx.Conv` or
:class:`flax.nnx.Linear` call and used by nothing else. Other BatchNorms stay as they
are. (During that trace the ``__call__`` of those three classes is wrapped, to mark
their inputs and outputs in the jaxpr: do not trace other models in other threads at
the same moment.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxprune.surgery import check as check_lib
from jaxprune.surgery.graph import CALLS

_PRODUCERS = (nnx.Conv, nnx.Linear)
_MARK = "jaxprune_fold"


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


@dataclasses.dataclass(frozen=True)
class _Call:
  path: str
  kind: str  # "producer" or "norm"
  mark: str
  ndim: int
  args: tuple
  kwargs: dict


def _plain(mod: Any, base: type) -> bool:
  """``mod`` is a ``base`` whose ``__call__`` is ``base``'s own (not overridden)."""
  return isinstance(mod, base) and type(mod).__call__ is base.__call__


@contextlib.contextmanager
def _recording(paths: dict[int, str], calls: list[_Call]) -> Iterator[None]:
  """Marks the outputs of conv/Dense calls and the inputs of BatchNorm calls in the jaxpr.

  The classes' ``__call__`` is swapped for the duration of one trace (shapes only), so
  tracing another model in another thread at the same time would be marked too.
  """
  originals = {cls: cls.__call__ for cls in (*_PRODUCERS, nnx.BatchNorm)}

  def producer(original):
    def call(self, x, *args, **kwargs):
      y = original(self, x, *args, **kwargs)
      if id(self) not in paths:
        return y
      mark = f"{_MARK}_{len(calls)}"
      calls.append(_Call(paths[id(self)], "producer", mark, jnp.ndim(y), args, kwargs))
      return checkpoint_name(y, mark)

    return call

  def norm(original):
    def call(self, x, *args, **kwargs):
      if id(self) in paths:
        mark = f"{_MARK}_{len(calls)}"
        calls.append(_Call(paths[id(self)], "norm", mark, jnp.ndim(x), args, kwargs))
        x = checkpoint_name(x, mark)
      return original(self, x, *args, **kwargs)

    return call

  try:
    for cls, original in originals.items():
      cls.__call__ = norm(original) if cls is nnx.BatchNorm else producer(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def _uses(jaxpr: Any) -> tuple[dict[Any, int], dict[str, Any], dict[str, Any]]:
  """Use counts of every variable, and the variables the marks name (outputs, inputs)."""
  uses: dict[Any, int] = {}
  marked_out: dict[str, Any] = {}
  marked_in: dict[str, Any] = {}

  def walk(jx):
    for eqn in jx.eqns:
      for v in eqn.invars:
        if hasattr(v, "count") or not hasattr(v, "val"):
          uses[v] = uses.get(v, 0) + 1
      if eqn.primitive.name == "name" and str(eqn.params.get("name", "")).startswith(_MARK):
        marked_out[eqn.params["name"]] = eqn.outvars[0]
        marked_in[eqn.params["name"]] = eqn.invars[0]
      if eqn.primitive.name in CALLS:
        p = eqn.params
        inner = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))
    for v in jx.outvars:
      if hasattr(v, "count") or not hasattr(v, "val"):
        uses[v] = uses.get(v, 0) + 1

  walk(jaxpr)
  return uses, marked_out, marked_in


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
  inputs = tuple(example_input) if isinstance(example_input, list | tuple) else (example_input,)
  specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in inputs]
  graphdef, state = nnx.split(model)
  calls: list[_Call] = []

  def foldable(mod):
    return _plain(mod, nnx.BatchNorm) or any(_plain(mod, c) for c in _PRODUCERS)

  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if foldable(m)}

  def fn(state, *xs):
    m = nnx.merge(graphdef, state)
    m.eval()
    paths = {id(mod): "/".join(map(str, p)) for p, mod in nnx.iter_modules(m) if foldable(mod)}
    with _recording(paths, calls):
      return m(*xs)

  try:
    closed = jax.make_jaxpr(fn)(state, *specs)
  except (TypeError, ValueError) as e:
    raise check_lib.example_input_error("batchnorm_pairs", inputs, e) from e
  uses, marked_out, marked_in = _uses(closed.jaxpr)
  producer_of = {marked_out[c.mark]: c for c in calls if c.kind == "producer"}
  count: dict[str, int] = {}
  for c in calls:
    count[c.path] = count.get(c.path, 0) + 1
  pairs = []
  for c in calls:
    if c.kind != "norm" or count[c.path] != 1:
      continue
    source = producer_of.get(marked_in[c.mark])
    if source is None or count[source.path] != 1 or uses.get(marked_in[c.mark], 0) != 1:
      continue
    bn = modules[c.path]
    explicit = c.kwargs.get("use_running_average", c.args[0] if c.args else None)
    if explicit is False or c.kwargs.get("mask") is not None:
      continue
    if bn.axis not in (-1, c.ndim - 1):
      continue
    layer = modules[source.path]
    out = layer.kernel.get_value().shape[-1]
    if bn.mean.get_value().shape != (out,):
      continue
    pairs.append((source.path, c.path))
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
  inputs = tuple(example_input) if isinstance(example_input, list | tuple) else (example_input,)
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
