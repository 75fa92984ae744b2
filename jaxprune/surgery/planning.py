"""Coupled channel groups of a model: what surgery slices together, printable."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.surgery import capture
from jaxprune.surgery.graph import Atoms, Tracer, Value

# What one channel of a group of each kind is called in ``print(plan)`` and reports.
UNITS = {"neurons": "channels", "channels": "channels", "heads": "heads", "head_dim": "head dims"}


@dataclasses.dataclass(frozen=True)
class Group:
  """Channels that exist together: removing channel j slices every member at its indices.

  Attributes:
    name: the first producer's path (the layer whose output features these are).
    members: ``(path, axis)`` of every array sliced by this group.
    producers: the members that compute the channels (output axes of kernels).
    channels: per channel, ``{(path, axis): indices}`` (a flatten maps one conv channel
      to many Dense rows).
    blocked: why this group cannot be sliced (an op, the model output), or ``None``.
    kind: ``"neurons"`` (a dense layer's outputs, an MLP's hidden units), ``"channels"``
      (a conv's), ``"heads"`` (attention heads: the q/k/v features of a head and the
      output projection's rows that read them; with grouped-query attention a KV head
      with its query heads, or one query head of every KV group) or ``"head_dim"``
      (one dimension of every head: removed only when asked).
    axis: the first producer's axis.
    contracted: its channels are contracted by q.k (a dot between two activations
      whose output goes through a softmax).
    roles: what its channels are to attention, read from the dataflow: ``"qk"``
      (contracted by q.k), ``"v"`` (a free axis of the values that the softmax weights
      are applied to), ``"heads"`` (an axis both sides of q.k keep), ``"query"`` (an
      axis only the query side keeps: grouped-query attention's query heads of each KV
      group), ``"shared"`` (a head that several query heads read: repeated KV heads),
      ``"dim"`` (the other axis of a split whose heads attention reads).
    tied: the groups merged into this one (:func:`tie`), and why.
  """

  name: str
  members: tuple[tuple[str, int], ...]
  producers: tuple[tuple[str, int], ...]
  channels: tuple[dict[tuple[str, int], np.ndarray], ...]
  blocked: str | None
  kind: str = "neurons"
  axis: int = -1
  contracted: bool = False
  roles: frozenset[str] = frozenset()
  tied: tuple[str, ...] = ()

  @property
  def size(self) -> int:
    return len(self.channels)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The coupled groups of a traced model (``print`` it) and how to run the model."""

  groups: tuple[Group, ...]
  paths: tuple[str, ...]
  shapes: dict[str, tuple[int, ...]]
  jaxpr: Any
  fn: Callable[..., Any]

  def __str__(self) -> str:
    lines = []
    for i, g in enumerate(self.groups):
      if g.blocked:
        status = f"blocked: {g.blocked}"
      elif g.kind == "head_dim":
        status = "removed only when asked: shrink(..., head_dim=True)"
      else:
        status = "prunable"
      tied = "".join(f", tied with {t}" for t in g.tied)
      lines.append(f"group {i}: {g.name} ({g.size} {UNITS[g.kind]}, {status}{tied})")
      for path, axis in g.members:
        n = len(g.channels[0][(path, axis)]) if g.channels else 0
        per = f", {n} per channel" if n > 1 else ""
        role = " (producer)" if (path, axis) in g.producers else ""
        lines.append(f"    {path} axis {axis}{per}{role}")
    return "\n".join(lines)

  def group(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"No group {name!r}; groups: {[g.name for g in self.groups]}")


def tie(plan: Plan, name: str, other: str, why: str) -> Plan:
  """``plan`` with group ``other`` merged into ``name``, channel by channel: channel j
  of the result slices what channel j of both did (a module that has one size for
  both, e.g. one ``head_dim`` for q.k and for v). ``why`` says so in ``print(plan)``."""
  a, b = plan.group(name), plan.group(other)
  if a.size != b.size:
    raise ValueError(f"Cannot tie {name!r} ({a.size}) and {other!r} ({b.size}): {why}")
  merged = dataclasses.replace(
    a,
    members=a.members + b.members,
    producers=tuple(sorted(set(a.producers + b.producers))),
    channels=tuple({**ca, **cb} for ca, cb in zip(a.channels, b.channels)),
    blocked=a.blocked or b.blocked,
    contracted=a.contracted or b.contracted,
    roles=a.roles | b.roles,
    tied=(*a.tied, f"{other} ({why})"),
  )
  groups = tuple(merged if g.name == name else g for g in plan.groups if g.name != other)
  return dataclasses.replace(plan, groups=groups)


def trace(fn: Callable[..., Any], variables: Any, *example_inputs: Any) -> Plan:
  """Traces ``fn(variables, *inputs)`` from shapes and returns its channel groups.

  Args:
    fn: the forward pass in eval mode, ``(variables, *inputs) -> outputs``.
    variables: the pytree of all model arrays (params, batch stats, ...).
    *example_inputs: arrays or ``jax.ShapeDtypeStruct`` (only shapes are used).

  Returns:
    A :class:`Plan`.
  """
  traced = capture.trace(fn, variables, *example_inputs)
  closed, paths = traced.jaxpr, traced.paths
  avals = [v.aval for v in closed.jaxpr.invars]
  atoms = Atoms()
  in_labels = []
  for i, x in enumerate(avals[: len(paths)]):
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    in_labels.append([atoms.new(i, a, n) if floating else None for a, n in enumerate(x.shape)])
  in_labels += [Value.input(len(x.shape)) for x in avals[len(paths) :]]
  outs = Tracer(atoms, paths).run(closed.jaxpr, in_labels)
  for labels in outs:
    for lab in labels:
      atoms.block(lab, "the model output")
  shapes = {p: tuple(x.shape) for p, x in zip(paths, avals)}
  return Plan(_groups(atoms, paths), paths, shapes, closed, traced.fn)


def _resolve(atoms: Atoms) -> dict[int, tuple[int, ...]]:
  """``{class root: its leaf classes}`` for the composite classes, after uniting the parts
  of composites found in one class (the heads of q, k, v and of the output projection's
  rows are one head). A class that two reshapes factor differently is blocked."""
  while True:
    changed = False
    rep: dict[int, tuple[int, ...]] = {}
    for c, parts in atoms.parts.items():
      r = atoms.find(c)
      mine = tuple(atoms.find(x) for x in parts)
      if r not in rep:
        rep[r] = mine
      elif rep[r] != mine and len(rep[r]) == len(mine):
        for a, b in zip(rep[r], mine):
          if a != b:
            atoms.parent[b] = a
            changed = True
      elif rep[r] != mine:
        atoms.blocked.setdefault(c, "a reshape that splits these channels two different ways")
    if not changed:
      break
  leaves: dict[int, tuple[int, ...]] = {}

  def flat(r: int, seen: frozenset = frozenset()) -> tuple[int, ...]:
    if r not in rep or r in seen:
      return (r,)
    if r not in leaves:
      leaves[r] = tuple(x for p in rep[r] for x in flat(atoms.find(p), seen | {r}))
    return leaves[r]

  return {r: flat(r) for r in rep}


def _kind(atoms: Atoms, members: list[int], roles: frozenset[str]) -> str:
  """What a class of atoms is: ``heads``, ``head_dim``, ``channels`` (conv) or ``neurons``.

  Heads and head dims are what attention makes of them (``roles``, from the dataflow:
  q.k followed by a softmax), not any reshape into two axes: a gated MLP whose gate and
  up projections are stacked on an axis of size 2 has neurons.
  """
  if roles & {"qk", "v", "dim"}:
    return "head_dim"
  if roles & {"heads", "query"}:
    return "heads"
  return "channels" if any(a in atoms.conv for a in members) else "neurons"


def _head_dims_by_split(atoms: Atoms, composite: dict[int, tuple[int, ...]]) -> None:
  """Gives role ``"dim"`` to the other axes of a split into (heads, head_dim) whose heads
  attention reads: a head dim that rotary embeddings slice (so q.k contracts no labels of
  it) is still a head dim."""
  by_class: dict[int, set[str]] = collections.defaultdict(set)
  for a, rs in atoms.roles.items():
    by_class[atoms.find(a)] |= rs

  def roles(x: int) -> set[str]:
    r = atoms.find(x)
    return set().union(*(by_class[leaf] for leaf in composite.get(r, (r,))))

  for factors in atoms.splits:
    found = [set().union(*(roles(int(x)) for x in f)) for f in factors]
    if any(r & {"heads", "query"} for r in found):
      for f, r in zip(factors, found):
        if not r & {"heads", "query"}:
          for x in f.tolist():
            atoms.roles.setdefault(x, set()).add("dim")


def _groups(atoms: Atoms, paths: tuple[str, ...]) -> tuple[Group, ...]:
  composite = _resolve(atoms)
  _head_dims_by_split(atoms, composite)
  # every atom's leaf classes: itself, or the classes of the parts of its composite class
  classes: dict[int, list[int]] = collections.defaultdict(list)
  # where a class sits in the composites it is part of: heads and head dims of one
  # projection slice the same arrays, and are told apart by it
  positions: dict[int, set[int]] = collections.defaultdict(set)
  for a in range(len(atoms.parent)):
    r = atoms.find(a)
    for k, leaf in enumerate(composite.get(r, (r,))):
      classes[leaf].append(a)
      if r in composite:
        positions[leaf].add(k)
  by_signature: dict[tuple, list[list[int]]] = collections.defaultdict(list)
  for root, members in classes.items():
    if not any(a in atoms.producer for a in members):
      continue
    signature = tuple(sorted({atoms.origin[a][:2] for a in members if atoms.origin[a][0] >= 0}))
    by_signature[(signature, tuple(sorted(positions[root])))].append(members)
  groups = []
  for (signature, _), chans in by_signature.items():
    if not signature:
      continue
    first_producer = min(
      (atoms.origin[a][:2] for a in chans[0] if a in atoms.producer and atoms.origin[a][0] >= 0),
      default=signature[0],
    )

    def order(members, fp=first_producer):
      return min(atoms.origin[a][2] for a in members if atoms.origin[a][:2] == fp)

    chans.sort(key=order)
    channels = []
    blocked = None
    for members in chans:
      idx: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
      for a in members:
        leaf, axis, i = atoms.origin[a]
        if leaf >= 0:
          idx[(paths[leaf], axis)].append(i)
        if blocked is None and a in atoms.blocked:
          blocked = atoms.blocked[a]
      channels.append({k: np.sort(np.asarray(v)) for k, v in idx.items()})
    members = tuple((paths[leaf], axis) for leaf, axis in signature)
    producers = tuple(
      sorted(
        {
          (paths[atoms.origin[a][0]], atoms.origin[a][1])
          for a in chans[0]
          if a in atoms.producer and atoms.origin[a][0] >= 0
        }
      )
    )
    every = [a for c in chans for a in c]
    roles = frozenset().union(*(atoms.roles.get(a, ()) for a in every))
    kind = _kind(atoms, every, roles)
    groups.append(
      Group(
        name=paths[first_producer[0]],
        members=members,
        producers=producers,
        channels=tuple(channels),
        blocked=blocked,
        kind=kind,
        axis=first_producer[1],
        contracted="qk" in roles,
        roles=roles,
      )
    )
  return tuple(sorted(_names(groups), key=lambda g: tree_lib.natural_key(g.name)))


def _module(g: Group, shapes: dict[str, tuple[int, ...]] | None = None) -> str:
  """The innermost module holding every kernel of a group (its path prefix)."""
  paths = [p.split("/")[:-1] for p, _ in g.members if "/" in p]
  if not paths:
    return ""
  common = paths[0]
  for p in paths[1:]:
    n = 0
    while n < min(len(common), len(p)) and common[n] == p[n]:
      n += 1
    common = common[:n]
  return "/".join(common)


def _names(groups: list[Group]) -> list[Group]:
  """Unique, stable names: a layer's path for its channels, ``MODULE/heads``,
  ``MODULE/kv_heads`` + ``MODULE/query_heads`` (grouped-query attention; ``kv_heads``
  alone when KV heads are repeated for their query heads), ``MODULE/head_dim`` (q.k)
  and ``MODULE/v_head_dim`` for attention, all from the groups' roles (not from the
  params' names)."""
  named = []
  by_module: dict[tuple[str, str], list[Group]] = collections.defaultdict(list)
  for g in groups:
    if g.kind in ("heads", "head_dim"):
      by_module[(_module(g), g.kind)].append(g)
    else:
      named.append(g)
  for (module, kind), gs in by_module.items():
    prefix = module + "/" if module else ""
    grouped = any("query" in g.roles for g in gs)
    for g in gs:
      if kind == "head_dim":
        suffix = "v_head_dim" if "v" in g.roles and "qk" not in g.roles else "head_dim"
      elif "query" in g.roles:
        suffix = "query_heads"
      elif grouped or "shared" in g.roles:
        suffix = "kv_heads"
      else:
        suffix = "heads"
      named.append(dataclasses.replace(g, name=prefix + suffix))
  counts = collections.Counter(g.name for g in named)
  out = []
  for g in named:
    if counts[g.name] > 1:
      g = dataclasses.replace(g, name=f"{g.name}:{g.axis}")
    out.append(g)
  counts = collections.Counter(g.name for g in out)
  seen: collections.Counter = collections.Counter()
  final = []
  for g in sorted(out, key=lambda g: (g.name, g.members)):
    if counts[g.name] > 1:
      seen[g.name] += 1
      g = dataclasses.replace(g, name=f"{g.name}#{seen[g.name]}")
    final.append(g)
  return final
