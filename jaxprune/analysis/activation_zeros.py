"""APoZ (Hu et al. 2016): the average percentage of zeros of each ReLU output unit.

A unit (a Dense neuron, a conv channel) whose ReLU output is almost always zero on
validation data contributes little; Network Trimming prunes the units with the highest
APoZ and fine-tunes.

Activations are named by the path of the layer that computes them: the path its params
have, without the leaf name (``"fc1"`` for ``fc1/kernel`` of an NNX model, ``"Dense_0"``
or ``"Block_0/Conv_1"`` for Linen). :func:`apoz` intercepts the ``__call__`` of every
layer whose path matches ``layers`` (regular expressions searched in the path, as in
``where=``: ``"Block_0"`` also matches ``"Block_0/Dense_0"``, ``"^Block_0$"`` does not),
applies ``activation`` (ReLU) to the layer's output and counts exact zeros per unit of
the last axis. Nothing in the model is rewritten and no ``sow`` call is needed: an NNX
model is traced through :mod:`jaxprune.surgery.capture`, which marks the outputs of
the chosen module instances of a private copy (no class is patched, so other threads
and models are untouched); a Linen model through Flax's ``capture_intermediates``.
Naming a layer whose output already went through a ReLU works too (ReLU is idempotent).
For ``conv -> BatchNorm -> relu`` name the norm layer and tell :func:`apoz_masks` what
produces its channels: ``producers={"bn1": ("conv1", "bn1")}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxprune import tree as tree_lib
from jaxprune.select import check_keeps_some, check_sparsity
from jaxprune.surgery import capture

Outputs = dict[str, list[Any]]


def apoz(
  model: Any,
  batches: Iterable[Any],
  layers: str | Sequence[str],
  *,
  variables: Any = None,
  activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
  **call_kwargs: Any,
) -> dict[str, np.ndarray]:
  """Average percentage of zeros of every unit of the named layers' activations.

  For each layer whose path matches ``layers``, its output ``y`` (shape ``(..., C)``,
  Flax's channels-last layout) goes through ``activation`` and, per unit ``c``, APoZ is
  ``#(activation(y)[..., c] == 0) / #positions``, counted over every example of every
  batch and, for conv feature maps, every spatial position (N, H, W). Counts are exact
  integers; the forward pass runs under ``jax.jit`` (compiled once per batch shape).

  Args:
    model: an NNX module (in eval mode: ``model.eval()``) or a Linen module (then pass
      ``variables``).
    batches: the model inputs, one array per batch (for ``(x, y)`` pairs pass
      ``(x for x, _ in data)``).
    layers: regular expressions searched in the layer paths (``"fc1"``, ``"conv"``,
      ``["^fc1$", "^fc2$"]``). A layer called several times counts every call.
    variables: the Linen variables (``{"params": ...}``, plus ``batch_stats``, ...).
    activation: applied to each layer output before zeros are counted.
    **call_kwargs: passed to every model call (``train=False`` for a Linen module).

  Returns:
    ``{layer path: APoZ of each unit}`` (float64 arrays in ``[0, 1]``) in natural path
    order.

  Raises:
    ValueError: when no layer matches (the message lists the model's layers), a matched
      layer does not return one array, or ``batches`` is empty.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.analysis import apoz
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc1 = nnx.Linear(1, 2, use_bias=False, rngs=rngs)
    ...     self.fc2 = nnx.Linear(2, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.fc2(nnx.relu(self.fc1(x)))
    >>> model = MLP(nnx.Rngs(0))
    >>> model.fc1.kernel[...] = jnp.array([[1., -1.]])
    >>> apoz(model, [jnp.array([[1.], [2.], [-3.], [4.]])], "fc1")["fc1"].tolist()
    [0.25, 0.75]
  """
  patterns = (layers,) if isinstance(layers, str) else tuple(layers)
  if not patterns:
    raise ValueError("`layers` is empty: name at least one layer (a regex over layer paths).")
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"layers: {pattern!r} is not a valid regular expression ({e}).") from e

  def selected(path: str) -> bool:
    return bool(path) and tree_lib.matches(patterns, path)

  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError(
        "A Linen module needs its variables: apoz(module, batches, layers, variables=...)."
      )
    run, state, available = _linen_runner(model, variables, selected, call_kwargs)
  elif isinstance(model, nnx.Module):
    if variables is not None:
      raise TypeError("`variables=` is for Linen modules; an NNX module carries its own state.")
    run, state, available = _nnx_runner(model, selected, call_kwargs)
  else:
    raise TypeError(f"apoz() takes an NNX or a Linen module, got {type(model).__name__}.")
  no_match = ValueError(
    f"layers: {list(patterns)} matches none of the model's layers: {available}."
  )
  if isinstance(model, nnx.Module) and not any(selected(layer) for layer in available):
    raise no_match  # (a Linen module's layers are known once it runs)

  @jax.jit
  def count(state, x):
    return {path: _zero_counts(path, outs, activation) for path, outs in run(state, x).items()}

  zeros: dict[str, np.ndarray] = {}
  positions: dict[str, int] = {}
  n_batches = 0
  for x in batches:
    n_batches += 1
    for path, (z, n) in jax.device_get(count(state, x)).items():
      zeros[path] = zeros.get(path, 0) + np.asarray(z, np.int64)
      positions[path] = positions.get(path, 0) + int(n)
  if not zeros and n_batches:
    raise no_match
  if not zeros:
    raise ValueError(
      "`batches` is empty: pass an iterable of input batches (it may be used up, e.g. a "
      "generator read before)."
    )
  return {p: zeros[p] / positions[p] for p in sorted(zeros, key=tree_lib.natural_key)}


def _zero_counts(
  path: str, outputs: list[Any], activation: Callable[[jax.Array], jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Zeros per unit of the last axis and positions per unit, summed over the calls."""
  zeros, positions = jnp.zeros((), jnp.int32), 0
  for y in outputs:
    if not isinstance(y, jax.Array) or y.ndim < 1:
      raise ValueError(_not_one_array(path, type(y).__name__))
    a = activation(y)
    zeros = zeros + jnp.sum(a == 0, axis=tuple(range(a.ndim - 1)), dtype=jnp.int32)
    positions = positions + a.size // a.shape[-1]
  return zeros, jnp.asarray(positions, jnp.int32)


def _linen_runner(
  module: nn.Module, variables: Any, selected: Callable[[str], bool], call_kwargs: dict
) -> tuple[Callable[[Any, Any], Outputs], Any, list[str]]:
  """Outputs of the selected submodules' ``__call__`` via ``capture_intermediates``."""

  def keep(mdl: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and selected("/".join(map(str, mdl.path)))

  def run(variables, x):
    _, state = module.apply(
      variables, x, capture_intermediates=keep, mutable=["intermediates"], **call_kwargs
    )
    outputs: Outputs = {}
    for path, y in tree_lib.leaves_with_paths(state.get("intermediates", {})):
      layer, _, call = path.rpartition("/__call__/")
      if "/" in call:
        raise ValueError(f"Layer {layer!r} returns several arrays; name a layer that returns one.")
      outputs.setdefault(layer, []).append(y)
    return outputs

  params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
  layers = sorted({p.rpartition("/")[0] for p, _ in tree_lib.leaves_with_paths(params)})
  return run, variables, layers


def _nnx_runner(
  model: nnx.Module, selected: Callable[[str], bool], call_kwargs: dict
) -> tuple[Callable[[Any, Any], Outputs], Any, list[str]]:
  """Outputs of the selected submodules' ``__call__``, marked in the traced program."""
  graphdef, state = nnx.split(model)
  modules = _submodules(model)

  def forward(state, x):
    merged = nnx.merge(graphdef, state)
    capture.mark_outputs({p: m for p, m in _submodules(merged) if selected(p)})
    return merged(x, **call_kwargs)

  def run(state, x):
    traced = capture.trace(forward, state, x)
    for mark in traced.marks:
      if mark.returned is not None:
        raise ValueError(_not_one_array(mark.path, mark.returned))
    return capture.marked_outputs(traced, jax.tree.leaves(state), [x])

  return run, state, [p for p, _ in modules if p]


def _not_one_array(path: str, returned: str) -> str:
  return (
    f"Layer {path!r} returned {returned}, not one array of shape (..., units); "
    "name the layer whose output feeds the ReLU."
  )


def _submodules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  return [
    ("/".join(map(str, path)), m)
    for path, m in nnx.iter_graph(model)
    if isinstance(m, nnx.Module) and callable(m)
  ]


def apoz_masks(
  params: Any,
  apoz_values: Mapping[str, Any],
  sparsity: float,
  *,
  overrides: Mapping[str, float] | None = None,
  producers: Mapping[str, str | Sequence[str]] | None = None,
) -> Any:
  """Masks that remove the units with the highest APoZ from the layers that produce them.

  In each layer of ``apoz_values``, ``round(sparsity * C)`` of its ``C`` units are
  pruned, highest APoZ first (ties: the higher index goes first); a sparsity that would
  remove every unit of a layer (0.9 of 4 units: ``round(3.6) = 4``) is a ``ValueError``,
  as in the pruners. A unit is removed from its producers: in every producer layer,
  every param whose last axis has ``C`` entries (the kernel's output axis, the bias, a
  norm's scale and bias) loses that entry.

  Args:
    params: the params pytree (``nnx.state(model, nnx.Param)``, Linen
      ``variables["params"]``).
    apoz_values: ``{layer path: APoZ per unit}``, as :func:`apoz` returns.
    sparsity: the fraction of units removed per layer, in ``[0, 1)``.
    overrides: ``{regex over layer paths: sparsity}``; the first match wins.
    producers: ``{layer path: producer path(s)}`` when the activation is not the output
      of the layer that owns the params (``{"bn1": ("conv1", "bn1")}``); by default a
      layer is its own producer.

  Returns:
    A mask pytree with the structure of ``params``: bool arrays for the producers'
    params (``True`` = kept), ``None`` for every other leaf.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxprune.analysis import apoz_masks
    >>> params = {"fc1": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)},
    ...           "fc2": {"kernel": jnp.ones((4, 1)), "bias": jnp.ones(1)}}
    >>> m = apoz_masks(params, {"fc1": np.array([0.1, 0.9, 0.2, 1.0])}, 0.5)
    >>> m["fc1"]["bias"].tolist(), m["fc2"]["kernel"] is None
    ([True, False, True, False], True)
  """
  check_sparsity(sparsity)
  if not apoz_values:
    raise ValueError("`apoz_values` is empty: pass {layer path: APoZ per unit}, from apoz().")
  overrides = dict(overrides or {})
  producers = dict(producers or {})
  for pattern, value in overrides.items():
    check_sparsity(value, f"override sparsity for {pattern!r}")
    if not any(tree_lib.matches(pattern, layer) for layer in apoz_values):
      raise ValueError(f"The override {pattern!r} matches no layer of {list(apoz_values)}.")
  for layer in producers:
    if layer not in apoz_values:
      raise ValueError(f"producers names {layer!r}, which has no APoZ values: {list(apoz_values)}.")

  leaves = tree_lib.leaves_with_paths(params)
  kept: dict[str, np.ndarray] = {}
  for layer, values in apoz_values.items():
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
      raise ValueError(
        f"APoZ values of {layer!r} must be one number per unit, got shape {values.shape}."
      )
    s = next((v for p, v in overrides.items() if tree_lib.matches(p, layer)), sparsity)
    check_keeps_some(values.size, s, repr(layer), "units")
    keep = _keep_lowest(values, s)
    owners = producers.get(layer, layer)
    for owner in (owners,) if isinstance(owners, str) else owners:
      hits = [
        (path, leaf)
        for path, leaf in leaves
        if path.rpartition("/")[0] == owner and np.shape(leaf)[-1:] == (values.size,)
      ]
      if not hits:
        raise ValueError(
          f"No param of layer {owner!r} has {values.size} units on its last axis "
          f"(params: {[p for p, _ in leaves]}). Pass the params tree (not the full "
          "variables) or set producers= for this layer."
        )
      for path, leaf in hits:
        mask = np.broadcast_to(keep, np.shape(leaf))
        kept[path] = mask & kept[path] if path in kept else mask

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = [kept.get(tree_lib.path_str(k)) for k, _ in flat]
  return jax.tree.unflatten(treedef, [None if m is None else jnp.asarray(m) for m in out])


def _keep_lowest(values: np.ndarray, sparsity: float) -> np.ndarray:
  """Keeps all but the ``round(sparsity * n)`` highest values (ties: higher index pruned)."""
  n_prune = int(np.round(sparsity * values.size))
  order = np.lexsort((-np.arange(values.size), -values))  # highest value, then highest index
  keep = np.ones(values.size, bool)
  keep[order[:n_prune]] = False
  return keep
