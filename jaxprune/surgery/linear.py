"""The linear layers of a traced model and which axes of their weights are inputs.

A linear layer here is a param read by one or more ``dot_general`` equations of the
forward pass (:func:`jaxprune.surgery.capture.param_consumers`): Dense / Linear,
LinearGeneral and einsum projections, matched by the param's exact path. Its *input
axes* are the weight axes that the dot contracts with the layer input, found from the
traced equation (through dtype casts and transposes of the weight), never from a
layout we assume: axis 0 of a Flax ``[in, out]`` kernel, axis 1 of a PyTorch-layout
``[out, in]`` weight read as ``einsum("bf,df->bd")``, axes ``(n, h)`` of an attention
output weight ``einsum("btnh,nhd->btd")``.

Every user of that answer (Wanda, SparseGPT, N:M groups, FLAP scores and compensation)
sees a weight as the matrix ``[n_in, n_out]`` of :meth:`Layer.as_matrix`: the input
axes, then the output axes, each kept in **the weight's own axis order**, flattened. Row
``j`` is input feature ``j`` of the layer's statistics (collected in the same order),
and ``m`` consecutive rows are ``m`` consecutive entries of the weight's input axes in
its memory order, which is what N:M hardware needs. Convolutions are not handled here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune.surgery import capture

_SAME = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One linear layer of the traced program.

  Attributes:
    path: the weight's exact path in the traced variables.
    shape: the weight's shape.
    in_axes: the weight axes contracted with the layer input, in increasing order (the
      weight's own order): the input features are these axes flattened row-major.
    sites: the ``dot_general`` equations that read the weight (one per use).
    inputs: per site, which operand of the dot is the layer input (0 or 1) and that
      operand's contracted axes, paired one to one with ``in_axes``.
  """

  path: str
  shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  sites: tuple[capture.Site, ...]
  inputs: tuple[tuple[int, tuple[int, ...]], ...]

  @property
  def n_in(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def in_shape(self) -> tuple[int, ...]:
    """The sizes of the input axes: input feature ``j`` is ``np.unravel_index(j, in_shape)``."""
    return tuple(self.shape[a] for a in self.in_axes)

  @property
  def out_axes(self) -> tuple[int, ...]:
    """The other axes of the weight (its outputs), in increasing order."""
    return tuple(a for a in range(len(self.shape)) if a not in self.in_axes)

  def as_matrix(self, weight: Any) -> Any:
    """The weight as ``[n_in, n_out]`` (input features are rows); NumPy stays NumPy."""
    xp = np if isinstance(weight, np.ndarray) else jnp
    return xp.transpose(weight, self.in_axes + self.out_axes).reshape(self.n_in, -1)

  def from_matrix(self, matrix: Any) -> Any:
    """Inverse of :meth:`as_matrix`: a ``[n_in, n_out]`` matrix back to the weight's shape."""
    xp = np if isinstance(matrix, np.ndarray) else jnp
    order = self.in_axes + self.out_axes
    x = xp.reshape(matrix, [self.shape[a] for a in order])
    return xp.transpose(x, [order.index(a) for a in range(len(self.shape))])

  def feature(self, j: int) -> str:
    """Input feature ``j`` for a message: its index, and per input axis when several."""
    if len(self.in_axes) == 1:
      return f"input feature {j} (axis {self.in_axes[0]} of the weight)"
    where = tuple(int(i) for i in np.unravel_index(j, self.in_shape))
    return f"input feature {j} (index {where} along the weight's axes {self.in_axes})"

  def check_finite(self, values: Any, what: str) -> None:
    """Raises ``ValueError`` naming the layer and the first input feature whose entry of
    ``values`` (a statistic per input feature, e.g. ``sum_t X_tj^2``) is NaN or inf."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(values, np.float64).ravel()))
    if bad.size:
      raise ValueError(
        f"{what}: the calibration inputs of layer {self.path!r} contain NaN or inf, in "
        f"{self.feature(int(bad[0]))}; {bad.size} of its {self.n_in} input features are "
        "affected. Check the calibration batches (or the activations before this layer)."
      )


def _param_axes(
  the_flow: capture.Flow, producer: dict[int, capture.Node], value: int, ndim: int
) -> tuple[int, tuple[int, ...]] | None:
  """``(leaf, perm)``: ``value`` is param leaf ``leaf``, its axis ``k`` the leaf's ``perm[k]``.

  Follows dtype casts and transposes back to the param; ``None`` through anything else.
  """
  perm = tuple(range(ndim))
  while True:
    source = the_flow.params.get(value)
    if source is None:
      return None
    if value == source.leaf:
      return source.leaf, perm
    node = producer[value]
    if node.primitive == "transpose":
      step = tuple(node.eqn.params["permutation"])
      perm = tuple(step[p] for p in perm)
    elif node.primitive not in _SAME:
      return None
    if node.ins[0] is None:  # a literal operand: not a param
      return None
    value = node.ins[0]


def linear_layers(traced: capture.Traced) -> dict[str, Layer | str]:
  """``{path: Layer}`` for every param read by a ``dot_general``, in program order.

  A param whose reads cannot be described as one linear layer maps to a string saying
  why (read by a convolution, through a reshape, with batch dimensions, or with
  different input axes at different reads).
  """
  the_flow = capture.flow(traced)
  shapes = {i: tuple(v.aval.shape) for i, v in enumerate(traced.jaxpr.jaxpr.invars)}
  producer = {o: n for n in the_flow.nodes for o in n.outs}
  found: dict[str, dict[str, Any]] = {}
  problems: dict[str, str] = {}
  for c in capture.param_consumers(traced, the_flow):
    if c.path in problems:
      continue
    if c.node.primitive != "dot_general":
      problems[c.path] = (
        "it is read by a convolution (post-training pruning handles dot_general layers)"
      )
      continue
    operand = c.node.ins[c.operand]
    ndim = len(c.node.eqn.invars[c.operand].aval.shape)
    located = _param_axes(the_flow, producer, operand, ndim) if operand is not None else None
    if located is None or len(located[1]) != len(shapes[located[0]]):
      problems[c.path] = "the dot reads it through a reshape or broadcast"
      continue
    leaf, perm = located
    (lc, rc), (lb, rb) = c.node.eqn.params["dimension_numbers"]
    w_contract, x_contract = (rc, lc) if c.operand == 1 else (lc, rc)
    if lb or rb:
      problems[c.path] = "the dot that reads it has batch dimensions (one matrix per batch index)"
      continue
    # The dot may contract in any order (einsum "btnh,nhd" contracts (h, n)): pair each
    # weight axis with its input axis and sort by the weight's own axis order.
    paired = sorted(zip((perm[a] for a in w_contract), x_contract))
    in_axes = tuple(w for w, _ in paired)
    entry = found.setdefault(c.path, {"in_axes": in_axes, "sites": [], "inputs": []})
    if entry["in_axes"] != in_axes:
      problems[c.path] = (
        f"it is read with different input axes at different places ({entry['in_axes']} and "
        f"{in_axes})"
      )
      continue
    entry["sites"].append(c.node.site)
    entry["inputs"].append((1 - c.operand, tuple(x for _, x in paired)))
    entry["shape"] = shapes[leaf]
  out: dict[str, Layer | str] = {}
  for path, e in found.items():
    if path in problems:
      continue
    out[path] = Layer(path, e["shape"], e["in_axes"], tuple(e["sites"]), tuple(e["inputs"]))
  out.update(problems)
  return out
