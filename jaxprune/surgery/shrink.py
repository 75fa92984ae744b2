"""Shrink: slice every coupled array of removed channels and rebuild a smaller model.

A channel of a prunable group is removed when its producers' weights are all zero under
the masks (structured masks, zero SSL groups, hard gates): its value is then the same
for every input (e.g. ``relu(beta)`` after a BatchNorm). Before it is cut, its constant
contribution to each consumer is folded into the consumer's bias, so the small model
computes what the masked one does. A channel whose contribution cannot be folded
exactly (no bias to fold into, or a padded spatial conv at the border) is kept.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.surgery.graph import CALLS
from jaxprune.surgery.plan import Group, Plan

# The batch of the random inputs that check constancy (plan_removal) and equality
# (shrink's check): one batch size, so the second eager run reuses the ops compiled by
# the first.
CHECK_BATCH = 3


def dead_channels(group: Group, values: dict[str, np.ndarray]) -> list[int]:
  """Channels of ``group`` whose producer slices are all exactly zero."""
  dead = []
  for j, chan in enumerate(group.channels):
    if all(not np.any(np.take(values[p], chan[(p, a)], axis=a)) for p, a in group.producers):
      dead.append(j)
  return dead


def _eval_capture(jaxpr: Any, consts: list, args: list, capture: list) -> list:
  """Evaluates a jaxpr, recording ``(eqn, inputs, output)`` of every dot/conv."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if hasattr(v, "val") and not hasattr(v, "count") else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    inner = None
    if name in CALLS:
      inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    if inner is not None:
      consts_in = getattr(inner, "consts", [])
      inner = getattr(inner, "jaxpr", inner)
      outs = _eval_capture(inner, consts_in, ins[len(ins) - len(inner.invars) :], capture)
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if name in ("dot_general", "conv_general_dilated"):
        capture.append((eqn, ins, outs[0]))
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _consumer_axes(eqn: Any) -> tuple[int, int, int]:
  """(lhs feature axis, rhs input axis, output feature axis) of a dot/conv."""
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    if len(lc) != 1 or lb:
      return -1, -1, -1
    n_out = len(eqn.outvars[0].aval.shape)
    return lc[0], rc[0], n_out - 1
  dn = eqn.params["dimension_numbers"]
  if eqn.params["feature_group_count"] != 1:
    return -1, -1, -1
  return dn.lhs_spec[1], dn.rhs_spec[1], dn.out_spec[1]


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
    jaxpr: the model's closed jaxpr at batch :data:`CHECK_BATCH`.
  """

  removed: dict[str, list[int]]
  bias_delta: dict[str, np.ndarray]
  kept_constant: dict[str, list[int]]
  why_kept: dict[str, str] = dataclasses.field(default_factory=dict)
  jaxpr: Any = None


def evaluate(closed: Any, leaves: list[Any], inputs: list[Any]) -> list[Any]:
  """The outputs of ``closed`` (a ``plan.fn`` jaxpr), evaluated op by op."""
  return _eval_capture(closed.jaxpr, closed.consts, list(leaves) + list(inputs), [])


def plan_removal(
  plan: Plan,
  leaves: list[Any],
  example_inputs: tuple,
  candidates: dict[str, list[int]],
  rng: np.random.Generator,
) -> Removal:
  """Folds the constant output of candidate channels into consumer biases where exact.

  A channel whose constant cannot be folded into one of its consumers is kept, and the
  folds into the other consumers are then recomputed without it (repeated until no
  consumer keeps another channel), so no constant is both kept and folded.
  """
  values = {p: np.asarray(x) for p, x in zip(plan.paths, leaves)}
  inputs = [
    jnp.asarray(rng.normal(size=(CHECK_BATCH, *jnp.shape(x)[1:])), jnp.result_type(x))
    for x in example_inputs
  ]
  capture: list = []
  closed = jax.make_jaxpr(plan.fn)(list(leaves), *inputs)  # a batch: constancy is checked
  _eval_capture(closed.jaxpr, closed.consts, list(leaves) + inputs, capture)
  by_member = {}
  for g in plan.groups:
    for m in g.members:
      by_member[m] = g
  removed = {name: list(chans) for name, chans in candidates.items()}
  kept: dict[str, set[int]] = collections.defaultdict(set)
  why: dict[str, str] = {}
  leaf_ids = {id(x): p for p, x in zip(plan.paths, leaves)}
  while True:
    bias_delta: dict[str, np.ndarray] = {}
    changed = False
    for eqn, ins, _ in capture:
      lhs_axis, rhs_axis, out_axis = _consumer_axes(eqn)
      rhs_path = leaf_ids.get(id(ins[1]))
      if rhs_path is None or lhs_axis < 0:
        continue
      group = by_member.get((rhs_path, rhs_axis))
      if group is None or not removed.get(group.name):
        continue
      lhs = np.asarray(ins[0])
      chans = removed[group.name]
      index = np.concatenate([group.channels[j][(rhs_path, rhs_axis)] for j in chans])
      only = np.zeros_like(lhs)
      sl = [slice(None)] * lhs.ndim
      sl[lhs_axis] = index
      only[tuple(sl)] = lhs[tuple(sl)]
      if not only.any():
        continue
      delta = np.asarray(eqn.primitive.bind(jnp.asarray(only), ins[1], **eqn.params))
      flat = np.moveaxis(delta, out_axis, -1).reshape(-1, delta.shape[out_axis])
      bias_path = rhs_path.rsplit("/", 1)[0] + "/bias" if "/" in rhs_path else "bias"
      exact = np.allclose(flat, flat[:1], rtol=1e-6, atol=1e-6 * (1 + np.abs(flat).max()))
      has_bias = bias_path in values and values[bias_path].shape == (flat.shape[1],)
      if exact and has_bias:
        bias_delta[bias_path] = bias_delta.get(bias_path, 0) + flat[0]
        continue
      # Keep the channels that are not silent: their constant cannot be folded here.
      silent = []
      for j in chans:
        idx = group.channels[j][(rhs_path, rhs_axis)]
        part = np.take(lhs, idx, axis=lhs_axis)
        if part.any():
          kept[group.name].add(j)
        else:
          silent.append(j)
      removed[group.name] = silent
      changed = True
      why.setdefault(
        group.name,
        f"{rhs_path} has no bias to absorb their constant output"
        if not has_bias
        else f"their constant contribution through {rhs_path} varies over positions "
        "(zero padding at the borders)",
      )
    if not changed:
      break
  kept_constant = {k: sorted(v) for k, v in kept.items() if v}
  why_kept = {k: why[k] for k in kept_constant}
  return Removal(removed, bias_delta, kept_constant, why_kept, jaxpr=closed)


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
  """Slices any tree holding params-shaped leaves (masks, optimizer moments, ...).

  A leaf is sliced when its path ends with a sliced array's path and its shape is that
  array's original shape; other leaves (and ``None``) pass through.
  """
  names = sorted(kept, key=len, reverse=True)

  def one(path, leaf):
    if leaf is None or not hasattr(leaf, "shape"):
      return leaf
    p = tree_lib.path_str(path)
    for name in names:
      if tree_lib.same_leaf(p, name) and tuple(leaf.shape) == plan.shapes[name]:
        return take(leaf, kept[name])
    return leaf

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=tree_lib.is_none)
