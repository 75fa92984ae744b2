"""One traced forward pass and the values inside it, without patching any Flax class.

Everything that looks inside a model goes through here: the channel graph of
:func:`jaxprune.surgery.plan`, the constant folding of ``shrink``, the BatchNorm pairs
of ``fold_batchnorm``, APoZ's layer outputs, and calibration statistics of the inputs
of every linear layer.

* :func:`trace` runs ``jax.make_jaxpr`` once over ``fn(variables, *inputs)`` (shapes
  only), the variables flattened to leaves named by their exact paths.
* :func:`interpret` is the one walker of a jaxpr: it runs a rule over every primitive
  equation in order and goes into the sub-jaxprs of call-like equations (``pjit``,
  ``custom_jvp_call``, ``remat``, ...: :func:`call_jaxpr`) itself, so no caller looks
  them up.
* :func:`flow` gives the traced program as a flat dataflow (calls inlined): which value
  each equation reads and writes, how often each value is read, and which values are a
  param leaf (by exact path, through dtype casts, reshapes and broadcasts).
  :func:`param_consumers` lists the ``dot_general`` / ``conv_general_dilated``
  equations that read a param: the linear layers (Dense, Conv, LinearGeneral, einsum
  projections).
* :func:`evaluate` runs the jaxpr on values (eagerly or under ``jax.jit``) and records
  the inputs and outputs of chosen equations (a layer's input, its output).
* :func:`mark_outputs` (:mod:`jaxprune.surgery.marks`) marks the outputs of chosen NNX
  module instances in the trace, for statistics of a whole module's output (a
  conv-BN-ReLU block), without touching any class; :func:`marked_outputs` reads them.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.extend import core as jex_core

from jaxprune import tree as tree_lib
from jaxprune.surgery import marks as marks_lib
from jaxprune.surgery.marks import Mark
from jaxprune.surgery.marks import mark_outputs as mark_outputs  # one place to look

# Call-like primitives whose sub-jaxpr computes exactly their outputs from their last
# inputs: walked through, as if inlined.
CALLS = frozenset({
  "pjit", "jit", "closed_call", "core_call", "call", "remat", "remat2", "checkpoint",
  "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin",
})  # fmt: skip
LINEAR = ("dot_general", "conv_general_dilated")
# Ops through which a value is still "the param" (exact path): same axes, or not.
_SAME_AXES = {"convert_element_type", "copy", "copy_p", "reduce_precision"}
_RESHAPED = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims"}

Site = tuple[int, ...]  # an equation's index, then its index inside each call it is in


def call_jaxpr(eqn: Any) -> tuple[Any, list] | None:
  """The sub-jaxpr of a call-like equation and its consts, or ``None``.

  The sub-jaxpr's inputs are the equation's last ``len(jaxpr.invars)`` inputs, its
  outputs the equation's outputs.
  """
  if eqn.primitive.name not in CALLS:
    return None
  p = eqn.params
  inner = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
  if inner is None:
    return None
  return getattr(inner, "jaxpr", inner), list(getattr(inner, "consts", []))


def interpret(
  jaxpr: Any,
  args: Sequence[Any],
  rule: Callable[[Site, Any, list[Any]], Sequence[Any]],
  *,
  default: Callable[[Any], Any] | None = None,
  consts: Sequence[Any] = (),
  site: Site = (),
) -> list[Any]:
  """Runs ``rule(site, eqn, inputs) -> outputs`` over every primitive equation in order.

  Call-like equations (:func:`call_jaxpr`) are not given to ``rule``: their sub-jaxpr
  is interpreted in their place, on their inputs. With ``default=None`` the
  interpretation is concrete (literals read as their value, consts of sub-jaxprs as
  theirs); otherwise it is abstract and literals and consts read as ``default(var)``.

  Returns:
    The values of ``jaxpr``'s outputs.
  """
  env: dict[Any, Any] = {}
  concrete = default is None

  def read(v: Any) -> Any:
    if not isinstance(v, jex_core.Literal) and v in env:
      return env[v]
    if default is None:
      return v.val
    return default(v)

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [read(v) for v in eqn.invars]
    call = call_jaxpr(eqn)
    if call is None:
      outs = rule((*site, i), eqn, ins)
    else:
      inner, inner_consts = call
      outs = interpret(
        inner,
        ins[len(ins) - len(inner.invars) :],
        rule,
        default=default,
        consts=inner_consts if concrete else (),
        site=(*site, i),
      )
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass(frozen=True)
class Traced:
  """A forward pass traced once.

  Attributes:
    jaxpr: the ``ClosedJaxpr`` of ``fn`` over ``(leaves, *inputs)``.
    paths: the exact path of each leaf of the variables, in the jaxpr's input order.
    fn: ``(leaves, *inputs) -> outputs``, the traced function.
    marks: the module calls :func:`mark_outputs` marked, in call order.
  """

  jaxpr: Any
  paths: tuple[str, ...]
  fn: Callable[..., Any]
  marks: tuple[Mark, ...] = ()


def as_inputs(example_input: Any) -> tuple:
  """A model's positional inputs: a list or tuple as it is, anything else as one input."""
  return tuple(example_input) if isinstance(example_input, list | tuple) else (example_input,)


def trace(fn: Callable[..., Any], variables: Any, *inputs: Any) -> Traced:
  """Traces ``fn(variables, *inputs)`` from shapes (arrays, tracers or ShapeDtypeStructs).

  Raises:
    TypeError, ValueError: whatever the model raises on inputs of these shapes.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = tuple(tree_lib.path_str(p) for p, _ in flat)
  specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for _, x in flat]
  input_specs = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), inputs
  )

  def flat_fn(leaves, *inputs):
    return fn(jax.tree.unflatten(treedef, leaves), *inputs)

  with marks_lib.collecting() as marks:
    closed = jax.make_jaxpr(flat_fn)(specs, *input_specs)
  return Traced(closed, paths, flat_fn, tuple(marks))


def forward(model: Any, variables: Any, apply_kwargs: Mapping[str, Any]) -> tuple[Callable, Any]:
  """``(fn, variables)``: the eval-mode forward pass ``fn(variables, *inputs)`` of a model.

  For an NNX module ``variables`` is its state (``nnx.split``), merged back into a new
  module inside ``fn``; a Linen module is applied to the ``variables`` given.
  """
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)

    def fn(state, *inputs):
      m = nnx.merge(graphdef, state)
      m.eval()
      return m(*inputs, **apply_kwargs)

    return fn, state
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("A Linen module needs its variables: shrink(module, variables, ...).")
    return (lambda v, *inputs: model.apply(v, *inputs, **apply_kwargs)), variables
  raise TypeError(f"Surgery takes a flax nnx.Module or linen.Module, got {type(model).__name__}.")


@dataclasses.dataclass(frozen=True)
class Node:
  """One primitive equation of the traced program, calls inlined.

  ``ins`` and ``outs`` are value ids (``None`` for a literal or a constant).
  """

  site: Site
  eqn: Any
  ins: tuple[int | None, ...]
  outs: tuple[int, ...]

  @property
  def primitive(self) -> str:
    return self.eqn.primitive.name


@dataclasses.dataclass(frozen=True)
class Param:
  """A value that is param leaf ``leaf``: itself or cast (``same_axes``), or reshaped."""

  leaf: int
  same_axes: bool


@dataclasses.dataclass(frozen=True)
class Flow:
  """The traced program as a dataflow over values (ids: leaves, then inputs, then outputs
  of equations).

  Attributes:
    nodes: every primitive equation, in order.
    params: ``{value: Param}`` for the values that are a param leaf.
    uses: how many equations (or the program's outputs) read each value.
    param_reads: per leaf, how many equations read it, other than casts and reshapes of it.
    outputs: the values of the program's outputs.
  """

  nodes: tuple[Node, ...]
  params: dict[int, Param]
  uses: collections.Counter
  param_reads: collections.Counter
  outputs: tuple[int | None, ...]


def flow(traced: Traced) -> Flow:
  """The dataflow of ``traced`` (shapes only, nothing is computed)."""
  jaxpr = traced.jaxpr.jaxpr
  n_args = len(jaxpr.invars)
  ids = itertools.count(n_args)
  nodes: list[Node] = []
  params = {i: Param(i, True) for i in range(len(traced.paths))}

  def rule(site: Site, eqn: Any, ins: list) -> tuple[int, ...]:
    outs = tuple(next(ids) for _ in eqn.outvars)
    nodes.append(Node(site, eqn, tuple(ins), outs))
    name = eqn.primitive.name
    source = params.get(ins[0]) if ins and ins[0] is not None else None
    if source is not None and len(outs) == 1 and all(x is None for x in ins[1:]):
      if name in _SAME_AXES:
        params[outs[0]] = source
      elif name in _RESHAPED:
        params[outs[0]] = Param(source.leaf, False)
    return outs

  outputs = interpret(jaxpr, range(n_args), rule, default=lambda v: None)
  uses: collections.Counter = collections.Counter()
  reads: collections.Counter = collections.Counter()
  for node in nodes:
    uses.update(x for x in node.ins if x is not None)
    derived = len(node.outs) == 1 and node.outs[0] in params
    if not derived:
      reads.update({params[x].leaf for x in node.ins if x in params})
  uses.update(x for x in outputs if x is not None)
  return Flow(tuple(nodes), params, uses, reads, tuple(outputs))


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A ``dot_general`` or ``conv_general_dilated`` that reads a param as ``operand``.

  ``path`` is the param's exact path (``leaf`` its index in ``Traced.paths``);
  ``same_axes`` says the operand is the param itself (up to a dtype cast), not a
  reshape or transpose of it.
  """

  node: Node
  path: str
  leaf: int
  operand: int
  same_axes: bool


def param_consumers(traced: Traced, the_flow: Flow | None = None) -> list[Consumer]:
  """Every linear equation reading a param leaf (matched by exact path), in order."""
  the_flow = the_flow or flow(traced)
  out = []
  for node in the_flow.nodes:
    if node.primitive not in LINEAR:
      continue
    for k, x in enumerate(node.ins[:2]):
      source = the_flow.params.get(x) if x is not None else None
      if source is not None:
        out.append(Consumer(node, traced.paths[source.leaf], source.leaf, k, source.same_axes))
  return out


@dataclasses.dataclass(frozen=True)
class Record:
  """The inputs and outputs of one equation in one evaluation."""

  site: Site
  eqn: Any
  ins: list[Any]
  outs: list[Any]


def evaluate(
  traced: Traced,
  leaves: Sequence[Any],
  inputs: Sequence[Any],
  record: Callable[[Site, Any], bool] = lambda site, eqn: False,
) -> tuple[list[Any], list[Record]]:
  """Runs the traced program on ``leaves`` and ``inputs`` (at the traced shapes).

  Works eagerly and under ``jax.jit`` (on tracers).

  Args:
    traced: from :func:`trace`.
    leaves: the variables' leaves, in ``traced.paths`` order.
    inputs: the model inputs.
    record: ``(site, eqn) -> bool``: which primitive equations to record.

  Returns:
    The program's outputs (flat) and a :class:`Record` of every recorded equation, in
    the order they ran.
  """
  records: list[Record] = []

  def rule(site: Site, eqn: Any, ins: list) -> list:
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    outs = list(outs) if eqn.primitive.multiple_results else [outs]
    if record(site, eqn):
      records.append(Record(site, eqn, ins, outs))
    return outs

  args = [*leaves, *jax.tree.leaves(list(inputs))]
  outputs = interpret(traced.jaxpr.jaxpr, args, rule, consts=traced.jaxpr.consts)
  return outputs, records


def marked_outputs(traced: Traced, leaves: Sequence[Any], inputs: Sequence[Any]) -> dict[str, list]:
  """``{module path: [output of each call]}`` of the modules :func:`mark_outputs` marked."""
  paths = {m.name: m.path for m in traced.marks if m.name is not None}

  def marked(site: Site, eqn: Any) -> bool:
    return eqn.primitive.name == "name" and eqn.params.get("name") in paths

  _, records = evaluate(traced, leaves, inputs, marked)
  out: dict[str, list] = {}
  for r in records:
    out.setdefault(paths[r.eqn.params["name"]], []).append(r.outs[0])
  return out
