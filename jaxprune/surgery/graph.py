"""Channel dependency graph, discovered by tracing the model once (from shapes only).

Every axis of every param (and of the model inputs) gets one *atom* per index. The
traced program (a jaxpr) is walked once, carrying for each axis of each value the atoms
its entries come from; an op that makes two entries the same channel unions their
atoms (union-find). A union-find class is then one channel as the program sees it:
e.g. ``{conv1/kernel[..., j], conv1/bias[j], bn/scale[j], bn/bias[j], bn/mean[j],
conv2/kernel[:, :, j, :]}``; a flatten ties one conv channel to its block of Dense rows,
a residual add ties both branches, a concatenation offsets the channels of its parts.

Ops that mix entries of a channel axis in a way slicing cannot follow (gather, cumsum,
a grouped conv, ...) *block* the atoms they touch, recording the op and where it is,
so surgery refuses those channels with an error naming them.

Each primitive's effect on labels is a small function in :data:`RULES`, keyed by the
primitive's name (the ops that only move axes, and the reshape into attention heads, in
:mod:`jaxprune.surgery.reshapes`); a primitive without a rule blocks the channels it reads. The walk
itself, into ``pjit``/``remat``/custom-derivative sub-jaxprs, is
:func:`jaxprune.surgery.capture.interpret`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxprune.surgery import capture, reshapes
from jaxprune.surgery.reshapes import Label, Labels, Shape
from jaxprune.surgery.source import where

ELEMENTWISE = {
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq",
    "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic", "lt",
    "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt",
    "square", "stop_gradient", "sub", "tan", "tanh", "xor", "sharding_constraint",
    "optimization_barrier",
}  # fmt: skip
REDUCTIONS = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin",
}  # fmt: skip

# Why a reduction over channels blocks them: LayerNorm, RMSNorm, GroupNorm, a mean over
# features all divide by (or compare against) every channel, so removing any channel,
# even an all-zero one, changes the result.
STATISTIC = (
  " (a statistic over the channel axis, as LayerNorm/RMSNorm take: every channel, even "
  "an all-zero one, changes it, so none can be removed)"
)


@dataclasses.dataclass
class Atoms:
  """Union-find over atoms, with what each atom is and what touches its class."""

  parent: list[int] = dataclasses.field(default_factory=list)
  origin: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # leaf, axis, i
  blocked: dict[int, str] = dataclasses.field(default_factory=dict)
  producer: set[int] = dataclasses.field(default_factory=set)  # out-feature atoms of dot/conv
  conv: set[int] = dataclasses.field(default_factory=set)  # out-feature atoms of a conv
  # A composite atom is one entry of an axis that a reshape splits into several axes (or
  # merges from them): (head h, dim d) of a q projection's h * head_dim + d. Its parts
  # are the atoms of those axes, outermost first.
  parts: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  # What atoms are to attention (a dot between two activations whose output goes
  # through a softmax, and the dot of its weights with the values): "qk" (contracted
  # by q.k: a head dim), "v" (a value's head dim), "heads" (an axis both sides of q.k
  # keep: a head), "query" (an axis only the query keeps: one query head of every KV
  # group), "shared" (one atom at several entries of a head axis: a KV head repeated
  # for its query heads).
  roles: dict[int, set[str]] = dataclasses.field(default_factory=dict)
  # the fresh atoms of each reshape that splits an axis in several, per new axis
  splits: list[list[np.ndarray]] = dataclasses.field(default_factory=list)

  def new(self, leaf: int, axis: int, size: int) -> np.ndarray:
    start = len(self.parent)
    self.parent.extend(range(start, start + size))
    self.origin.extend((leaf, axis, i) for i in range(size))
    return np.arange(start, start + size)

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def union(self, a: Label, b: Label) -> None:
    if a is None or b is None:
      return
    for x, y in zip(a.tolist(), b.tolist()):
      if x >= 0 and y >= 0:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
          self.parent[ry] = rx

  def factors(self, sizes: list[int]) -> list[np.ndarray]:
    """Fresh atoms for the axes a reshape splits an axis into (no array entry of their
    own)."""
    out = [self.new(-1, -1, n) for n in sizes]
    self.splits.append(out)
    return out

  def block(self, label: Label, reason: str) -> None:
    if label is None:
      return
    for x in label.tolist():
      if x >= 0:
        self.blocked.setdefault(x, reason)


def _merge(atoms: Atoms, labels: list[Label]) -> Label:
  """One label from several (union them entrywise; missing entries filled in)."""
  present = [lab for lab in labels if lab is not None]
  if not present:
    return None
  out = present[0].copy()
  for lab in present[1:]:
    atoms.union(out, lab)
    out = np.where(out >= 0, out, lab)
  return out


def _shape(v: Any) -> Shape:
  return tuple(getattr(v.aval, "shape", ()))


class Value(list):
  """The labels of one value (one per axis) and what it is to attention: ``logits``, the
  q.k dots (by number) whose output it is, through any op but another dot; ``weights``,
  those whose softmax it is (their logits went through an ``exp``); ``data``, whether it
  is computed from the model's inputs (an activation, whatever labels its axes carry)."""

  logits: frozenset[int] = frozenset()
  weights: frozenset[int] = frozenset()
  data: bool = False

  @classmethod
  def input(cls, ndim: int) -> Value:
    """The labels of a model input: no axis labeled, computed from the data."""
    value = cls([None] * ndim)
    value.data = True
    return value


class Tracer:
  """Walks a jaxpr, propagating atom labels and recording unions and blocks.

  Attention is read from the dataflow: a dot between two activations that contracts a
  channel axis of both is a candidate q.k; what it makes of the axes (head dims, heads)
  is recorded only when its output reaches an ``exp`` (a softmax), and the dot of those
  softmax weights with another activation marks that one's free axes as value head
  dims. Any other reshape into two axes, or dot of two activations, makes no heads.
  """

  def __init__(self, atoms: Atoms, paths: tuple[str, ...] = ()):
    self.atoms = atoms
    self.paths = paths
    self.candidates: list[list[tuple[Label, str]]] = []  # per q.k dot: its roles
    self.softmaxed: set[int] = set()  # q.k dots whose output went through an exp

  def param(self, label: Label) -> str:
    """The path of the array whose atoms ``label`` holds (``""`` if none)."""
    if label is None or not self.paths:
      return ""
    ids = [x for x in label.tolist() if x >= 0]
    return self.paths[self.atoms.origin[ids[0]][0]] if ids else ""

  def run(self, jaxpr: Any, in_labels: Labels) -> Labels:
    return capture.interpret(jaxpr, in_labels, self.rule, default=lambda v: [None] * len(_shape(v)))

  def rule(self, site: capture.Site, eqn: Any, ins: Labels) -> Labels:
    """The output labels of one equation, by its primitive's rule in :data:`RULES`."""
    del site
    out_shapes = [_shape(v) for v in eqn.outvars]
    rule = RULES.get(eqn.primitive.name)
    if rule is not None:
      outs = rule(self, eqn, ins, [_shape(v) for v in eqn.invars], out_shapes)
    elif not any(lab is not None for labels in ins for lab in labels):
      outs = [[None] * len(s) for s in out_shapes]
    else:
      outs = self.block_all(eqn, ins)
    data = any(getattr(v, "data", False) for v in ins)
    if eqn.primitive.name in capture.LINEAR:  # the dot rule says what its output is
      values = [o if isinstance(o, Value) else Value(o) for o in outs]
      for value in values:
        value.data = data
      return list(values)
    logits = frozenset().union(*(getattr(v, "logits", frozenset()) for v in ins))
    weights = frozenset().union(*(getattr(v, "weights", frozenset()) for v in ins))
    if eqn.primitive.name == "exp" and logits:
      for k in logits - self.softmaxed:
        for label, role in self.candidates[k]:
          self.mark(label, role)
      self.softmaxed |= logits
      logits, weights = frozenset(), weights | logits
    wrapped = []
    for labels in outs:
      value = Value(labels)
      value.logits, value.weights, value.data = logits, weights, data
      wrapped.append(value)
    return wrapped

  def block_all(self, eqn: Any, ins: Labels) -> Labels:
    reason = where(eqn)
    for labels in ins:
      for lab in labels:
        self.atoms.block(lab, reason)
    return [[None] * len(_shape(v)) for v in eqn.outvars]

  def mark_producer(self, lab: Label) -> None:
    if lab is not None:
      self.atoms.producer.update(int(x) for x in lab.tolist() if x >= 0)

  def mark(self, lab: Label, role: str) -> None:
    """Records ``role`` for the atoms of ``lab`` (and ``"shared"`` for an atom that a
    head axis holds at several entries: a KV head repeated for its query heads)."""
    if lab is None:
      return
    ids = [x for x in lab.tolist() if x >= 0]
    for x in ids:
      self.atoms.roles.setdefault(x, set()).add(role)
    if role == "heads":
      seen: set[int] = set()
      for x in ids:
        if x in seen:
          self.atoms.roles[x].add("shared")
        seen.add(x)


# A rule maps (tracer, eqn, input labels, input shapes, output shapes) to output labels.
# A primitive without one blocks the channels it reads.
Rule = Callable[[Tracer, Any, Labels, list[Shape], list[Shape]], Labels]
RULES: dict[str, Rule] = dict(reshapes.RULES)  # transpose, squeeze, expand_dims, reshape


def _rule(*names: str) -> Callable[[Rule], Rule]:
  def register(rule: Rule) -> Rule:
    for name in names:
      RULES[name] = rule
    return rule

  return register


@_rule(*ELEMENTWISE)
def _elementwise(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  out = out_shapes[0]
  labels = []
  for a, size in enumerate(out):
    cands = [lab[a] for lab, s in zip(ins, in_shapes) if len(s) == len(out) and s[a] == size]
    labels.append(_merge(t.atoms, cands))
  return [labels for _ in out_shapes]


@_rule("iota")
def _iota(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  """Values computed from the index along an axis (``arange``): where that axis meets a
  channel axis (rotary frequencies ``base ** (2 * arange(head_dim // 2) / head_dim)``),
  slicing the channels would change the values, so they are blocked."""
  shape, d = out_shapes[0], eqn.params["dimension"]
  labels: list[Label] = [None] * len(shape)
  if shape[d] > 1:
    labels[d] = t.atoms.new(-1, -1, shape[d])
    t.atoms.block(
      labels[d],
      where(eqn) + " (values computed from the index along the channels, e.g. rotary "
      "frequencies from arange(head_dim): slicing the channels would change them)",
    )
  return [labels]


@_rule("broadcast_in_dim")
def _broadcast(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  labels: list[Label] = [None] * len(out_shapes[0])
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if in_shapes[0][i] == out_shapes[0][d]:
      labels[d] = ins[0][i]
  return [labels]


@_rule(*REDUCTIONS)
def _reduction(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  axes = set(eqn.params["axes"])
  for a in axes:
    if ins[0][a] is not None and in_shapes[0][a] > 1:
      t.atoms.block(ins[0][a], where(eqn) + STATISTIC)
  return [[lab for a, lab in enumerate(ins[0]) if a not in axes]]


def _is_activation(labels: list[Label]) -> bool:
  """A value computed from the model's inputs, or with an unlabeled axis (batch,
  positions; a param broadcast over the batch, as latent queries are): not a param.

  Labels alone do not tell: a causal mask built with ``iota`` labels the positions axes
  of the logits, the weights . values dot passes the query positions on to the residual
  stream, and with a batch of one squeezed away every axis of the next block's q and k
  is labeled."""
  return getattr(labels, "data", False) or any(lab is None for lab in labels)


@_rule("dot_general")
def _dot_general(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = ins[0], ins[1]
  for a, b in zip(lc, rc):
    t.atoms.union(lhs[a], rhs[b])
  for a, b in zip(lb, rb):
    t.atoms.union(lhs[a], rhs[b])
  lfree = [a for a in range(len(in_shapes[0])) if a not in lc and a not in lb]
  rfree = [b for b in range(len(in_shapes[1])) if b not in rc and b not in rb]
  for b in rfree:
    t.mark_producer(rhs[b])
  for a in lfree:
    t.mark_producer(lhs[a])
  out = Value([lhs[a] for a in lb] + [lhs[a] for a in lfree] + [rhs[b] for b in rfree])
  if _is_activation(lhs) and _is_activation(rhs):
    weights = [getattr(x, "weights", frozenset()) & t.softmaxed for x in (lhs, rhs)]
    sides = ((lhs, lfree, lb, weights[0]), (rhs, rfree, rb, weights[1]))
    if any(weights):  # softmax weights . values: the values' free axes are head dims
      for labels, free, batch, w in sides:
        for a in batch:
          t.mark(labels[a], "heads")
        for a in free:
          t.mark(labels[a], "query" if w else "v")
    else:  # q.k, if its output goes through a softmax
      roles = [(lhs[a], "qk") for a in lc] + [(rhs[b], "qk") for b in rc]
      for labels, free, batch, _ in sides:
        roles += [(labels[a], "heads") for a in batch] + [(labels[a], "query") for a in free]
      out.logits = frozenset({len(t.candidates)})
      t.candidates.append(roles)
  return [out]


@_rule("conv_general_dilated")
def _conv(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  lhs, rhs = ins[0], ins[1]
  groups = p["feature_group_count"]
  c_in = in_shapes[0][lhs_spec[1]]
  out: list[Label] = [None] * len(out_shapes[0])
  out[out_spec[0]] = lhs[lhs_spec[0]]
  if p.get("batch_group_count", 1) != 1:
    return t.block_all(eqn, ins)
  if groups == 1:
    t.atoms.union(lhs[lhs_spec[1]], rhs[rhs_spec[1]])
    out[out_spec[1]] = rhs[rhs_spec[0]]
    t.mark_producer(rhs[rhs_spec[0]])
    if rhs[rhs_spec[0]] is not None:
      t.atoms.conv.update(int(x) for x in rhs[rhs_spec[0]].tolist() if x >= 0)
  elif groups == c_in and in_shapes[1][rhs_spec[0]] == c_in:
    # depthwise, multiplier 1: input channel j -> filter j -> output channel j
    t.atoms.union(lhs[lhs_spec[1]], rhs[rhs_spec[0]])
    out[out_spec[1]] = _merge(t.atoms, [lhs[lhs_spec[1]], rhs[rhs_spec[0]]])
  else:
    reason = where(eqn, t.param(rhs[rhs_spec[0]])) + (
      f" (grouped conv, feature_group_count={groups}: only depthwise convs with one "
      "filter per input channel can be sliced)"
    )
    t.atoms.block(lhs[lhs_spec[1]], reason)
    t.atoms.block(rhs[rhs_spec[0]], reason)
    t.atoms.block(rhs[rhs_spec[1]], reason)
  for a in lhs_spec[2:]:
    t.atoms.block(lhs[a], where(eqn, t.param(rhs[rhs_spec[0]])))
  return [out]


@_rule("concatenate")
def _concatenate(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  d = eqn.params["dimension"]
  labels = []
  for a in range(len(out_shapes[0])):
    if a == d:
      parts = [
        lab[a] if lab[a] is not None else np.full(s[a], -1) for lab, s in zip(ins, in_shapes)
      ]
      cat = np.concatenate(parts)
      labels.append(cat if (cat >= 0).any() else None)
    else:
      labels.append(_merge(t.atoms, [lab[a] for lab in ins]))
  return [labels]


@_rule("split")
def _split(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  axis, sizes = eqn.params["axis"], eqn.params["sizes"]
  outs, start = [], 0
  for size in sizes:
    lab = ins[0][axis]
    labels = list(ins[0])
    labels[axis] = None if lab is None else lab[start : start + size]
    outs.append(labels)
    start += size
  return outs


@_rule("reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window")
def _reduce_window(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  p = eqn.params
  labels = []
  dims, strides = p["window_dimensions"], p["window_strides"]
  for a, lab in enumerate(ins[0]):
    plain = dims[a] == 1 and strides[a] == 1 and tuple(p["padding"][a]) == (0, 0)
    if not plain:
      t.atoms.block(lab, where(eqn))
    labels.append(lab if plain else None)
  return [labels]


def _touched(eqn: Any, in_shape: Shape) -> set[int]:
  """The axes an axiswise op changes (the others pass through untouched)."""
  name, p = eqn.primitive.name, eqn.params
  if name == "slice":
    strides = p["strides"] or [1] * len(in_shape)
    bounds = zip(p["start_indices"], p["limit_indices"], strides)
    return {a for a, (lo, hi, s) in enumerate(bounds) if lo != 0 or hi != in_shape[a] or s != 1}
  if name == "pad":
    return {a for a, cfg in enumerate(p["padding_config"]) if tuple(cfg) != (0, 0, 0)}
  if name == "rev":
    return set(p["dimensions"])
  if name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
    return {p["axis"]}
  if name == "sort":
    return {p["dimension"]}
  if name == "top_k":
    return {len(in_shape) - 1}
  return set(range(len(in_shape)))


@_rule(
  "slice", "pad", "rev", "dynamic_slice", "dynamic_update_slice", "cumsum", "cumprod",
  "cummax", "cummin", "cumlogsumexp", "sort", "top_k", "gather", "scatter", "scatter-add",
  "scatter_add",
)  # fmt: skip
def _axiswise(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  """Ops that keep untouched axes: pass those, block channel axes they change."""
  touched = _touched(eqn, in_shapes[0])
  if len(out_shapes[0]) != len(in_shapes[0]):
    return t.block_all(eqn, ins)
  labels = []
  for a, lab in enumerate(ins[0]):
    if a in touched or out_shapes[0][a] != in_shapes[0][a]:
      t.atoms.block(lab, where(eqn))
      labels.append(None)
    else:
      labels.append(lab)
  for extra in ins[1:]:
    for lab in extra:
      t.atoms.block(lab, where(eqn))
  return [labels for _ in out_shapes]
