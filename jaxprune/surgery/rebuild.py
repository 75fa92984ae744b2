"""Rebuilding Flax modules whose arrays were sliced: new feature counts, same code."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxprune.surgery.planning import tie


def kept_ratio(sizes: Mapping[str, tuple[int, int]], *kinds: str) -> float:
  """The product of ``new / old`` over the group ``kinds`` in ``sizes`` (``{kind: (new,
  old)}``; a kind not there counts 1): how much a head count made of them shrinks."""
  r = 1.0
  for kind in kinds:
    new, old = sizes.get(kind, (1, 1))
    r *= new / old
  return r


def _shape(var: Any) -> tuple[int, ...]:
  return tuple(var.get_value().shape)


def fix_nnx_attributes(model: nnx.Module) -> dict[str, dict[str, int | tuple[int, ...]]]:
  """Sets each layer's size attributes from its (sliced) arrays; returns the new widths."""
  widths: dict[str, dict[str, int | tuple[int, ...]]] = {}
  for path, mod in nnx.iter_modules(model):
    name = "/".join(str(k) for k in path)
    new: dict[str, int | tuple[int, ...]] = {}
    if isinstance(mod, nnx.Linear):
      new = {"in_features": _shape(mod.kernel)[0], "out_features": _shape(mod.kernel)[1]}
    elif isinstance(mod, nnx.LinearGeneral):
      k = _shape(mod.kernel)[len(mod.batch_axis) :]
      n_in = len(mod.in_features)
      new = {"in_features": k[:n_in], "out_features": k[n_in:]}
    elif isinstance(mod, nnx.MultiHeadAttention):
      q, kv, out = _shape(mod.query.kernel), _shape(mod.key.kernel), _shape(mod.out.kernel)
      new = {
        "in_features": q[0],
        "in_kv_features": kv[0],
        "num_heads": q[1],
        "num_kv_heads": kv[1],
        "head_dim": q[2],
        "qkv_features": q[1] * q[2],
        "out_features": out[-1],
      }
    elif isinstance(mod, nnx.Conv):
      k = _shape(mod.kernel)
      groups = mod.feature_group_count
      if groups == 1:
        new = {"in_features": k[-2], "out_features": k[-1]}
      elif k[-1] != mod.out_features:
        # Surgery slices only depthwise convs with one filter per input channel (the
        # plan blocks every other grouped conv): in = out = groups = the new width.
        new = {"in_features": k[-1], "out_features": k[-1], "feature_group_count": k[-1]}
      mod.kernel_shape = k
    elif isinstance(mod, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm | nnx.GroupNorm):
      for attr in ("scale", "bias", "mean", "var"):
        var = getattr(mod, attr, None)
        if var is not None:
          new = {"num_features": _shape(var)[-1]}
          if isinstance(mod, nnx.GroupNorm):
            # The plan removes whole groups only (the statistic over a group's channels
            # blocks the channels within it): the group size stays, the count follows.
            new["num_groups"] = _shape(var)[-1] // mod.group_size
          break
    if new:
      changed = {k: v for k, v in new.items() if getattr(mod, k, None) != v}
      for k, v in new.items():
        setattr(mod, k, v)
      if changed:
        widths[name] = new
  return widths


def unsized_norms(model: nnx.Module) -> list[str]:
  """Paths of the ``nnx.GroupNorm`` layers without a scale or bias: nothing sliced says
  their new width, so :func:`fix_nnx_attributes` cannot set their ``num_groups``."""
  return [
    "/".join(str(k) for k in path)
    for path, mod in nnx.iter_modules(model)
    if isinstance(mod, nnx.GroupNorm) and mod.scale is None and mod.bias is None
  ]


def rescale_queries(model: nnx.Module, plan: Any, leaves: list, removed: dict) -> list:
  """``leaves`` with the query kernel and bias of every ``nnx.MultiHeadAttention`` whose
  head dims are removed scaled by ``sqrt(new / old head_dim)``: its attention divides
  by ``sqrt`` of the query's last axis, so the smaller model's logits stay the same."""
  index = {p: i for i, p in enumerate(plan.paths)}
  out = list(leaves)
  for path, mod in nnx.iter_modules(model):
    if not isinstance(mod, nnx.MultiHeadAttention) or mod.attention_fn is not _default_attention():
      continue
    name = "/".join(str(k) for k in path)
    group = next((g for g in plan.groups if g.name == f"{name}/head_dim"), None)
    if group is None or not removed.get(group.name):
      continue
    factor = math.sqrt((group.size - len(removed[group.name])) / group.size)
    for leaf in ("kernel", "bias"):
      i = index.get(f"{name}/query/{leaf}")
      if i is not None:
        x = np.asarray(out[i])
        out[i] = (x * factor).astype(x.dtype)
  return out


def tie_head_dims(model: nnx.Module, plan: Any) -> Any:
  """``plan`` with the q.k and value head dims of every ``nnx.MultiHeadAttention`` tied
  (``MODULE/v_head_dim`` merged into ``MODULE/head_dim``): its query, key and value
  projections share one ``head_dim``, so a dim goes from all three or from none."""
  names = {g.name for g in plan.groups}
  for path, mod in nnx.iter_modules(model):
    if not isinstance(mod, nnx.MultiHeadAttention):
      continue
    prefix = "/".join(str(k) for k in path)
    prefix = prefix + "/" if prefix else ""
    qk, v = prefix + "head_dim", prefix + "v_head_dim"
    if qk in names and v in names:
      plan = tie(plan, qk, v, "nnx.MultiHeadAttention has one head_dim for q, k and v")
  return plan


def _default_attention() -> Any:
  from flax.nnx.nn.attention import dot_product_attention

  return dot_product_attention


HEAD_COUNTS = ("num_heads", "num_query_heads", "num_kv_heads", "head_dim", "v_head_dim")


def fix_head_counts(model: nnx.Module, plan: Any, removed: dict[str, list[int]]) -> dict:
  """Sets the head counts of hand-written attention modules after heads are removed.

  The module holding a head group's kernels (``MODULE`` of ``MODULE/heads``) gets its
  int attributes ``num_heads`` (or MaxText's ``num_query_heads``), ``num_kv_heads``,
  ``head_dim`` and ``v_head_dim`` (those it has, properties excepted) scaled by the
  heads kept, so that code reshaping by them (``x.reshape(b, t,
  self.num_heads, self.head_dim)``) runs on the smaller model and the module can be
  rebuilt from the widths (an ``nnx.MultiHeadAttention`` is set from its kernels).

  Returns:
    ``{module path: {attribute: new value}}``.
  """
  modules = {"/".join(str(k) for k in path): m for path, m in nnx.iter_modules(model)}
  kept: dict[str, dict[str, tuple[int, int]]] = {}
  for g in plan.groups:
    if g.kind not in ("heads", "head_dim"):
      continue
    module, _, kind = g.name.rpartition("/")
    kept.setdefault(module, {})[kind] = (g.size - len(removed.get(g.name, ())), g.size)
  widths: dict[str, dict[str, int]] = {}
  for module, sizes in kept.items():
    mod = modules.get(module)
    if mod is None or isinstance(mod, nnx.MultiHeadAttention):
      continue

    ratio = functools.partial(kept_ratio, sizes)
    scale = {
      "num_heads": ratio("heads", "kv_heads", "query_heads"),
      "num_query_heads": ratio("heads", "kv_heads", "query_heads"),
      "num_kv_heads": ratio("heads", "kv_heads"),
      "head_dim": ratio("head_dim"),
      "v_head_dim": ratio("v_head_dim"),
    }
    new = {}
    for attr in HEAD_COUNTS:
      if isinstance(getattr(type(mod), attr, None), property):
        continue  # derived from other attributes (an einsum layer's shape): set there
      old = getattr(mod, attr, None)
      if isinstance(old, int) and not isinstance(old, bool) and scale[attr] != 1.0:
        new[attr] = int(round(old * scale[attr]))
        setattr(mod, attr, new[attr])
    if new:
      widths[module] = new
  return widths


_FLAX_LAYERS = (
  nnx.Linear, nnx.LinearGeneral, nnx.MultiHeadAttention, nnx.Conv, nnx.BatchNorm, nnx.LayerNorm,
  nnx.RMSNorm, nnx.GroupNorm,
)  # fmt: skip


def _int_tuple(value: Any) -> bool:
  return (
    isinstance(value, tuple)
    and bool(value)
    and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
  )


def fix_shape_attributes(model: nnx.Module, plan: Any) -> dict[str, dict[str, tuple[int, ...]]]:
  """Sets the shape tuples a module keeps of its own sliced params; returns them.

  A layer that builds its param from a shape it keeps reads that shape again: an einsum
  layer's ``shape`` (Gemma's ``Einsum``, whose attention derives ``head_dim`` and the
  head counts from it), MaxText's ``DenseGeneral.in_features_shape`` (checked against
  every input) and ``out_features_shape``. A tuple attribute of a module that equals a
  run of consecutive axes of one of its params' shapes as traced (``plan.shapes``) is
  set to the same run of the sliced shape, when that run is the only one it matches.
  (Flax's own layers are set by :func:`fix_nnx_attributes`.)
  """
  widths: dict[str, dict[str, tuple[int, ...]]] = {}
  for path, mod in nnx.iter_modules(model):
    if isinstance(mod, _FLAX_LAYERS):
      continue
    name = "/".join(str(k) for k in path)
    prefix = name + "/" if name else ""
    params = {
      plan.shapes[prefix + k]: _shape(v)
      for k, v in vars(mod).items()
      if isinstance(v, nnx.Param) and prefix + k in plan.shapes
    }
    new: dict[str, tuple[int, ...]] = {}
    for attr, value in vars(mod).items():
      if not _int_tuple(value):
        continue
      n = len(value)
      runs = {
        now[i : i + n] for old, now in params.items() for i in range(len(old) - n + 1)
        if old[i : i + n] == value
      }  # fmt: skip
      if len(runs) == 1 and (run := runs.pop()) != value:
        new[attr] = run
        setattr(mod, attr, run)
    if new:
      widths[name] = new
  return widths
