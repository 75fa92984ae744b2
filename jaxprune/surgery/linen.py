"""Linen: run an unchanged module definition at new layer widths.

Linen layers infer their input size from the input but take their output size from a
``features`` field, and check param shapes on ``apply``. :class:`Resized` shares the
wrapped module's scope (so param paths do not change) and, through
``nn.intercept_methods``, sets each resized layer's ``features`` before it runs.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn


class Resized(nn.Module):
  """``inner`` with the Dense/Conv layers at ``features`` paths given new output sizes."""

  inner: nn.Module
  features: tuple[tuple[tuple[str, ...], int], ...]

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, *args, **kwargs):
    table = dict(self.features)

    def interceptor(next_fun, args, kwargs, context):
      mod = context.module
      n = table.get(tuple(mod.path))
      if n is not None and getattr(mod, "features", None) != n:
        if getattr(mod, "feature_group_count", 1) > 1:
          object.__setattr__(mod, "feature_group_count", n)
        object.__setattr__(mod, "features", n)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return self.inner(*args, **kwargs)


def resized(model: nn.Module, plan: Any, kept: dict[str, dict[int, Any]]) -> tuple[Any, dict]:
  """A :class:`Resized` module and the new widths ``{layer path: {"features": n}}``."""
  features = {}
  for path, axes in kept.items():
    parts = path.split("/")
    if parts[0] != "params" or parts[-1] != "kernel":
      continue
    last = len(plan.shapes[path]) - 1
    if last in axes:
      features[tuple(parts[1:-1])] = len(axes[last])
  widths = {"/".join(k): {"features": n} for k, n in sorted(features.items())}
  return Resized(inner=model, features=tuple(sorted(features.items()))), widths
