"""Which channels of each group ``shrink`` tries to remove, and why the others stay."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune.surgery.planning import Group, Plan

Stayed = dict[str, list[tuple[list[int], str]]]  # group -> [(channels, why)]


def _zero(values: dict[str, np.ndarray], chan: dict, member: tuple[str, int]) -> bool:
  path, axis = member
  return not np.any(np.take(values[path], chan[member], axis=axis))


def dead_channels(group: Group, values: dict[str, np.ndarray]) -> list[int]:
  """Channels of ``group`` whose producer slices are all exactly zero."""
  return [
    j for j, c in enumerate(group.channels) if all(_zero(values, c, m) for m in group.producers)
  ]


def _partly_zero_blocks(
  group: Group,
  values: dict[str, np.ndarray],
  skip: set[int],
  explained: Mapping[tuple[str, int], set[int]],
) -> list[int]:
  """Channels of ``group`` that are several entries of a producer's axis (a GroupNorm
  group of conv channels, a head of a q projection's features) of which some, not all,
  are zero, other than the entries of another group's dead channels (``explained``):
  pruned channels that stay because the unit is the whole block."""
  out = []
  for j, c in enumerate(group.channels):
    if j in skip:
      continue
    for path, axis in group.producers:
      idx = c[(path, axis)]
      if len(idx) < 2:
        continue
      block = np.moveaxis(np.take(values[path], idx, axis=axis), axis, 0)
      zero = ~block.reshape(len(idx), -1).any(axis=1)
      zero &= ~np.isin(idx, list(explained.get((path, axis), ())))
      if 0 < zero.sum() < len(idx):
        out.append(j)
        break
  return out


def check_remove(plan: Plan, remove: Mapping[str, Sequence[int]], what: str = "remove=") -> None:
  """Raises a ``ValueError`` naming the problem with ``{group name: channels}``."""
  groups = {g.name: g for g in plan.groups}
  for name, chans in remove.items():
    if name not in groups:
      raise KeyError(
        f"No group {name!r} (in {what}); the groups are (name: channels): "
        + ", ".join(f"{g.name}: {g.size}" for g in plan.groups)
      )
    g = groups[name]
    bad = [j for j in chans if not isinstance(j, int | np.integer) or not 0 <= int(j) < g.size]
    if bad:
      raise ValueError(
        f"{what}: group {name!r} has channels 0..{g.size - 1}; got {bad[:5]} "
        "(channel indices within the group, see print(plan))."
      )
    if g.blocked and len(chans):
      raise ValueError(f"{what}: group {name!r} cannot be pruned: blocked by {g.blocked}.")


def choose(
  plan: Plan,
  values: dict[str, np.ndarray],
  remove: Mapping[str, Sequence[int]],
  protect: Callable[[str, Any], bool],
  head_dim: bool = False,
) -> tuple[dict[str, list[int]], Stayed]:
  """``{group: channels to try to remove}``, and the pruned channels that stay, with why.

  A channel is a candidate when all its producers' weights are zero (``values`` are
  masked, and zeroed where ``remove=`` asks). Channels zero in some of their producers
  only (masks that disagree on the two sides of a residual add) stay, and so does one
  channel of a group whose channels are all pruned.
  """
  candidates: dict[str, list[int]] = {}
  stayed: Stayed = {}
  # Entries of each producer axis that some group's dead channel explains (the dims of a
  # removed head dim are zero in every head: those heads are not "partly pruned").
  explained: dict[tuple[str, int], set[int]] = {}
  for g in plan.groups:
    for j in dead_channels(g, values) if not g.blocked else ():
      for member in g.producers:
        explained.setdefault(member, set()).update(int(i) for i in g.channels[j][member])
  for g in plan.groups:
    if g.blocked or any(protect(p, values[p]) for p, _ in g.producers):
      continue
    if g.kind == "head_dim" and not head_dim and g.name not in remove:
      continue
    chans = dead_channels(g, values)
    notes = []
    if len(g.producers) > 1 and g.name not in remove:
      partly = {}
      for j, c in enumerate(g.channels):
        zero = [p for p, a in g.producers if _zero(values, c, (p, a))]
        if zero and len(zero) < len(g.producers):
          partly.setdefault(tuple(zero), []).append(j)
      for zero, js in partly.items():
        live = [p for p, _ in g.producers if p not in zero]
        notes.append(
          (
            js,
            f"pruned in {', '.join(zero)} but not in {', '.join(live)}: a channel goes only "
            "when every layer writing it is zero (e.g. both sides of a residual add)",
          )
        )
    if g.name not in remove:
      skip = set(chans) | {j for js, _ in notes for j in js}
      blocks = _partly_zero_blocks(g, values, skip, explained)
      if blocks:
        n = max(len(g.channels[j][m]) for j in blocks for m in g.producers)
        notes.append(
          (
            blocks,
            f"each is a block of {n} entries of its layer's output (a GroupNorm group, a "
            "head); only some of them are pruned, and only whole blocks go",
          )
        )
    if chans and len(chans) >= g.size:
      notes.append(
        ([chans[-1]], f"all {g.size} channels are pruned; one stays so the layer has an output")
      )
      chans = chans[:-1]
    if notes:
      stayed[g.name] = notes
    if chans:
      candidates[g.name] = chans
  return candidates, stayed


def round_widths(
  plan: Plan, removed: dict[str, list[int]], multiple_of: int, stayed: Stayed
) -> dict[str, list[int]]:
  """``removed`` with fewer channels, so every new width is a multiple of ``multiple_of``.

  The channels kept for it are noted in ``stayed``.
  """
  out = {}
  for name, chans in removed.items():
    size = plan.group(name).size
    target = min(size, -(-(size - len(chans)) // multiple_of) * multiple_of)
    chans = sorted(chans)
    go, back = chans[: size - target], chans[size - target :]
    if back:
      stayed.setdefault(name, []).append(
        (back, f"kept to round the width up to a multiple of {multiple_of}")
      )
    if go:
      out[name] = go
  return out
