"""Sparsity distributions: one overall sparsity -> a sparsity per layer.

``uniform(s)`` gives every pruned layer ``s``. ``erk(s)`` (Erdos-Renyi-Kernel, Evci et
al. 2020, after Mocanu et al.'s Erdos-Renyi) gives a layer the density
``eps * sum(shape) / prod(shape)``, with ``eps`` solved so that the pruned layers
together keep ``(1 - s)`` of their weights; a layer whose density would exceed 1 is made
dense and ``eps`` is solved again over the others, until every density is at most 1.

A :class:`Distribution` is accepted wherever a sparsity is: by the pruners
(``jaxprune.magnitude(erk(0.9))``, with a schedule: ``magnitude(erk(agp(0.9, ...)))``)
and by the sparse trainers (``rigl(optax.adam(1e-3), erk(0.9), end=...)``). The total is
over the params the pruner or trainer acts on (its ``where``, minus the layers that
``dense_first`` / ``dense_last`` keep dense).

A layer that a distribution would leave with no weight at all (``round(s_l * n_l) ==
n_l``, e.g. ``erk(0.999)`` on small layers) is an error naming it, not a silent cut of
the network, nor a floor of one weight that would change the total.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxprune import _checks
from jaxprune.schedules import Schedule
from jaxprune.select import check_sparsity, n_pruned


@dataclasses.dataclass(frozen=True)
class Distribution:
  """How an overall sparsity is spread over layers.

  Attributes:
    kind: ``"uniform"`` or ``"erk"``.
    sparsity: the overall sparsity: a float in ``[0, 1)`` or a :class:`jaxprune.Schedule`
      (for pruners; each layer then follows the schedule scaled to its own final value).
    power: ERK's exponent on ``sum(shape) / prod(shape)`` (1.0 in Evci et al.).
  """

  kind: str
  sparsity: float | Schedule
  power: float = 1.0

  def __post_init__(self):
    if self.kind not in ("uniform", "erk"):
      raise ValueError(f"Distribution kind must be 'uniform' or 'erk', got {self.kind!r}.")
    if not isinstance(self.sparsity, Schedule):
      check_sparsity(self.sparsity, f"{self.kind}(sparsity)")
    elif self.sparsity.final is None:
      raise ValueError(
        f"{self.kind}(schedule): the schedule has no final sparsity to distribute; build it "
        "with jaxprune.agp, jaxprune.iterative, ... or pass final= to jaxprune.schedule."
      )
    _checks.number(self.power, "power", self.kind, low=0.0)

  @property
  def final(self) -> float:
    """The overall sparsity at the end (the float, or the schedule's final value)."""
    s = self.sparsity
    final = s.final if isinstance(s, Schedule) else s
    if final is None:
      raise ValueError(f"The {self.kind} distribution's schedule has no final sparsity.")
    return float(final)

  def sparsities(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """``{path: sparsity}`` for layers of the given shapes, at the final overall sparsity.

    Raises:
      ValueError: when a layer would keep no weight (``round(s_l * n_l) == n_l``):
        a layer with every weight pruned cuts the network, so it is an error, not a
        floor of one weight; lower the sparsity or leave the layer out (``where``,
        ``dense_first``, ``dense_last``).

    Examples:
      >>> from jaxprune.sparse import erk
      >>> s = erk(0.9).sparsities({"a": (100, 100), "b": (100, 10)})
      >>> {k: round(v, 4) for k, v in s.items()}
      {'a': 0.929, 'b': 0.6097}
    """
    per_layer = layer_sparsities(self.kind, self.final, shapes, self.power)
    empty = [
      p for p, s in per_layer.items() if n_pruned(math.prod(shapes[p]), s) == math.prod(shapes[p])
    ]
    if empty:
      layers = ", ".join(
        f"{p!r} (shape {tuple(shapes[p])}, sparsity {per_layer[p]:.6g})" for p in empty
      )
      raise ValueError(
        f"{self.kind}({self.final:g}) leaves no weight in {len(empty)} layer(s): {layers}. "
        "Lower the sparsity, or keep those layers dense (where=, dense_first=, dense_last=)."
      )
    return per_layer


def uniform(sparsity: float | Schedule) -> Distribution:
  """The same sparsity in every pruned layer.

  Examples:
    >>> from jaxprune.sparse import uniform
    >>> uniform(0.8).sparsities({"a": (4, 4), "b": (8, 2)})
    {'a': 0.8, 'b': 0.8}
  """
  return Distribution("uniform", sparsity)


def erk(sparsity: float | Schedule, *, power: float = 1.0) -> Distribution:
  """Erdos-Renyi-Kernel: density proportional to ``sum(shape) / prod(shape)``.

  Small layers (few weights per input+output unit) stay denser; a layer that would get
  a density above 1 is dense and the rest are solved again, so the total is exact.
  ``power`` scales the exponent (jaxpruner's and RigL's ``erk_power_scale``).

  Examples:
    >>> from jaxprune.sparse import erk
    >>> s = erk(0.5).sparsities({"small": (2, 2), "big": (100, 100)})
    >>> s["small"], round(s["big"], 6)
    (0.0, 0.5002)
  """
  return Distribution("erk", sparsity, power)


def layer_sparsities(
  kind: str, sparsity: float, shapes: Mapping[str, Sequence[int]], power: float = 1.0
) -> dict[str, float]:
  """Per-layer sparsities of a ``uniform`` or ``erk`` distribution (float64, on the host).

  For ERK the kept count ``(1 - s) * N`` over all layers (``N`` their total size) is
  matched with real densities: ``sum_l d_l n_l = (1 - s) N``. Rounding each layer's
  count (``round(s_l * n_l)`` weights pruned) can move the total by at most half a
  weight per layer.
  """
  check_sparsity(sparsity)
  sizes = {p: math.prod(int(d) for d in shape) for p, shape in shapes.items()}
  if not sizes:
    raise ValueError("A sparsity distribution needs at least one layer.")
  for p, shape in shapes.items():
    if len(shape) == 0 or sizes[p] == 0:
      raise ValueError(f"Layer {p!r} has shape {tuple(shape)}: nothing to distribute over.")
  if kind == "uniform":
    return {p: float(sparsity) for p in sizes}
  raw = {p: (sum(int(d) for d in shapes[p]) / sizes[p]) ** power for p in sizes}
  dense: set[str] = set()
  eps = 0.0
  while len(dense) < len(sizes):  # all dense: sparsity 0, where eps * raw can round past 1
    budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[p] for p in dense)
    divisor = sum(raw[p] * sizes[p] for p in sizes if p not in dense)
    eps = budget / divisor
    over = [p for p in sizes if p not in dense and eps * raw[p] > 1.0]
    if not over:
      break
    top = max(raw[p] for p in over)
    dense |= {p for p in over if raw[p] == top}  # the densest first, then solve again
  return {p: 0.0 if p in dense else min(max(1.0 - eps * raw[p], 0.0), 1.0) for p in sizes}


def as_distribution(sparsity: Any) -> Distribution:
  """A :class:`Distribution` as it is; a float or schedule -> :func:`uniform`."""
  return sparsity if isinstance(sparsity, Distribution) else uniform(sparsity)
