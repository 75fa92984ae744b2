"""Channel masks over whole coupled groups: by norm, Network Slimming, or explicit.

Pruning a channel means removing it everywhere it exists: the producer's filter and
bias, the norm's scale and bias, and every consumer's input channel (a feature map that
feeds several consumers is cut in all of them). :func:`group_masks` turns a choice of
channels per group into such masks; :func:`slimming_masks` chooses them the Network
Slimming way (Liu et al. 2017): the channels with the smallest ``|gamma|`` (BatchNorm
scale), one threshold over the whole network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.select import check_sparsity, topk_leaves
from jaxprune.surgery.candidates import check_remove
from jaxprune.surgery.planning import Plan


def group_masks(plan: Plan, params: Any, remove: Mapping[str, Sequence[int]]) -> Any:
  """Masks over ``params`` removing the given channels of each group everywhere.

  Args:
    plan: from :func:`jaxprune.surgery.plan`.
    params: the params tree to mask (paths may lack the ``params/`` prefix of Linen
      variables).
    remove: ``{group name: channel indices}``.

  Returns:
    A mask pytree over ``params`` (``None`` where nothing is removed).
  """
  cut: dict[str, np.ndarray] = {}
  groups = {g.name: g for g in plan.groups}
  check_remove(plan, remove, "group_masks: remove")
  for name, chans in remove.items():
    g = groups[name]
    for j in chans:
      for (path, axis), idx in g.channels[j].items():
        if path not in cut:
          cut[path] = np.ones(plan.shapes[path], bool)
        sl: list[slice | np.ndarray] = [slice(None)] * len(plan.shapes[path])
        sl[axis] = idx
        cut[path][tuple(sl)] = False

  by_name = {tree_lib.strip_collection(p): m for p, m in cut.items()}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for p, x in flat:
    m = by_name.pop(tree_lib.strip_collection(tree_lib.path_str(p)), None)
    if m is not None and m.shape != np.shape(x):
      raise ValueError(
        f"group_masks: params {tree_lib.path_str(p)!r} has shape {np.shape(x)}, the model's "
        f"array {m.shape}: pass the params of the model the plan was traced from."
      )
    out.append(None if m is None else jnp.asarray(m))
  producers = {
    tree_lib.strip_collection(p) for n in remove if remove[n] for p, _ in groups[n].producers
  }
  missing = sorted(producers & set(by_name))  # batch statistics may be absent; kernels not
  if missing:
    raise ValueError(
      f"group_masks: the params lack {missing[:5]}, whose channels are removed; params "
      f"have {[tree_lib.path_str(p) for p, _ in flat][:10]}."
    )
  return jax.tree.unflatten(treedef, out)


def slimming_masks(
  plan: Plan, params: Any, sparsity: float, scale: str = "scale", *, scope: str = "global"
) -> Any:
  """Network Slimming: removes the channels with the smallest ``|gamma|`` network-wide.

  Every prunable group that holds a norm scale (a 1-D param whose path ends with
  ``scale``; a NaN or infinite one is a ``ValueError`` naming the group) competes under
  one global threshold; each removed channel is masked in every array of its group. At
  least one channel of each group is kept.

  The paper's global threshold assumes the scales of all layers are comparable. In a
  stack of conv-BN layers trained with the L1 penalty they often are not (the scales of
  a whole layer shrink together and one threshold strips it almost bare):
  ``scope="layer"`` removes ``sparsity`` of each group's channels instead, smallest
  ``|gamma|`` first.

  Args:
    plan: from :func:`jaxprune.surgery.plan`.
    params: the params (with the trained, L1-regularised scales).
    sparsity: fraction of those channels to remove, in ``[0, 1)``.
    scale: the last path component of the norm scales.
    scope: ``"global"`` (one threshold, Liu et al. 2017) or ``"layer"``.

  Returns:
    A mask pytree over ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    ...     self.bn = nnx.BatchNorm(4, rngs=rngs)
    ...     self.head = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))
    >>> net = Net(nnx.Rngs(0))
    >>> net.bn.scale.set_value(jnp.array([1.0, 0.01, 0.5, 0.02]))
    >>> params = nnx.state(net, nnx.Param)
    >>> p = surgery.plan(net, example_input=jnp.ones((1, 5, 5, 1)))
    >>> m = surgery.slimming_masks(p, params, 0.5)
    >>> m["bn"]["scale"].tolist(), m["head"]["kernel"][:, 0].tolist()
    ([True, False, True, False], [True, False, True, False])
  """
  check_sparsity(sparsity)
  if scope not in ("global", "layer"):
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}.")
  values = {p: x for p, x in tree_lib.leaves_with_paths(params)}

  def value(path):
    return _lookup(values, path)

  scored = []
  for g in plan.groups:
    scales = [p for p, a in g.members if p.rsplit("/", 1)[-1] == scale and len(plan.shapes[p]) == 1]
    if g.blocked or not scales or value(scales[0]) is None:
      continue
    gamma = jnp.abs(jnp.asarray(value(scales[0])))
    order = [int(g.channels[j][(scales[0], 0)][0]) for j in range(g.size)]
    if not bool(jnp.isfinite(gamma).all()):  # a NaN ranks anywhere: which channel goes is arbitrary
      bad = [int(j) for j in np.flatnonzero(~np.isfinite(np.asarray(gamma)[order]))]
      raise ValueError(
        f"Group {g.name!r}: the norm scale {scales[0]!r} is NaN or infinite at channels "
        f"{bad[:10]}; Network Slimming ranks channels by |gamma| (fix the params first)."
      )
    scored.append((g, gamma[jnp.asarray(order)]))
  if not scored:
    raise ValueError(
      f"No prunable group has a norm scale ending in {scale!r}; groups: "
      f"{[g.name for g in plan.groups]}"
    )
  kept = topk_leaves([s for _, s in scored], sparsity, scope)
  remove = {}
  for (g, s), k in zip(scored, kept):
    k = np.asarray(k).copy()
    if not k.any():
      k[int(np.argmax(np.asarray(s)))] = True
    remove[g.name] = [int(j) for j in np.flatnonzero(~k)]
  return group_masks(plan, params, remove)


def channel_masks(
  plan: Plan,
  params: Any,
  sparsity: float | Mapping[str, float],
  norm: str = "l1",
  *,
  scores: Mapping[str, Any] | None = None,
  scope: str = "group",
) -> Any:
  """Removes ``round(sparsity * C)`` channels of every prunable group, smallest first.

  ``group_masks(plan, params, pruned_channels(plan, params, sparsity, ...))``: see
  :func:`pruned_channels` for the arguments.

  Returns:
    A mask pytree over ``params``.
  """
  return group_masks(
    plan, params, pruned_channels(plan, params, sparsity, norm, scores=scores, scope=scope)
  )


def pruned_channels(
  plan: Plan,
  params: Any,
  sparsity: float | Mapping[str, float],
  norm: str = "l1",
  *,
  scores: Mapping[str, Any] | None = None,
  scope: str = "group",
) -> dict[str, list[int]]:
  """``{group name: channels}``: ``round(sparsity * C)`` of each group, smallest first.

  A channel's score is the summed L1 (or L2) norm of its producers' filters, so in a
  ResNet the channels of the residual stream are scored by every conv writing into it
  and cut in all of them. At least one channel of each group is kept.

  Args:
    plan: from :func:`jaxprune.surgery.plan`.
    params: the params to score and mask.
    sparsity: fraction of each group's channels to remove, in ``[0, 1)`` (head dims
      excepted: they go only when named); or ``{group name or kind: fraction}``
      (groups not named keep all their channels): kinds are ``"heads"``,
      ``"head_dim"``, ``"neurons"`` (dense layers' outputs, an MLP's hidden units) and
      ``"channels"`` (convs'), e.g. ``{"heads": 0.25, "neurons": 0.25}`` (with
      grouped-query attention ``"heads"`` removes that fraction of the query heads of
      every KV group, ``MODULE/query_heads``, and keeps the KV heads; name
      ``MODULE/kv_heads`` to remove whole KV groups); group ratios
      as :func:`jaxprune.analysis.choose_ratios` picks from a
      :func:`jaxprune.analysis.channel_sensitivity` sweep.
    norm: ``"l1"`` (Li et al. 2017) or ``"l2"``.
    scores: ``{group name: per-channel score}`` to rank by instead of the norm
      (:func:`jaxprune.surgery.scores.flap_scores`, ``taylor_scores``); a group
      without scores is ranked by the norm.
    scope: ``"group"`` (``round(ratio * C)`` of each group, smallest score first; on
      equal scores the lower channel index is kept) or ``"global"``: the
      groups of one kind and ratio are ranked together (FLAP's standardised scores),
      ``round(ratio * total)`` removed among them, at least one channel kept in each.

  Returns:
    ``{group name: sorted channel indices}``.

  Raises:
    ValueError: for a sparsity outside ``[0, 1)``, a ratio for an unknown or blocked
      group, an unknown norm or scope, or a NaN or infinite channel score (naming the
      group and channels).
  """
  ratios = _ratios(plan, sparsity)
  if norm not in ("l1", "l2"):
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}.")
  if scope not in ("group", "global"):
    raise ValueError(f"scope must be 'group' or 'global', got {scope!r}.")
  scores = dict(scores or {})
  values = {p: np.asarray(x) for p, x in tree_lib.leaves_with_paths(params)}

  def value(path):
    x = _lookup(values, path)
    if x is None:
      raise KeyError(
        f"channel_masks: {path!r} is not in the params given; they have {list(values)[:10]}."
      )
    return x

  pools: dict[tuple, list[tuple[str, np.ndarray]]] = {}
  for g in plan.groups:
    if g.blocked or g.name not in ratios:
      continue
    if g.name in scores:
      score = np.asarray(scores[g.name], np.float64)
      if score.shape != (g.size,):
        raise ValueError(f"scores of group {g.name!r} have shape {score.shape}, not ({g.size},).")
    else:
      score = np.zeros(g.size, np.float64)
      for path, axis in g.producers:
        w = np.moveaxis(value(path), axis, 0).reshape(plan.shapes[path][axis], -1)
        per = np.abs(w).sum(1) if norm == "l1" else np.sqrt((w.astype(np.float64) ** 2).sum(1))
        score += np.array([per[g.channels[j][(path, axis)]].sum() for j in range(g.size)])
    if not np.isfinite(score).all():  # a NaN would sort anywhere: which channel goes is arbitrary
      bad = [int(j) for j in np.flatnonzero(~np.isfinite(score))]
      what = "its scores" if g.name in scores else "the weights of its producers"
      raise ValueError(
        f"Group {g.name!r} has NaN or infinite channel scores at channels {bad[:10]} "
        f"({what} are not finite); fix the params (or scores) before pruning."
      )
    key = (g.kind, ratios[g.name]) if scope == "global" else (g.name,)
    pools.setdefault(key, []).append((g.name, score))
  remove = {}
  for members in pools.values():
    ratio = ratios[members[0][0]]
    total = sum(len(s) for _, s in members)
    n_remove = int(round(ratio * total))
    flat = [(float(v), i, j) for i, (_, s) in enumerate(members) for j, v in enumerate(s)]
    # smallest score first; ties: the later group, then the higher channel goes first (the
    # lower index is kept, as in the pruners and slimming_masks)
    flat.sort(key=lambda t: (t[0], -t[1], -t[2]))
    chosen: list[list[int]] = [[] for _ in members]
    for _, i, j in flat:
      if n_remove == 0:
        break
      if len(chosen[i]) < len(members[i][1]) - 1:
        chosen[i].append(j)
        n_remove -= 1
    for (name, _), chans in zip(members, chosen):
      remove[name] = sorted(chans)
  return remove


def idle_channels(plan: Plan, params: Any) -> dict[str, list[int]]:
  """``{group name: channels}`` that compute nothing or that nothing reads.

  A channel is idle when the weights of all its producers are zero (a filter zeroed by
  filter-wise group lasso or a mask) or when every consumer kernel ignores it (its
  input-channel slice is zero in each: channel-wise group lasso on the next layers).
  :func:`group_masks` of the result masks such channels everywhere, which turns SSL's
  zero groups into channels :func:`jaxprune.surgery.shrink` removes. (Masking a channel
  whose producers are zero also zeroes its norm's bias: the constant it emitted is gone,
  as in every structured pruning; fine-tune afterwards.)

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc1, self.fc2 = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.fc2(nnx.relu(self.fc1(x)))
    >>> net = Net(nnx.Rngs(0))
    >>> net.fc2.kernel.set_value(net.fc2.kernel[...].at[1].set(0.0))  # nothing reads unit 1
    >>> p = surgery.plan(net, example_input=jnp.ones((1, 3)))
    >>> surgery.idle_channels(p, nnx.state(net, nnx.Param))
    {'fc1/kernel': [1]}
  """
  values = {p: np.asarray(x) for p, x in tree_lib.leaves_with_paths(params)}
  idle = {}
  for g in plan.groups:
    if g.blocked:
      continue
    kernels = [(p, a) for p, a in g.members if len(plan.shapes[p]) >= 2]
    producers = [m for m in kernels if m in g.producers]
    consumers = [m for m in kernels if m not in g.producers]

    def zero(channel, members):
      arrays = [_lookup(values, p) for p, _ in members]
      return bool(members) and all(
        x is not None and not np.take(x, channel[p, a], axis=a).any()
        for (p, a), x in zip(members, arrays)
      )

    chans = [j for j, ch in enumerate(g.channels) if zero(ch, producers) or zero(ch, consumers)]
    if chans:
      idle[g.name] = chans
  return idle


KINDS = ("heads", "head_dim", "neurons", "channels")


def _ratios(plan: Plan, sparsity: float | Mapping[str, float]) -> dict[str, float]:
  """``{group name: fraction removed}`` of the prunable groups.

  A float applies to every prunable group but head dims (removed only when asked); a
  mapping names groups or kinds (``"heads"``, ``"neurons"``, ...: every prunable group
  of that kind), a group's own entry before its kind's.
  """
  prunable = [g.name for g in plan.groups if not g.blocked]
  if not isinstance(sparsity, Mapping):
    check_sparsity(sparsity)
    return {g.name: float(sparsity) for g in plan.groups if not g.blocked and g.kind != "head_dim"}
  groups = {g.name: g for g in plan.groups}
  for name, value in sparsity.items():
    if name not in groups and name not in KINDS:
      raise ValueError(f"No group or kind {name!r}; kinds: {list(KINDS)}, groups: {sorted(groups)}")
    check_sparsity(value, f"sparsity of {name!r}")
    if name in groups and groups[name].blocked and value > 0:
      raise ValueError(f"Group {name!r} cannot be pruned: blocked by {groups[name].blocked}.")
  out = {}
  for name in prunable:
    kind = groups[name].kind
    if name in sparsity:
      out[name] = float(sparsity[name])
    elif kind in sparsity and not _kv_heads_with_query_heads(name, groups):
      out[name] = float(sparsity[kind])
  return out


def _kv_heads_with_query_heads(name: str, groups: Mapping[str, Any]) -> bool:
  """A ``MODULE/kv_heads`` group whose module also has ``MODULE/query_heads``: a
  ``"heads"`` ratio removes query heads from every KV group, not whole KV groups."""
  module, _, last = name.rpartition("/")
  sibling = f"{module}/query_heads" if module else "query_heads"
  return last == "kv_heads" and sibling in groups and not groups[sibling].blocked


def _lookup(values: dict[str, Any], path: str) -> Any:
  """The value of the params leaf that ``path`` (a traced variable's path) names, exactly."""
  return next((x for p, x in values.items() if tree_lib.same_leaf(path, p)), None)
