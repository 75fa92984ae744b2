"""Linen: run an unchanged module definition at new layer widths.

Linen layers take their widths from dataclass fields (``features``, ``num_heads``,
``qkv_features``, an ``Einsum``'s ``shape``, a hand-written block's ``n_head``) and
check param shapes on ``apply``. :class:`Resized` shares the wrapped module's scope (so
param paths do not change) and, through ``nn.intercept_methods``, sets the width fields
of every module before its ``setup`` and its methods run, from the sliced params of its
scope and the heads removed from the module that holds them (:func:`new_fields`).

Whether the user's code follows those fields is checked when the model is planned
(:func:`rebuild_blocks`): a group whose rebuilt model does not run, or splits its heads
differently, with one channel fewer, is blocked there with the reason and the line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeGuard

import jax
import numpy as np
from flax import linen as nn

from jaxprune.surgery import capture
from jaxprune.surgery.planning import UNITS, Plan, trace
from jaxprune.surgery.rebuild import kept_ratio
from jaxprune.surgery.removal import kept_indices
from jaxprune.surgery.source import exception_line, where

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Widths:
  """What the width fields of a Linen model are set from (hashable, a module field).

  Attributes:
    params: ``((scope path, ((param name, old shape, new shape), ...)), ...)`` for every
      scope with a sliced param.
    heads: ``((module path, ((kind, new count, old count), ...)), ...)`` for the module
      holding each head group (``MODULE`` of ``params/MODULE/heads``).
  """

  params: tuple[tuple[tuple[str, ...], tuple[tuple[str, Shape, Shape], ...]], ...] = ()
  heads: tuple[tuple[tuple[str, ...], tuple[tuple[str, int, int], ...]], ...] = ()


def table(plan: Plan, kept: Mapping[str, Mapping[int, Any]], removed: Mapping[str, Any]) -> Widths:
  """The :class:`Widths` of the model ``plan`` traced, with ``kept`` indices left."""
  scopes: dict[tuple[str, ...], list[tuple[str, Shape, Shape]]] = {}
  changed: set[tuple[str, ...]] = set()
  for path, old in plan.shapes.items():
    parts = tuple(path.split("/"))
    if parts[0] != "params" or len(parts) < 2:
      continue
    new = list(old)
    for axis, idx in kept.get(path, {}).items():
      new[axis] = len(idx)
    scopes.setdefault(parts[1:-1], []).append((parts[-1], tuple(old), tuple(new)))
    if tuple(new) != tuple(old):
      changed.add(parts[1:-1])
  heads: dict[tuple[str, ...], list[tuple[str, int, int]]] = {}
  for g in plan.groups:
    if g.kind not in ("heads", "head_dim") or not removed.get(g.name):
      continue
    module, _, kind = g.name.rpartition("/")
    parts = tuple(module.split("/"))
    if parts[0] == "params":
      heads.setdefault(parts[1:], []).append((kind, g.size - len(removed[g.name]), g.size))
  return Widths(
    tuple((s, tuple(v)) for s, v in sorted(scopes.items()) if s in changed),
    tuple((m, tuple(v)) for m, v in sorted(heads.items())),
  )


def _is_int(x: Any) -> TypeGuard[int]:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _head_kind(name: str) -> str | None:
  """Which head count a field called ``name`` is: ``heads`` (num_heads, n_head),
  ``kv`` (num_kv_heads, num_key_value_heads), ``dim`` (head_dim, head_size) or ``v_dim``
  (v_head_dim); ``None`` for any other field."""
  low = name.lower()
  if "head" not in low:
    return None
  if "dim" in low or "size" in low:
    return "v_dim" if low.startswith("v_") or "value" in low else "dim"
  return "kv" if "kv" in low or "key_value" in low else "heads"


def _head_counts(obj: Any, sizes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
  """New values of the head-count fields of ``obj`` (a module, or a config dataclass in
  one of its fields), scaled by the heads kept (``sizes``: ``{kind: (new, old)}``)."""

  ratio = functools.partial(kept_ratio, sizes)
  scale = {
    "heads": ratio("heads", "kv_heads", "query_heads"),
    "kv": ratio("heads", "kv_heads"),
    "dim": ratio("head_dim"),
    "v_dim": ratio("v_head_dim"),
  }
  out: dict[str, Any] = {}
  for f in dataclasses.fields(obj):
    if f.name in ("parent", "name"):
      continue
    value = getattr(obj, f.name, None)
    kind = _head_kind(f.name)
    if kind is not None and _is_int(value) and scale[kind] != 1.0:
      out[f.name] = int(round(value * scale[kind]))
    elif (
      dataclasses.is_dataclass(value)
      and not isinstance(value, type | nn.Module)
      and (inner := _head_counts(value, sizes))
    ):
      out[f.name] = dataclasses.replace(value, **inner)
  return out


def new_fields(mod: nn.Module, widths: Widths) -> dict[str, Any]:
  """The width fields of the bound module ``mod`` that the sliced params change: every
  field the NNX rebuild sets (``features``; an attention's ``num_heads``,
  ``qkv_features``, ``out_features``; the head counts of the module holding a head
  group, also inside a config dataclass field; an ``Einsum``-like layer's ``shape``).

  Head counts are scaled from ``mod``'s values: call it once per module instance.
  """
  scopes = dict(widths.params)
  scope = tuple(mod.scope.path) if mod.scope is not None else ()
  params = {name: (old, new) for name, old, new in scopes.get(scope, ())}
  fields = {f.name for f in dataclasses.fields(mod)} - {"parent", "name"}
  out: dict[str, Any] = {}
  if "kernel" in params and "features" in fields:
    old, new = params["kernel"]
    features = getattr(mod, "features", None)
    if _is_int(features) and old[-1] != new[-1]:
      out["features"] = new[-1]
      if _is_int(getattr(mod, "feature_group_count", None)) and mod.feature_group_count > 1:
        out["feature_group_count"] = new[-1]  # depthwise: one filter per channel
    elif isinstance(features, tuple) and old[-len(features) :] != new[-len(features) :]:
      out["features"] = tuple(new[len(new) - len(features) :])
  norm = params.get("scale") or params.get("bias")
  if isinstance(mod, nn.GroupNorm) and _is_int(mod.num_groups) and norm is not None:
    # Only whole groups go (the statistic over a group's channels blocks the channels
    # within it): the group size stays, the count follows.
    (old,), (new,) = norm
    if old != new:
      out["num_groups"] = new // (old // mod.num_groups)
  if isinstance(mod, nn.MultiHeadDotProductAttention):
    query = {n: (o, s) for n, o, s in scopes.get((*scope, "query"), ())}.get("kernel")
    output = {n: (o, s) for n, o, s in scopes.get((*scope, "out"), ())}.get("kernel")
    if query is not None and query[0][-2:] != query[1][-2:]:
      out["num_heads"], head_dim = query[1][-2:]
      out["qkv_features"] = out["num_heads"] * head_dim
    if output is not None and output[0][-1] != output[1][-1]:
      out["out_features"] = output[1][-1]
  else:
    sizes = {kind: (new, old) for kind, new, old in dict(widths.heads).get(tuple(mod.path), ())}
    if sizes:
      out.update(_head_counts(mod, sizes))
  shape = getattr(mod, "shape", None)
  if "shape" in fields and isinstance(shape, tuple):
    # the param this layer declares: the one its own fields name (``weight_name``), or
    # the only one of this shape in its scope (a parent may have built it at the new one)
    match = [n for n, (old, new) in params.items() if shape in (old, new)]
    named = [n for n in match if any(getattr(mod, f, None) == n for f in fields)]
    pick = {params[n] for n in named or match}
    if len(pick) == 1:
      old, new = pick.pop()
      if old != new:
        out["shape"] = new
  return out


@contextlib.contextmanager
def resizing(widths: Widths, record: dict[str, dict[str, Any]] | None = None) -> Iterator[None]:
  """Sets every module's width fields (:func:`new_fields`) when it is first called
  (``setup`` first); records ``{module path: {field: value}}`` in ``record``."""
  seen: dict[int, nn.Module] = {}  # by id; holding them keeps ids unique meanwhile

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if id(mod) not in seen and not isinstance(mod, Resized):
      seen[id(mod)] = mod
      new = new_fields(mod, widths)
      if new and record is not None:
        path = list(mod.path)
        if mod.name and isinstance(mod.parent, nn.Module) and path[-1:] != [mod.name]:
          path.append(mod.name)  # a module sharing its parent's scope
        record.setdefault("/".join(path), {}).update(_flat(mod, new))
      for k, v in new.items():
        if getattr(mod, k, None) != v:
          object.__setattr__(mod, k, v)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _flat(mod: nn.Module, new: dict[str, Any]) -> dict[str, Any]:
  """``new`` with a config dataclass value as its changed fields (``config.n_head``)."""
  out = {}
  for k, v in new.items():
    old = getattr(mod, k, None)
    if dataclasses.is_dataclass(v) and dataclasses.is_dataclass(old):
      for f in dataclasses.fields(v):
        if getattr(v, f.name) != getattr(old, f.name, None):
          out[f"{k}.{f.name}"] = getattr(v, f.name)
    else:
      out[k] = v
  return out


class Resized(nn.Module):
  """``inner`` with the width fields of its modules set from ``widths``."""

  inner: nn.Module
  widths: Widths

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, *args, **kwargs):
    with resizing(self.widths):
      return self.inner(*args, **kwargs)


def resized(
  model: nn.Module, plan: Plan, kept: dict[str, dict[int, Any]], removed: Mapping[str, Any]
) -> tuple[Resized, dict[str, dict[str, Any]]]:
  """A :class:`Resized` module and its new widths ``{module path: {field: value}}``.

  The widths are read from one shape-only run of the rebuilt model; when that run
  fails they are those set before it did (running the small model says why).
  """
  widths = table(plan, kept, removed)
  record: dict[str, dict[str, Any]] = {}
  inputs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in _input_vars(plan)]
  with contextlib.suppress(Exception), resizing(widths, record):
    jax.eval_shape(plan.fn, _small_specs(plan, kept), *inputs)
  return Resized(inner=model, widths=widths), dict(sorted(record.items()))


def _input_vars(plan: Plan) -> list[Any]:
  return list(plan.jaxpr.jaxpr.invars[len(plan.paths) :])


def _small_specs(plan: Plan, kept: Mapping[str, Mapping[int, Any]]) -> list[jax.ShapeDtypeStruct]:
  """The model's variable leaves (``plan.paths`` order) at their sliced shapes."""
  specs = []
  for path, v in zip(plan.paths, plan.jaxpr.jaxpr.invars):
    shape = list(plan.shapes[path])
    for axis, idx in kept.get(path, {}).items():
      shape[axis] = len(idx)
    specs.append(jax.ShapeDtypeStruct(tuple(shape), v.aval.dtype))
  return specs


def rebuild_blocks(fn: Callable[..., Any], plan: Plan) -> Plan:
  """``plan`` with every group blocked whose width the rebuilt model does not follow.

  The model is traced (shapes only) as :class:`Resized` with one channel of every
  prunable group removed, and with one of each head group alone (the heads and the
  head dims of one attention may only work together: a Linen
  ``MultiHeadDotProductAttention`` has one ``qkv_features`` for q, k and v). A group is
  blocked, with the reason and the line of the model code, when its trial does not run
  or its plan's groups are not the original's less that channel (code that reshapes by
  a literal or by the input's width splits the heads differently). When the trial of
  all groups fails, each is tried alone.

  Args:
    fn: the forward pass ``fn(variables, *inputs)`` of the Linen module ``plan`` traced.
    plan: its plan.
  """
  trial = {g.name: [0] for g in plan.groups if not g.blocked and g.size > 1}
  if not trial:
    return plan
  heads = [n for n in trial if plan.group(n).kind in ("heads", "head_dim")]
  if _rebuild_problem(fn, plan, trial) is not None:
    alone = list(trial)
  else:
    alone = heads if len(trial) > 1 else []
  reasons = {}
  for name in alone:
    reason = _rebuild_problem(fn, plan, {name: [0]})
    if reason is not None:
      reasons[name] = reason
  groups = tuple(
    dataclasses.replace(g, blocked=reasons[g.name]) if g.name in reasons else g for g in plan.groups
  )
  return dataclasses.replace(plan, groups=groups)


def _rebuild_problem(
  fn: Callable[..., Any], plan: Plan, removed: dict[str, list[int]]
) -> str | None:
  """Why the model rebuilt without ``removed`` is wrong (``None`` if it is not)."""
  kept = kept_indices(plan, removed)
  widths = table(plan, kept, removed)
  (name,) = removed if len(removed) == 1 else ("",)
  unit = UNITS[plan.group(name).kind] if name else "channels"
  variables = _nested(plan.paths, _small_specs(plan, kept))
  inputs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in _input_vars(plan)]

  def small_fn(variables, *xs):
    with resizing(widths):
      return fn(variables, *xs)

  try:
    small = trace(small_fn, variables, *inputs)
  except Exception as e:  # whatever the user's code raises at the new widths
    line = exception_line(e)
    text = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(".")
    return (
      f"the model rebuilt with one of these {unit} fewer does not run"
      + (f" (at {line})" if line else "")
      + f": {text}. A width in the model code is not set from a field jaxprune rewrites "
      "(features, num_heads, n_head, head_dim, an Einsum's shape): derive it from those "
      "or from the input"
    )
  sizes = {g.name: g.size for g in small.groups}
  for g in plan.groups:
    expected = g.size - len(removed.get(g.name, ()))
    if sizes.get(g.name, expected) != expected:
      where_ = _culprit_reshape(plan, small, g.size)
      return (
        f"the model rebuilt with one of these {unit} fewer has {sizes[g.name]} "
        f"{UNITS[g.kind]} in {g.name}, not {expected}: a width in the model code is not "
        "set from a field jaxprune rewrites (features, num_heads, n_head, head_dim, an "
        "Einsum's shape)" + (f", e.g. {where_}" if where_ else "")
      )
  return None


def _nested(paths: tuple[str, ...], leaves: list[Any]) -> dict[str, Any]:
  """The variables dict of ``paths`` (``params/Dense_0/kernel``) and their leaves."""
  out: dict[str, Any] = {}
  for path, leaf in zip(paths, leaves):
    *parents, last = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def _eqns(jaxpr: Any) -> Iterator[Any]:
  """Every primitive equation of ``jaxpr``, calls inlined, in order."""
  for eqn in jaxpr.eqns:
    call = capture.call_jaxpr(eqn)
    if call is None:
      yield eqn
    else:
      yield from _eqns(call[0])


def _culprit_reshape(plan: Plan, small: Plan, size: int) -> str:
  """The first reshape whose input shrank but whose output kept an axis of ``size``
  (heads split by a literal count), as ``where`` words it; ``""`` if none is found."""
  old, new = list(_eqns(plan.jaxpr.jaxpr)), list(_eqns(small.jaxpr.jaxpr))
  if len(old) != len(new):
    return ""
  for a, b in zip(old, new):
    if a.primitive.name != "reshape" or b.primitive.name != "reshape":
      continue
    shape_in = (a.invars[0].aval.shape, b.invars[0].aval.shape)
    out_a, out_b = a.outvars[0].aval.shape, b.outvars[0].aval.shape
    if shape_in[0] != shape_in[1] and any(x == y == size for x, y in zip(out_a, out_b)):
      return where(b)
  return ""
