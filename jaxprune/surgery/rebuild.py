"""Rebuilding Flax modules whose arrays were sliced: new feature counts, same code."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flax import nnx


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
    elif isinstance(mod, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm):
      for attr in ("scale", "bias", "mean", "var"):
        var = getattr(mod, attr, None)
        if var is not None:
          new = {"num_features": _shape(var)[-1]}
          break
    if new:
      changed = {k: v for k, v in new.items() if getattr(mod, k, None) != v}
      for k, v in new.items():
        setattr(mod, k, v)
      if changed:
        widths[name] = new
  return widths


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


def _default_attention() -> Any:
  from flax.nnx.nn.attention import dot_product_attention

  return dot_product_attention


HEAD_COUNTS = ("num_heads", "num_kv_heads", "head_dim", "v_head_dim")


def fix_head_counts(model: nnx.Module, plan: Any, removed: dict[str, list[int]]) -> dict:
  """Sets the head counts of hand-written attention modules after heads are removed.

  The module holding a head group's kernels (``MODULE`` of ``MODULE/heads``) gets its
  int attributes ``num_heads``, ``num_kv_heads``, ``head_dim`` and ``v_head_dim`` (those
  it has) scaled by the heads kept, so that code reshaping by them (``x.reshape(b, t,
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

    def ratio(*kinds: str, sizes: dict = sizes) -> float:
      r = 1.0
      for kind in kinds:
        new, old = sizes.get(kind, (1, 1))
        r *= new / old
      return r

    scale = {
      "num_heads": ratio("heads", "kv_heads", "query_heads"),
      "num_kv_heads": ratio("heads", "kv_heads"),
      "head_dim": ratio("head_dim"),
      "v_head_dim": ratio("v_head_dim"),
    }
    new = {}
    for attr in HEAD_COUNTS:
      old = getattr(mod, attr, None)
      if isinstance(old, int) and not isinstance(old, bool) and scale[attr] != 1.0:
        new[attr] = int(round(old * scale[attr]))
        setattr(mod, attr, new[attr])
    if new:
      widths[module] = new
  return widths
