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
from jaxprune.surgery.graph import Atoms, Tracer


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
  """

  name: str
  members: tuple[tuple[str, int], ...]
  producers: tuple[tuple[str, int], ...]
  channels: tuple[dict[tuple[str, int], np.ndarray], ...]
  blocked: str | None

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
      status = f"blocked: {g.blocked}" if g.blocked else "prunable"
      lines.append(f"group {i}: {g.name} ({g.size} channels, {status})")
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
  in_labels += [[None] * len(x.shape) for x in avals[len(paths) :]]
  outs = Tracer(atoms, paths).run(closed.jaxpr, in_labels)
  for labels in outs:
    for lab in labels:
      atoms.block(lab, "the model output")
  shapes = {p: tuple(x.shape) for p, x in zip(paths, avals)}
  return Plan(_groups(atoms, paths), paths, shapes, closed, traced.fn)


def _groups(atoms: Atoms, paths: tuple[str, ...]) -> tuple[Group, ...]:
  classes: dict[int, list[int]] = collections.defaultdict(list)
  for a in range(len(atoms.parent)):
    classes[atoms.find(a)].append(a)
  by_signature: dict[tuple, list[list[int]]] = collections.defaultdict(list)
  for members in classes.values():
    if not any(a in atoms.producer for a in members):
      continue
    signature = tuple(sorted({atoms.origin[a][:2] for a in members}))
    by_signature[signature].append(members)
  groups = []
  for signature, chans in by_signature.items():
    first_producer = min(
      (atoms.origin[a][:2] for a in chans[0] if a in atoms.producer), key=lambda la: la
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
        idx[(paths[leaf], axis)].append(i)
        if blocked is None and a in atoms.blocked:
          blocked = atoms.blocked[a]
      channels.append({k: np.sort(np.asarray(v)) for k, v in idx.items()})
    members = tuple((paths[leaf], axis) for leaf, axis in signature)
    producers = tuple(
      sorted(
        {(paths[atoms.origin[a][0]], atoms.origin[a][1]) for a in chans[0] if a in atoms.producer}
      )
    )
    groups.append(
      Group(
        name=paths[first_producer[0]],
        members=members,
        producers=producers,
        channels=tuple(channels),
        blocked=blocked,
      )
    )
  groups.sort(key=lambda g: tree_lib.natural_key(g.name))
  return tuple(groups)
