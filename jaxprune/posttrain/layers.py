"""The linear layers of a traced model and the layout of their kernels.

A linear layer here is a param read by one or more ``dot_general`` equations of the
forward pass (:func:`jaxprune.surgery.capture.param_consumers`): Dense / Linear,
LinearGeneral and einsum projections, matched by the param's exact path. Its *input
axes* are the kernel axes the dot contracts with the layer input (axis 0 of a Flax
``[in, out]`` kernel; every ``in`` axis of a LinearGeneral ``[in..., out...]`` kernel;
whatever axes an einsum contracts). Post-training methods see every kernel as a matrix
``[prod(input axes), prod(other axes)]``: rows are input features (flattened in the
order of ``in_axes``), columns are outputs. Convolutions are not handled here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from jaxprune.surgery import capture

_SAME = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One linear layer of the traced program.

  Attributes:
    path: the kernel's exact path in the traced variables.
    shape: the kernel's shape.
    in_axes: the kernel axes contracted with the layer input, in the order the input
      features are flattened.
    sites: the ``dot_general`` equations that read the kernel (one per use).
    inputs: per site, which operand of the dot is the layer input (0 or 1) and that
      operand's contracted axes (paired with ``in_axes``).
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
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.shape)) if a not in self.in_axes)

  def as_matrix(self, kernel: Any) -> Any:
    """The kernel as ``[n_in, n_out]`` (input features are rows)."""
    return jnp.transpose(kernel, self.in_axes + self.out_axes).reshape(self.n_in, -1)

  def from_matrix(self, matrix: Any) -> Any:
    """Inverse of :meth:`as_matrix`: a ``[n_in, n_out]`` matrix back to the kernel's shape."""
    order = self.in_axes + self.out_axes
    x = jnp.reshape(matrix, [self.shape[a] for a in order])
    return jnp.transpose(x, [order.index(a) for a in range(len(self.shape))])


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
    in_axes = tuple(perm[a] for a in w_contract)
    entry = found.setdefault(c.path, {"in_axes": in_axes, "sites": [], "inputs": []})
    if entry["in_axes"] != in_axes:
      problems[c.path] = (
        f"it is read with different input axes at different places ({entry['in_axes']} and "
        f"{in_axes})"
      )
      continue
    entry["sites"].append(c.node.site)
    entry["inputs"].append((1 - c.operand, tuple(x_contract)))
    entry["shape"] = shapes[leaf]
  out: dict[str, Layer | str] = {}
  for path, e in found.items():
    if path in problems:
      continue
    out[path] = Layer(path, e["shape"], e["in_axes"], tuple(e["sites"]), tuple(e["inputs"]))
  out.update(problems)
  return out
