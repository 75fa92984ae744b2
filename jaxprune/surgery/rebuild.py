"""Rebuilding Flax modules whose arrays were sliced: new feature counts, same code."""

from __future__ import annotations

from typing import Any

from flax import nnx


def _shape(var: Any) -> tuple[int, ...]:
  return tuple(var.get_value().shape)


def fix_nnx_attributes(model: nnx.Module) -> dict[str, dict[str, int]]:
  """Sets each layer's size attributes from its (sliced) arrays; returns the new widths."""
  widths: dict[str, dict[str, int]] = {}
  for path, mod in nnx.iter_modules(model):
    name = "/".join(str(k) for k in path)
    new: dict[str, int] = {}
    if isinstance(mod, nnx.Linear):
      new = {"in_features": _shape(mod.kernel)[0], "out_features": _shape(mod.kernel)[1]}
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


def linen_module(model: Any, plan: Any, kept: dict[str, Any]) -> tuple[Any, dict]:
  """Linen: the same module, run with its layers' ``features`` set to the new widths."""
  from jaxprune.surgery.linen import resized

  return resized(model, plan, kept)
