"""Structured scores of heads and neurons: FLAP from calibration data, first-order Taylor.

* :func:`input_moments` runs the model on calibration batches (one trace per input
  shape, :func:`jaxprune.surgery.capture.evaluate`) and keeps the mean and variance of
  every input feature of every linear layer (:func:`jaxprune.surgery.linear.linear_layers`:
  the weight axes the traced ``dot_general`` contracts, e.g. an output projection's
  ``(heads, head_dim)``, or axis 1 of a PyTorch-layout ``[out, in]`` weight).
* :func:`flap_scores` (An et al. 2024): a channel's fluctuation ``Var(X_j) *
  ||W_j||^2`` (``W_j``: the weights that read input ``j``, a row of a Flax ``[in, out]``
  kernel, a column of an ``[out, in]`` one) summed over the inputs it is in every layer
  that reads it (an MLP neuron: its input of the down projection; a head: its inputs of
  the output projection), standardised per group (``(s - mean) / std``), so that
  ``channel_masks(..., scores=..., scope="global")`` ranks all groups of a kind on one
  scale. :func:`flap_compensate` adds the removed inputs' mean contribution
  ``sum_j E[X_j] W_j`` to those layers' biases.
* :func:`taylor_scores`: ``|w * g|`` summed over every array entry of the channel
  (Molchanov et al. 2019), from params and gradients of the same structure.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.surgery import capture
from jaxprune.surgery.linear import Layer, linear_layers
from jaxprune.surgery.planning import Group, Plan


@dataclasses.dataclass(frozen=True)
class Moments:
  """Mean and variance of each input feature of one linear layer, over calibration tokens.

  ``mean`` and ``var`` have the shape of the weight's input axes (``layer.in_shape``,
  in the weight's own axis order); ``axes`` are those axes.
  """

  mean: np.ndarray
  var: np.ndarray
  count: int
  layer: Layer

  @property
  def axes(self) -> tuple[int, ...]:
    return self.layer.in_axes


def input_moments(
  model: Any,
  batches: Iterable[Any],
  *,
  variables: Any = None,
  apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Moments]:
  """``{weight path: Moments}`` of the inputs of every linear layer over ``batches``.

  Args:
    model: an ``nnx.Module`` or a ``linen.Module`` (with ``variables``).
    batches: model inputs (an array, or a tuple for several inputs); a new shape traces
      the model again.
    variables: Linen variables.
    apply_kwargs: extra keyword arguments of the forward call.

  Returns:
    The statistics of each weight read by ``dot_general`` as one linear layer (a layer
    called more than once pools its calls), features in the weight's input axes.

  Raises:
    ValueError: no batches; NaN or inf among a layer's inputs (naming the layer and
      the input feature).
  """
  fn, state = capture.forward(model, variables, dict(apply_kwargs or {}))
  leaves = jax.tree.leaves(state)
  sums: dict[str, list] = {}
  layers: dict[str, Layer] = {}
  traces: dict[Any, tuple[capture.Traced, dict[capture.Site, tuple[Layer, int]]]] = {}
  for batch in batches:
    inputs = capture.as_inputs(batch)
    key = tuple((np.shape(x), str(jax.numpy.result_type(x))) for x in jax.tree.leaves(inputs))
    if key not in traces:
      traced = capture.trace(fn, state, *inputs)
      found = [v for v in linear_layers(traced).values() if isinstance(v, Layer)]
      traces[key] = (traced, {s: (v, k) for v in found for k, s in enumerate(v.sites)})
    traced, site_of = traces[key]
    _, records = capture.evaluate(traced, leaves, inputs, lambda site, eqn, s=site_of: site in s)
    for r in records:
      layer, k = site_of[r.site]
      operand, contracted = layer.inputs[k]
      x = np.asarray(r.ins[operand], np.float64)
      rest = [a for a in range(x.ndim) if a not in contracted]
      x = np.transpose(x, rest + list(contracted)).reshape(-1, *layer.in_shape)
      layers[layer.path] = layer
      s = sums.setdefault(layer.path, [0.0, 0.0, 0])
      s[0] = s[0] + x.sum(0)
      s[1] = s[1] + (x**2).sum(0)
      s[2] += x.shape[0]
  if not traces:
    raise ValueError("input_moments: no calibration batches given.")
  out = {}
  for path, (total, squares, n) in sums.items():
    layers[path].check_finite(squares, "input_moments")
    mean = total / n
    out[path] = Moments(mean, np.maximum(squares / n - mean**2, 0.0), n, layers[path])
  return out


def _readers(g: Group, stats: Mapping[str, Moments]) -> list[tuple[str, int]]:
  """The kernels reading the group's channels (not producing them) that have statistics."""
  return [
    (p, a) for p, a in g.members if (p, a) not in g.producers and p in stats and a in stats[p].axes
  ]


def _rows(stats: Moments, axis: int, idx: np.ndarray) -> np.ndarray:
  """Indices into the flattened input features of the kernel's entries ``idx`` along ``axis``."""
  shape = stats.mean.shape
  k = stats.axes.index(axis)
  grid = np.arange(int(np.prod(shape))).reshape(shape)
  return np.take(grid, idx, axis=k).ravel()


def flap_scores(plan: Plan, params: Any, stats: Mapping[str, Moments]) -> dict[str, np.ndarray]:
  """FLAP's standardised fluctuation of every channel of every prunable group.

  Args:
    plan: from :func:`jaxprune.surgery.plan`.
    params: the params (the readers' kernels).
    stats: from :func:`input_moments` on calibration data.

  Returns:
    ``{group name: per-channel score}``, standardised within each group; groups that
    no calibrated layer reads are left out.
  """
  values = {p: np.asarray(x, np.float64) for p, x in tree_lib.leaves_with_paths(params)}
  out = {}
  for g in plan.groups:
    readers = _readers(g, stats)
    if g.blocked or not readers:
      continue
    s = np.zeros(g.size)
    for path, axis in readers:
      st = stats[path]
      w2 = (st.layer.as_matrix(_lookup(values, path)) ** 2).sum(1)  # ||W_j||^2 per input j
      var = st.var.ravel()
      for j, chan in enumerate(g.channels):
        rows = _rows(st, axis, chan[(path, axis)])
        s[j] += float((var[rows] * w2[rows]).sum())
    std = s.std()
    out[g.name] = (s - s.mean()) / (std if std > 0 else 1.0)
  return out


def flap_compensate(
  plan: Plan, params: Any, stats: Mapping[str, Moments], remove: Mapping[str, Iterable[int]]
) -> Any:
  """``params`` with the removed channels' mean contribution added to the readers' biases.

  For a reader ``W`` of removed inputs ``J``: ``bias += sum_{j in J} E[X_j] W_j`` (FLAP's
  bias compensation; ``W_j`` the weights reading input ``j``, whichever axes the traced
  dot contracts). A reader without a bias (``MODULE/bias`` next to its weight, with one
  entry per output) is left as it is; a group of ``remove`` with no channel is a no-op.
  """
  # The sum of the removed channels' contributions per bias (0.0 until the first one).
  delta: collections.defaultdict[str, np.ndarray | float] = collections.defaultdict(lambda: 0.0)
  values = {p: np.asarray(x, np.float64) for p, x in tree_lib.leaves_with_paths(params)}
  groups = {g.name: g for g in plan.groups}
  for name, chans in remove.items():
    g = groups[name]
    chans = list(chans)
    if not chans:  # scope="global" often leaves a group untouched
      continue
    for path, axis in _readers(g, stats):
      st = stats[path]
      w = st.layer.as_matrix(_lookup(values, path))  # [n_in, n_out]
      rows = np.concatenate([_rows(st, axis, g.channels[j][(path, axis)]) for j in chans])
      bias = path.rsplit("/", 1)[0] + "/bias"
      b = _lookup(values, bias)
      if b is not None and b.size == w.shape[1]:
        delta[bias] = delta[bias] + st.mean.ravel()[rows] @ w[rows]

  def one(path, x):
    d = next((v for p, v in delta.items() if tree_lib.same_leaf(p, tree_lib.path_str(path))), None)
    if d is None:
      return x
    return (np.asarray(x) + np.reshape(d, np.shape(x))).astype(np.asarray(x).dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def taylor_scores(plan: Plan, params: Any, grads: Any) -> dict[str, np.ndarray]:
  """First-order Taylor importance ``sum |w * g|`` over every array entry of a channel.

  Args:
    plan: from :func:`jaxprune.surgery.plan`.
    params: the params.
    grads: the gradients of a loss (summed over calibration batches), same structure.

  Returns:
    ``{group name: per-channel score}`` of the prunable groups.
  """
  w = {p: np.asarray(x, np.float64) for p, x in tree_lib.leaves_with_paths(params)}
  g_ = {p: np.asarray(x, np.float64) for p, x in tree_lib.leaves_with_paths(grads)}
  out = {}
  for g in plan.groups:
    if g.blocked:
      continue
    s = np.zeros(g.size)
    for path, axis in g.members:
      a, b = _lookup(w, path), _lookup(g_, path)
      if a is None or b is None:
        continue
      saliency = np.abs(a * b)
      for j, chan in enumerate(g.channels):
        s[j] += float(np.take(saliency, chan[(path, axis)], axis=axis).sum())
    out[g.name] = s
  return out


def _lookup(values: dict[str, Any], path: str) -> Any:
  return next((x for p, x in values.items() if tree_lib.same_leaf(path, p)), None)
