"""How channel labels pass ops that only move axes: transpose, squeeze, expand_dims, reshape.

A reshape maps labels group by group of axes with equal products (:func:`_regroup`). One
that splits a feature axis into several (features into ``(heads, head_dim)``, the
normal attention pattern) couples whole heads: each entry of the split axis becomes a
composite (``Atoms.parts``) of fresh head and head-dim atoms (``Atoms.factors``), so the
q/k/v features of one head and the output projection's rows of it land in one class; a
merge back (``(heads, head_dim)`` into features) makes composites the same way, and a
second split of a merged axis reuses its atoms. Any other reshape that splits or merges
a channel axis blocks it, naming the op and its source line.

These rules join the others in :data:`jaxprune.surgery.graph.RULES`, keyed by primitive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxprune.surgery.source import where

Label = np.ndarray | None  # atom id per index along one axis (-1: none), or None
Labels = list[list[Label]]  # per operand, per axis
Shape = tuple[int, ...]
Tracer = Any  # jaxprune.surgery.graph.Tracer (which imports this module)

RULES: dict[str, Callable[..., Labels]] = {}


def _rule(*names: str) -> Callable:
  def register(rule: Callable) -> Callable:
    for name in names:
      RULES[name] = rule
    return rule

  return register


@_rule("transpose")
def _transpose(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  return [[ins[0][a] for a in eqn.params["permutation"]]]


@_rule("squeeze")
def _squeeze(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  dims = {d % len(in_shapes[0]) for d in eqn.params["dimensions"]}
  return [[lab for a, lab in enumerate(ins[0]) if a not in dims]]


@_rule("reshape")
def _reshape(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  if eqn.params.get("dimensions") not in (None, ()):
    return t.block_all(eqn, ins)
  return [_regroup(t, eqn, ins[0], in_shapes[0], out_shapes[0])]


@_rule("expand_dims")
def _expand_dims(t: Tracer, eqn, ins, in_shapes, out_shapes) -> Labels:
  return [_regroup(t, eqn, ins[0], in_shapes[0], out_shapes[0])]


def _regroup(t: Tracer, eqn: Any, lab_in: list[Label], shape_in: Shape, shape_out: Shape):
  """Maps labels through a reshape, group by group of axes with equal products."""
  out: list[Label] = [None] * len(shape_out)
  i = o = 0
  while i < len(shape_in) or o < len(shape_out):
    i0, o0 = i, o
    pi = po = 1
    if i < len(shape_in):
      pi *= shape_in[i]
      i += 1
    if o < len(shape_out):
      po *= shape_out[o]
      o += 1
    while pi != po:
      if pi < po:
        pi *= shape_in[i]
        i += 1
      else:
        po *= shape_out[o]
        o += 1
    # absorb trailing size-1 axes into this group
    while i < len(shape_in) and shape_in[i] == 1 and (o >= len(shape_out) or shape_out[o] != 1):
      i += 1
    while o < len(shape_out) and shape_out[o] == 1 and (i >= len(shape_in) or shape_in[i] != 1):
      o += 1
    group_in, group_out = list(range(i0, i)), list(range(o0, o))
    if all(lab_in[a] is None for a in group_in):
      continue
    heads = _split_or_merge(t, lab_in, shape_in, shape_out, group_in, group_out)
    if heads is not None:
      for a, lab in zip(group_out, heads):
        out[a] = lab
      continue
    sizes_in = [shape_in[a] for a in group_in]
    block = np.full(sizes_in, -1, dtype=np.int64)
    for k, a in enumerate(group_in):
      lab = lab_in[a]
      if lab is None:
        continue
      view = [1] * len(sizes_in)
      view[k] = sizes_in[k]
      here = np.broadcast_to(lab.reshape(view), sizes_in)
      if ((block >= 0) & (here >= 0)).any():
        t.atoms.block(lab, where(eqn) + " (merges two channel axes)")
      block = np.where(block >= 0, block, here)
    block = block.reshape([shape_out[a] for a in group_out])
    represented = np.zeros(block.shape, bool)
    for k, a in enumerate(group_out):
      moved = np.moveaxis(block, k, -1).reshape(-1, block.shape[k])
      if (moved >= 0).any() and (moved == moved[:1]).all():
        out[a] = moved[0]
        represented |= np.broadcast_to(
          np.expand_dims(moved[0] >= 0, tuple(j for j in range(block.ndim) if j != k)),
          block.shape,
        )
    lost = block[(block >= 0) & ~represented]
    if lost.size:
      t.atoms.block(np.unique(lost), where(eqn) + " (splits a channel axis)")
  return out


def _split_or_merge(t: Tracer, lab_in, shape_in, shape_out, group_in, group_out):
  """Labels of a reshape that splits one channel axis into several (features into
  (heads, head_dim)) or merges several into one, or ``None`` for any other reshape.

  A split gives each new axis fresh atoms and makes every entry of the split axis a
  composite of them: head ``h`` is then every entry ``h * head_dim + d``, and the
  classes of the new atoms are whole heads and head dims. A merge makes the entries of
  the merged axis composites of the merged axes' atoms.
  """
  big_in = [a for a in group_in if shape_in[a] > 1]
  big_out = [a for a in group_out if shape_out[a] > 1]
  if len(big_in) == 1 and len(big_out) >= 2:
    lab = lab_in[big_in[0]]
    if lab is None:
      return None
    sizes = [shape_out[a] for a in big_out]
    existing = [t.atoms.parts.get(int(x)) for x in lab.tolist()]
    factors = None
    if all(p is not None and len(p) == len(sizes) for p in existing):
      # split again the way it was split (or merged) before: the same head atoms
      grid = np.array(existing).reshape(*sizes, len(sizes))
      factors = [
        np.moveaxis(grid[..., k], k, 0).reshape(sizes[k], -1)[:, 0] for k in range(len(sizes))
      ]
      for k, f in enumerate(factors):
        view = [1] * len(sizes)
        view[k] = sizes[k]
        if not (grid[..., k] == f.reshape(view)).all():
          return None
    if factors is None:
      factors = t.atoms.factors(sizes)
      for i, x in enumerate(lab.tolist()):
        if x >= 0:
          idx = np.unravel_index(i, sizes)
          t.atoms.parts[x] = tuple(int(f[j]) for f, j in zip(factors, idx))
    labels = dict(zip(big_out, factors))
    return [labels.get(a) for a in group_out]
  if len(big_out) == 1 and len(big_in) >= 2 and all(lab_in[a] is not None for a in big_in):
    labs = [lab_in[a] for a in big_in]
    if any((lab < 0).any() for lab in labs):
      return None
    sizes = [shape_in[a] for a in big_in]
    merged = t.atoms.new(-1, -1, int(np.prod(sizes)))
    for i, x in enumerate(merged.tolist()):
      idx = np.unravel_index(i, sizes)
      t.atoms.parts[x] = tuple(int(lab[j]) for lab, j in zip(labs, idx))
    return [merged if a == big_out[0] else None for a in group_out]
  return None
