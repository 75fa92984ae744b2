"""Shrink: slice every coupled array of removed channels and rebuild a smaller model.

A channel of a prunable group is removed when its producers' weights are all zero under
the masks (structured masks, zero SSL groups, hard gates): its value is then the same
for every input (e.g. ``relu(beta)`` after a BatchNorm). Before it is cut, its constant
contribution to each consumer is folded into the consumer's bias, so the small model
computes what the masked one does, at every input size. A channel whose contribution
cannot be folded exactly (no bias to fold into, a padded conv at the borders, a strided
conv whose padding depends on the input size) is kept.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.surgery import capture
from jaxprune.surgery.planning import Group, Plan


class _Call(NamedTuple):
  """One dot/conv of one evaluation: its inputs, output, and the kernel it reads."""

  eqn: Any
  ins: list[Any]
  out: Any
  rhs: str | None  # the exact path of the param it reads as its rhs (same axes), if any


@dataclasses.dataclass(frozen=True)
class _Consumer:
  """How a dot/conv reads its input channels.

  Attributes:
    pairs: ``(lhs axis, rhs axis)`` of every contracted pair (the lhs feature axis and
      the kernel's input axis of a conv).
    out_axis: the output feature axis, or -1 when a constant input channel cannot be
      folded into a bias (batch dimensions, several contracted axes, a grouped conv).
  """

  pairs: tuple[tuple[int, int], ...]
  out_axis: int


def _consumer(eqn: Any) -> _Consumer | None:
  """What a dot/conv reads; ``None`` for a depthwise conv, whose output channel is its
  input channel (same group): a constant flows through it to the next consumer."""
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    n_out = len(eqn.outvars[0].aval.shape)
    # one output feature axis, last (a LinearGeneral may contract (heads, head_dim))
    plain = not lb and len(eqn.invars[1].aval.shape) - len(rc) == 1
    return _Consumer(tuple(zip(lc, rc)), n_out - 1 if plain else -1)
  dn = eqn.params["dimension_numbers"]
  groups = eqn.params["feature_group_count"]
  pair = ((dn.lhs_spec[1], dn.rhs_spec[1]),)
  if groups != 1:
    c_in = eqn.invars[0].aval.shape[dn.lhs_spec[1]]
    c_out = eqn.invars[1].aval.shape[dn.rhs_spec[0]]
    return None if groups == c_in == c_out else _Consumer(pair, -1)
  return _Consumer(pair, dn.out_spec[1])


def _size_dependent(eqn: Any) -> bool:
  """A strided conv with a window wider than one and no padding at the traced size.

  Its padding may only be zero at this size: Flax's ``"SAME"`` pads a stride-``s`` conv
  by ``k - r`` at the end when the size leaves a remainder ``0 < r < k``, so what a
  constant contributes at the borders depends on the input size. (A padded conv is
  already not exact at the traced size; a stride-1 or 1x1 conv pads the same at every
  size.)
  """
  if eqn.primitive.name != "conv_general_dilated":
    return False
  p = eqn.params
  dn = p["dimension_numbers"]
  window = [eqn.invars[1].aval.shape[a] for a in dn.rhs_spec[2:]]
  dilation = p.get("rhs_dilation") or (1,) * len(window)
  for k, d, s, pad in zip(window, dilation, p["window_strides"], p["padding"]):
    if s > 1 and (k - 1) * d + 1 > 1 and tuple(pad) == (0, 0):
      return True
  return False


@dataclasses.dataclass
class Removal:
  """Which channels of each group go, and the bias corrections that fold them away.

  Attributes:
    removed: ``{group name: channels removed}``.
    bias_delta: ``{bias path: correction}``: the removed channels' constant
      contribution to each consumer, added to its bias.
    kept_constant: ``{group name: channels}`` that were dead (constant output) but are
      kept, because some consumer cannot absorb their constant exactly.
    why_kept: ``{group name: reason}`` naming that consumer and why.
  """

  removed: dict[str, list[int]]
  bias_delta: dict[str, np.ndarray]
  kept_constant: dict[str, list[int]]
  why_kept: dict[str, str] = dataclasses.field(default_factory=dict)


def _linear(site: capture.Site, eqn: Any) -> bool:
  return eqn.primitive.name in capture.LINEAR


def _captures(plan: Plan, leaves: list[Any], batches: list[list[Any]]) -> list[list[_Call]]:
  """Per input batch, every dot/conv of the model with its inputs and output."""
  out = []
  for inputs in batches:
    traced = capture.trace(plan.fn, list(leaves), *inputs)
    rhs = {
      c.node.site: plan.paths[c.leaf]
      for c in capture.param_consumers(traced)
      if c.operand == 1 and c.same_axes
    }
    ran: list[tuple[capture.Site, Any]] = []

    def run(leaves, inputs, traced=traced, ran=ran):
      _, records = capture.evaluate(traced, leaves, inputs, _linear)
      ran[:] = [(r.site, r.eqn) for r in records]
      return [(r.ins, r.outs[0]) for r in records]

    # one compiled program per batch (run eagerly, each equation compiles on its own)
    values = jax.jit(run)(list(leaves), list(inputs))
    out.append(
      [_Call(eqn, list(ins), y, rhs.get(site)) for (site, eqn), (ins, y) in zip(ran, values)]
    )
  return out


def _constant_rows(x: np.ndarray) -> bool:
  return bool(np.allclose(x, x[:1], rtol=1e-6, atol=1e-6 * (1 + np.abs(x).max(initial=0.0))))


def host_values(paths: Sequence[str], leaves: Sequence[Any]) -> dict[str, np.ndarray]:
  """``{path: numpy array}`` of the leaves that hold numbers. PRNG key arrays (an
  ``nnx.Dropout``'s or ``nnx.Rngs``' keys in the model state) have no numpy form and are
  never a layer's weights: they are left out."""
  return {p: np.asarray(x) for p, x in zip(paths, leaves) if not tree_lib.is_key(x)}


def plan_removal(
  plan: Plan,
  leaves: list[Any],
  batches: list[list[Any]],
  candidates: dict[str, list[int]],
) -> Removal:
  """Folds the constant output of candidate channels into consumer biases where exact.

  Every consumer (a dot or conv reading a group's channels; a layer fed by a
  concatenation reads several groups) gets each group's constant contribution added to
  its bias when that contribution is the same at every position, in every batch of
  ``batches`` (the first at the traced input size, others at other sizes), and cannot
  change at sizes not tried (:func:`_size_dependent`). Otherwise the non-silent
  channels are kept, and the folds into the other consumers are recomputed without
  them (repeated until no consumer keeps another channel), so no constant is both kept
  and folded.
  """
  values = host_values(plan.paths, leaves)
  captures = _captures(plan, leaves, batches)
  aligned = [c for c in captures[1:] if len(c) == len(captures[0])]
  by_member: dict[tuple[str, int], list[Group]] = collections.defaultdict(list)
  for g in plan.groups:
    for m in g.members:
      by_member[m].append(g)
  removed = {name: list(chans) for name, chans in candidates.items()}
  kept: dict[str, set[int]] = collections.defaultdict(set)
  why: dict[str, str] = {}
  while True:
    bias_delta: dict[str, np.ndarray] = {}
    folded: dict[tuple[str, str], np.ndarray] = {}
    changed = False
    for i, call in enumerate(captures[0]):
      rhs_path = call.rhs
      consumer = _consumer(call.eqn)
      if rhs_path is None or consumer is None:
        continue
      runs = [captures[0][i]] + [c[i] for c in aligned]
      # Input entries whose constant this call has folded already: a layer reading two
      # removed groups on two axes (a LinearGeneral's (heads, dim) input) sees the
      # entries of a removed head *and* a removed dim once, not once per group.
      done: list[tuple[int, np.ndarray]] = []
      for lhs_axis, rhs_axis in consumer.pairs:
        for group in by_member.get((rhs_path, rhs_axis), ()):
          chans = removed.get(group.name)
          if not chans:
            continue
          axes = (lhs_axis, rhs_axis, consumer.out_axis)
          contracted = tuple(a for a, _ in consumer.pairs)
          reason = _fold(
            group, chans, rhs_path, axes, contracted, runs, values, bias_delta, folded, done
          )
          if reason is None:
            index = np.concatenate([group.channels[j][(rhs_path, rhs_axis)] for j in chans])
            done.append((lhs_axis, index))
            continue
          silent = []
          for j in chans:
            idx = group.channels[j][(rhs_path, rhs_axis)]
            live = any(np.take(np.asarray(r.ins[0]), idx, axis=lhs_axis).any() for r in runs)
            (kept[group.name].add(j) if live else silent.append(j))
          if silent != chans:
            removed[group.name] = silent
            changed = True
            why.setdefault(group.name, reason)
    if not changed:
      break
  kept_constant = {k: sorted(v) for k, v in kept.items() if v}
  why_kept = {k: why[k] for k in kept_constant}
  return Removal(removed, bias_delta, kept_constant, why_kept)


def _fold(
  group, chans, rhs_path, axes, contracted, runs, values, bias_delta, folded, done=()
) -> str | None:
  """Adds ``group``'s constant contribution through one consumer to its bias delta.

  The channels' input must be the same at every position: over the axes the consumer
  does not contract (``contracted``: all its contracted input axes; a head dim read
  with the heads by an output projection may differ from head to head). ``done``:
  ``(input axis, indices)`` of the groups already folded through this call; their
  entries are not counted again.

  Returns ``None`` when it was folded (or is zero), else why it cannot be.
  """
  lhs_axis, rhs_axis, out_axis = axes
  eqn = runs[0].eqn
  index = np.concatenate([group.channels[j][(rhs_path, rhs_axis)] for j in chans])
  deltas, constant_inputs = [], True
  for run in runs:
    ins = run.ins
    lhs = np.asarray(ins[0])
    only = np.zeros_like(lhs)
    sl = [slice(None)] * lhs.ndim
    sl[lhs_axis] = index
    only[tuple(sl)] = lhs[tuple(sl)]
    for axis, idx in done:
      gone = [slice(None)] * lhs.ndim
      gone[axis] = idx
      only[tuple(gone)] = 0
    if not only.any():
      deltas.append(None)
      continue
    delta = np.asarray(run.eqn.primitive.bind(jnp.asarray(only), ins[1], **run.eqn.params))
    if not delta.any():  # the consumer reads nothing of them (its rows are zero)
      deltas.append(None)
      continue
    part = np.take(lhs, index, axis=lhs_axis)
    part = np.moveaxis(part, contracted, tuple(range(-len(contracted), 0)))
    width = int(np.prod(part.shape[part.ndim - len(contracted) :]))
    constant_inputs &= _constant_rows(part.reshape(-1, width))
    if out_axis < 0:
      deltas.append(np.zeros((1, 1)))
      continue
    deltas.append(np.moveaxis(delta, out_axis, -1).reshape(-1, delta.shape[out_axis]))
  if all(d is None for d in deltas):
    return None  # silent: these channels are zero here
  if out_axis < 0:
    return f"{rhs_path} (`{eqn.primitive.name}`) cannot absorb a constant input channel"
  bias_path = rhs_path.rsplit("/", 1)[0] + "/bias" if "/" in rhs_path else "bias"
  n_out = next(d for d in deltas if d is not None).shape[1]
  if not (bias_path in values and values[bias_path].shape == (n_out,)):
    return f"{rhs_path} has no bias to absorb their constant output"
  if not constant_inputs:
    return (
      f"their output is not constant over positions where {rhs_path} reads it (an op "
      "before it, e.g. a zero-padded depthwise conv or pooling, changes it at the borders)"
    )
  if any(d is None or not _constant_rows(d) for d in deltas):
    return (
      f"their constant contribution through {rhs_path} varies over positions (zero "
      "padding at its borders)"
    )
  if _size_dependent(eqn):
    return (
      f"their constant contribution through {rhs_path} depends on the input size (a "
      "strided conv: its padding changes with the size)"
    )
  if any(
    not np.allclose(d[0], deltas[0][0], rtol=1e-6, atol=1e-6 * (1 + np.abs(d).max()))
    for d in deltas[1:]
  ):
    return (
      f"their constant contribution through {rhs_path} differs between the input sizes "
      "tried (their value depends on the input size, e.g. through a statistic over "
      "positions before it)"
    )
  key = (bias_path, group.name)
  if key in folded:  # a shared layer, called again: its bias absorbs the constant once
    if np.allclose(folded[key], deltas[0][0], rtol=1e-6, atol=1e-6):
      return None
    return f"{rhs_path} is called more than once and sees a different constant each time"
  folded[key] = deltas[0][0]
  bias_delta[bias_path] = bias_delta.get(bias_path, 0) + deltas[0][0]
  return None


def kept_indices(plan: Plan, removed: dict[str, list[int]]) -> dict[str, dict[int, np.ndarray]]:
  """``{path: {axis: kept indices}}`` for every array a removal slices."""
  cut: dict[tuple[str, int], list[np.ndarray]] = collections.defaultdict(list)
  for g in plan.groups:
    for j in removed.get(g.name, ()):
      for member, idx in g.channels[j].items():
        cut[member].append(idx)
  kept: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
  for (path, axis), parts in cut.items():
    size = plan.shapes[path][axis]
    kept[path][axis] = np.setdiff1d(np.arange(size), np.concatenate(parts))
  return dict(kept)


def take(leaf: Any, kept: dict[int, np.ndarray]) -> jax.Array:
  """``leaf`` with only the kept indices along each sliced axis."""
  out = np.asarray(leaf)  # numpy: an eager jnp.take compiles a program per shape
  for axis, idx in kept.items():
    out = np.take(out, np.asarray(idx, np.int64), axis=axis)
  return jnp.asarray(out)


def slice_tree(tree: Any, plan: Plan, kept: dict[str, dict[int, np.ndarray]]) -> Any:
  """Slices every params-shaped part of ``tree`` (masks, optimizer moments, ...).

  A part of ``tree`` is params-shaped when the paths of its leaves, taken from that
  part, are paths of the model's arrays (exactly, or without Linen's ``params/``
  prefix) and the leaves have those arrays' shapes: ``mu`` in an Adam state
  ``(ScaleByAdamState(count, mu, nu), ...)``, whose leaves ``mu/Dense_0/kernel`` are
  ``Dense_0/kernel`` from there. Paths are never matched by suffix.

  Raises:
    ValueError: when no part of ``tree`` is params-shaped (the message lists both).
  """
  tables = (
    {p: p for p in plan.paths},
    {tree_lib.strip_collection(p): p for p in plan.paths},
  )

  def table_of(node: Any) -> dict[str, str] | None:
    items = tree_lib.leaves_with_paths(node, is_leaf=tree_lib.is_none)
    if not any(hasattr(x, "shape") for _, x in items):
      return None
    for table in tables:
      if all(p in table and (x is None or np.shape(x) == plan.shapes[table[p]]) for p, x in items):
        return table
    return None

  found = []

  def one(node: Any) -> Any:
    table = table_of(node) if node is not None else None
    if table is None:
      return node
    found.append(True)

    def leaf(path, x):
      name = table[tree_lib.path_str(path)]
      return x if x is None or name not in kept else take(x, kept[name])

    return jax.tree_util.tree_map_with_path(leaf, node, is_leaf=tree_lib.is_none)

  out = jax.tree.map(one, tree, is_leaf=lambda n: n is None or table_of(n) is not None)
  arrays = [p for p, x in tree_lib.leaves_with_paths(tree) if hasattr(x, "shape")]
  if not found and arrays:
    raise ValueError(
      f"slice: no part of the tree has the model's arrays at their paths and shapes "
      f"(tree leaves: {arrays[:8]}; model arrays: {list(plan.paths)[:8]}). Pass masks, "
      "optimizer moments or an optax state built from the model's params or variables."
    )
  return out
