"""Channel pruning in the training pipeline: L1 filters, SSL, Network Slimming, APoZ.

These methods remove whole channels, once, at step ``prune.begin``, and choose them with
more than the weights: the model's coupled channel groups (traced by
:func:`jaxprune.surgery.plan`), a sensitivity sweep or activations over held-out data.

* ``l1_filter`` (Li et al. 2017): the channels with the smallest filter L1 norm,
  ``prune.sparsity`` of every group (``prune.ratios="uniform"``) or per-group ratios
  from a sensitivity sweep (``"sensitivity"``: the largest ratio whose accuracy drop on
  the validation slice stays within ``sensitivity.max_drop``).
* ``slimming`` (Liu et al. 2017): train with ``regularize.method="l1"`` on the BatchNorm
  scales, then remove the channels with the smallest ``|gamma|``: one threshold over the
  net (``prune.scope="global"``, the paper) or ``prune.sparsity`` of each group
  (``"layer"``).
* ``apoz`` (Hu et al. 2016): the channels whose ReLU outputs are most often zero over the
  validation slice, ``prune.sparsity`` of each layer matched by ``prune.layers``.
* ``ssl`` (Wen et al. 2016): train with ``regularize.method="group_lasso"``, then remove
  every channel the proximal steps left idle (all producers zero, or every consumer's
  input slice zero: :func:`jaxprune.surgery.idle_channels`).

Every channel is removed from each array of its group (filter, BatchNorm scale and
bias, the consumers' input channels), so the masks are exactly what
:func:`jaxprune.surgery.shrink` needs to cut a smaller model. The regularizer acts until
``prune.begin``; the masks then stay fixed in the optimizer's
:class:`jaxprune.MaskedState` while the network fine-tunes. The validation slice is the
last ``sensitivity.examples`` training examples (the test split is never used to choose).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import surgery
from jaxprune import tree as tree_lib
from jaxprune.analysis.activation_zeros import apoz
from jaxprune.analysis.sweep import Sensitivity, channel_sensitivity, choose_ratios
from jaxprune.train import data
from jaxprune.train.config_type import Config

CHANNEL_METHODS = ("l1_filter", "slimming", "apoz", "ssl")
RATIOS = ("uniform", "sensitivity")


def is_channel_method(config: Config) -> bool:
  """Whether ``config.prune.method`` removes whole channels at ``prune.begin``."""
  return config.prune.method in CHANNEL_METHODS


def full_masks(params: Any, masks: Any = None) -> Any:
  """Bool masks over every leaf of ``params``: ``masks`` where given, ``True`` elsewhere.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.train import structured
    >>> m = structured.full_masks({"a": jnp.ones(2), "b": jnp.ones(1)}, {"a": jnp.array([True, False]), "b": None})
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, False], [True])
  """
  if masks is None:
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
  return jax.tree.map(
    lambda m, x: jnp.ones(jnp.shape(x), bool) if m is None else jnp.asarray(m, bool),
    masks,
    params,
    is_leaf=lambda m: m is None,
  )


@dataclasses.dataclass(frozen=True)
class ChannelPruning:
  """What :func:`prune_channels` chose.

  Attributes:
    method: the ``prune.method``.
    masks: bool masks over every param (``True`` = kept).
    sizes: ``{group name: channels before}`` of the prunable groups.
    removed: ``{group name: removed channel indices}``.
    sensitivity: the sweep behind the ratios (``l1_filter`` with ``"sensitivity"``).
  """

  method: str
  masks: Any
  sizes: dict[str, int]
  removed: dict[str, list[int]]
  sensitivity: Sensitivity | None = None

  @property
  def fraction(self) -> float:
    """The fraction of the prunable groups' channels removed."""
    total = sum(self.sizes.values())
    return sum(len(r) for r in self.removed.values()) / max(1, total)

  def report(self) -> str:
    lines = [f"{self.method}: removed {self.fraction:.1%} of the prunable channels"]
    for name, size in self.sizes.items():
      lines.append(f"  {name}: {size} -> {size - len(self.removed.get(name, ()))} channels")
    return "\n".join(lines)


def removed_channels(plan: surgery.Plan, masks: Any) -> dict[str, list[int]]:
  """``{group name: channels}`` whose first producer's slice is entirely masked out."""
  leaves = tree_lib.leaves_with_paths(masks)
  removed = {}
  for g in plan.groups:
    if g.blocked:
      continue
    path, axis = g.producers[0]
    mask = next((np.asarray(m) for p, m in leaves if tree_lib.same_leaf(path, p)), None)
    if mask is None:
      continue
    gone = [j for j, ch in enumerate(g.channels) if not np.take(mask, ch[path, axis], axis).any()]
    if gone:
      removed[g.name] = gone
  return removed


def _apoz_removal(
  plan: surgery.Plan, values: dict[str, np.ndarray], sparsity: float
) -> dict[str, list[int]]:
  """Per layer's group, the ``round(sparsity * C)`` channels with the highest APoZ."""
  remove = {}
  for layer, zeros in values.items():
    owners = [
      g for g in plan.groups if any(p == layer or p.startswith(layer + "/") for p, _ in g.producers)
    ]
    if len(owners) != 1:
      found = [g.name for g in owners] or "none"
      raise ValueError(
        f"prune.layers: layer {layer!r} must produce the channels of exactly one group "
        f"of the traced model; it produces {found}. Name the module whose output is the "
        "activation of one conv/Dense (e.g. a conv-BN-ReLU block)."
      )
    g = owners[0]
    if g.blocked:
      raise ValueError(f"prune.layers: the channels of {layer!r} cannot be removed: {g.blocked}.")
    if len(zeros) != g.size:
      raise ValueError(f"{layer!r} has {len(zeros)} units but its group has {g.size} channels.")
    n = min(g.size - 1, int(round(sparsity * g.size)))
    # highest APoZ first; ties: the higher index goes first (the lower one is kept, as in
    # analysis.apoz_masks and the pruners)
    order = np.lexsort((-np.arange(g.size), -np.asarray(zeros, np.float64)))
    remove[g.name] = sorted(int(j) for j in order[:n])
  return remove


def prune_channels(
  config: Config,
  model: nnx.Module,
  validation: data.Source,
  evaluate: Callable[[Any], float],
  *,
  example_input: Any,
) -> ChannelPruning:
  """Chooses the channels to remove with ``config.prune.method`` (see the module doc).

  Args:
    config: the run's config.
    model: the trained NNX model (put in eval mode here).
    validation: the examples for the sensitivity sweep and the APoZ statistics.
    evaluate: ``params -> accuracy`` on ``validation`` (the model's other state fixed).
    example_input: one batch of inputs to trace the model with.

  Returns:
    A :class:`ChannelPruning` whose masks cover every param of ``model``.
  """
  p = config.prune
  model.eval()
  params = nnx.state(model, nnx.Param)
  plan = surgery.plan(model, example_input=example_input)
  sweep = None
  if p.method == "l1_filter" and p.ratios == "sensitivity":
    s = config.sensitivity
    sweep = channel_sensitivity(
      plan, params, evaluate, tuple(s.grid), progress=config.train.progress
    )
    ratios = choose_ratios(sweep, s.max_drop, regex=False)
    masks = surgery.channel_masks(plan, params, ratios)
  elif p.method == "l1_filter":
    masks = surgery.channel_masks(plan, params, p.sparsity)
  elif p.method == "slimming":
    masks = surgery.slimming_masks(plan, params, p.sparsity, scope=p.scope)
  elif p.method == "apoz":
    n, size = len(validation), config.data.eval_batch_size
    batches = (validation.take(np.arange(i, min(i + size, n)))[0] for i in range(0, n, size))
    values = apoz(model, batches, layers=p.layers)
    masks = surgery.group_masks(plan, params, _apoz_removal(plan, values, p.sparsity))
  elif p.method == "ssl":
    masks = surgery.group_masks(plan, params, surgery.idle_channels(plan, params))
  else:
    raise ValueError(f"prune.method: {p.method!r} is not one of {CHANNEL_METHODS}.")
  masks = full_masks(params, masks)
  sizes = {g.name: g.size for g in plan.groups if not g.blocked}
  return ChannelPruning(p.method, masks, sizes, removed_channels(plan, masks), sweep)


def validation_split(config: Config, train: data.Source) -> data.Source:
  """The last ``sensitivity.examples`` training examples (all of them if fewer)."""
  n = min(len(train), config.sensitivity.examples)
  return data.Subset(train, np.arange(len(train) - n, len(train)))
