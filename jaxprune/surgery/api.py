"""``plan`` and ``shrink`` for Flax NNX modules and Linen modules + variables."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxprune import tree as tree_lib
from jaxprune.surgery import rebuild
from jaxprune.surgery.plan import Plan, trace
from jaxprune.surgery.shrink import (
  CHECK_BATCH,
  dead_channels,
  evaluate,
  kept_indices,
  plan_removal,
  slice_tree,
  take,
)


def _forward(model: Any, variables: Any, apply_kwargs: Mapping[str, Any]) -> tuple[Callable, Any]:
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)

    def fn(state, *inputs):
      m = nnx.merge(graphdef, state)
      m.eval()
      return m(*inputs, **apply_kwargs)

    return fn, state
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("A Linen module needs its variables: shrink(module, variables, ...).")
    return (lambda v, *inputs: model.apply(v, *inputs, **apply_kwargs)), variables
  raise TypeError(f"Surgery takes a flax nnx.Module or linen.Module, got {type(model).__name__}.")


def _inputs(example_input: Any) -> tuple:
  return tuple(example_input) if isinstance(example_input, list | tuple) else (example_input,)


def plan(
  model: Any,
  variables: Any = None,
  example_input: Any = None,
  *,
  apply_kwargs: Mapping[str, Any] | None = None,
) -> Plan:
  """Traces the model once (shapes only) and returns its coupled channel groups.

  Args:
    model: an ``nnx.Module`` (its state is read from it), or a ``linen.Module``.
    variables: the Linen variables (``{"params": ..., "batch_stats": ...}``); ``None``
      for NNX.
    example_input: an array or ``jax.ShapeDtypeStruct`` (a tuple for several inputs).
    apply_kwargs: extra keyword arguments of the forward call (e.g. ``train=False``).

  Returns:
    A :class:`~jaxprune.surgery.Plan`: ``print`` it to see which arrays and axes each
    group slices, and which groups are blocked and why.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> p = surgery.plan(model, example_input=jax.ShapeDtypeStruct((1, 4), jnp.float32))
    >>> [(g.name, g.size, g.blocked) for g in p.groups]
    [('layers/0/kernel', 8, None), ('layers/2/kernel', 2, 'the model output')]
  """
  if example_input is None:
    raise ValueError("plan() needs an example_input (an array or jax.ShapeDtypeStruct).")
  fn, variables = _forward(model, variables, dict(apply_kwargs or {}))
  return trace(fn, variables, *_inputs(example_input))


@dataclasses.dataclass(frozen=True)
class Shrunk:
  """A smaller model and what was cut.

  Attributes:
    model: the new NNX module, or the Linen module to ``apply`` with ``variables``.
    variables: the sliced variables (for NNX: ``nnx.state(model)``).
    plan: the groups of the original model.
    removed: ``{group name: [removed channel indices]}``.
    kept: ``{path: {axis: kept indices}}`` for every sliced array.
    widths: ``{module path: {attribute: new size}}``, the new architecture as a config.
    max_error: the largest output difference from the masked model found by the check.
    kept_constant: ``{group name: [channel indices]}`` that were dead (all producer
      weights zero, so their output is a constant) but are kept, because a consumer
      cannot absorb that constant exactly (no bias, or a zero-padded spatial conv, where
      the constant's contribution differs at the borders).
    why_kept: ``{group name: reason}`` for ``kept_constant``, naming the consumer.
  """

  model: Any
  variables: Any
  plan: Plan
  removed: dict[str, list[int]]
  kept: dict[str, dict[int, np.ndarray]]
  widths: dict[str, dict[str, int]]
  max_error: float | None
  kept_constant: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  why_kept: dict[str, str] = dataclasses.field(default_factory=dict)

  def slice(self, tree: Any) -> Any:
    """Slices a tree of params-shaped leaves (masks, Adam moments, a whole optax state)."""
    return slice_tree(tree, self.plan, self.kept)

  def report(self) -> str:
    """One line per group: channels before -> after, why blocked, dead channels kept.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune import surgery
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> print(surgery.shrink(model, remove={"layers/0/kernel": [0, 1, 2]},
      ...                      example_input=jnp.ones((1, 4))).report())
      layers/0/kernel: 8 -> 5 channels
      layers/2/kernel: 2 -> 2 channels (blocked: the model output)
    """
    lines = []
    for g in self.plan.groups:
      n = len(self.removed.get(g.name, ()))
      line = f"{g.name}: {g.size} -> {g.size - n} channels"
      if g.blocked:
        line += f" (blocked: {g.blocked})"
      kept = self.kept_constant.get(g.name)
      if kept:
        dead = "dead channel" if len(kept) == 1 else "dead channels"
        line += f" (kept {len(kept)} {dead} {kept}: {self.why_kept.get(g.name, '')})"
      lines.append(line)
    return "\n".join(lines)


def shrink(
  model: Any,
  variables: Any = None,
  masks: Any = None,
  *,
  example_input: Any,
  remove: Mapping[str, Sequence[int]] | None = None,
  keep: tree_lib.Where = (),
  multiple_of: int = 1,
  apply_kwargs: Mapping[str, Any] | None = None,
  verify: bool = True,
  rtol: float = 1e-5,
  seed: int = 0,
) -> Shrunk:
  """Physically removes pruned channels: a smaller model that computes the same outputs.

  Channels are removed where the masks (or ``remove=``) say: a channel goes when all its
  producers' weights are zero after masking (structured masks, SSL zero groups, hard
  gates). Constant outputs of removed channels (``relu(bias)``...) are folded into the
  consumers' biases; channels whose constant cannot be folded exactly are kept. Groups
  that reach the model output, or pass an op slicing cannot follow, are never cut; if
  ``remove=`` asks for such a group the error names the op and where it is.

  Args:
    model: an ``nnx.Module`` or a ``linen.Module``.
    variables: Linen variables; ``None`` for NNX.
    masks: a mask pytree over the params (or over all variables); ``None`` = no masks.
    example_input: an input array or ``jax.ShapeDtypeStruct`` (batch axis first).
    remove: ``{group name: channel indices}`` to remove explicitly (all their
      producers' weights are then treated as zero).
    keep: layers whose outputs must not shrink: a group is kept whole when one of its
      producers' paths matches (regexes over paths, or a predicate).
    multiple_of: round every new width up to a multiple (8 for GPU tensor cores, 128
      for TPU lanes) by keeping some channels that could have gone.
    apply_kwargs: extra keyword arguments of the forward call.
    verify: run both models on random inputs and raise if outputs differ.
    rtol: tolerance of that check, relative to the largest output magnitude.
    seed: seeds the random inputs of the check.

  Returns:
    A :class:`Shrunk`.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> params = nnx.state(model, nnx.Param)
    >>> masks = jaxprune.magnitude(0.5, structure="neurons", where="layers/0/kernel").masks(params)
    >>> small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 4)))
    >>> small.model.layers[0].kernel.shape, small.widths["layers/0"]
    ((4, 4), {'in_features': 4, 'out_features': 4})
  """
  if not isinstance(multiple_of, int) or multiple_of < 1:
    raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}.")
  inputs = _inputs(example_input)
  kwargs = dict(apply_kwargs or {})
  fn, state = _forward(model, variables, kwargs)
  the_plan = trace(fn, state, *inputs)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  leaves = [x for _, x in flat]
  masked = _apply_masks(the_plan, leaves, masks)
  values = {p: np.asarray(x) for p, x in zip(the_plan.paths, masked)}
  protect = tree_lib.as_predicate(keep) if keep else (lambda path, leaf: False)
  remove = dict(remove or {})
  names = {g.name for g in the_plan.groups}
  for name in remove:
    if name not in names:
      raise KeyError(f"remove= names no group {name!r}; groups: {sorted(names)}")

  candidates: dict[str, list[int]] = {}
  for g in the_plan.groups:
    if g.name in remove:
      if g.blocked:
        raise ValueError(f"Cannot remove channels of group {g.name!r}: blocked by {g.blocked}.")
      chans = sorted(set(int(j) for j in remove[g.name]))
      masked = _zero_producers(the_plan, masked, g, chans)
      values = {p: np.asarray(x) for p, x in zip(the_plan.paths, masked)}
    elif g.blocked or any(protect(p, values[p]) for p, _ in g.producers):
      continue
    else:
      chans = dead_channels(g, values)
    chans = chans[: max(0, g.size - 1)] if len(chans) >= g.size else chans
    candidates[g.name] = chans

  removal = plan_removal(the_plan, masked, inputs, candidates, np.random.default_rng(seed))
  removed = {
    k: _round_width(the_plan.group(k).size, v, multiple_of) for k, v in removal.removed.items()
  }
  removed = {k: v for k, v in removed.items() if v}
  folded = [
    jnp.asarray((np.asarray(x) + removal.bias_delta[p]).astype(np.asarray(x).dtype))
    if p in removal.bias_delta
    else x
    for p, x in zip(the_plan.paths, masked)
  ]
  kept = kept_indices(the_plan, removed)
  new_leaves = [take(x, kept[p]) if p in kept else x for p, x in zip(the_plan.paths, folded)]
  new_state = jax.tree.unflatten(treedef, new_leaves)
  if isinstance(model, nnx.Module):
    graphdef = nnx.graphdef(model)
    small = nnx.merge(graphdef, new_state)
    widths = rebuild.fix_nnx_attributes(small)
    small_fn, small_vars = _forward(small, None, kwargs)
  else:
    small, widths = rebuild.linen_module(model, the_plan, kept)
    small_fn, small_vars = _forward(small, new_state, kwargs)

  max_error = None
  if verify:
    # The masked model runs through the jaxpr plan_removal evaluated (same ops, same
    # shapes: nothing to compile again).
    def reference(*xs):
      return evaluate(removal.jaxpr, list(masked), list(xs))

    max_error = _check(reference, small_fn, small_vars, inputs, rtol, seed)
  return Shrunk(
    small,
    small_vars,
    the_plan,
    removed,
    kept,
    widths,
    max_error,
    kept_constant=removal.kept_constant,
    why_kept=removal.why_kept,
  )


def _round_width(size: int, removed: list[int], multiple_of: int) -> list[int]:
  keep = size - len(removed)
  target = min(size, -(-keep // multiple_of) * multiple_of)
  return sorted(removed)[: size - target]


def _apply_masks(the_plan: Plan, leaves: list[Any], masks: Any) -> list[Any]:
  if masks is None:
    return list(leaves)
  by_path = {p: m for p, m in tree_lib.leaves_with_paths(masks, is_leaf=tree_lib.is_none)}
  out = []
  for p, x in zip(the_plan.paths, leaves):
    m = by_path.get(p)
    if m is None:
      m = next((v for k, v in by_path.items() if v is not None and tree_lib.same_leaf(p, k)), None)
    if m is not None and np.shape(m) != np.shape(x):
      raise ValueError(f"The mask for {p!r} has shape {np.shape(m)}, the array {np.shape(x)}.")
    if m is not None:  # numpy: eager jnp ops would compile one program per shape
      x = np.asarray(x)
      x = jnp.asarray(np.where(np.asarray(m), x, np.zeros((), x.dtype)))
    out.append(x)
  known = set(the_plan.paths)
  for k, v in by_path.items():
    if v is not None and not any(tree_lib.same_leaf(p, k) for p in known):
      raise ValueError(f"The mask names {k!r}, which is not a variable of this model.")
  return out


def _zero_producers(the_plan: Plan, leaves: list[Any], group, chans: list[int]) -> list[Any]:
  index = {p: i for i, p in enumerate(the_plan.paths)}
  out = list(leaves)
  for p, a in group.producers:
    idx = np.concatenate([group.channels[j][(p, a)] for j in chans]) if chans else np.array([], int)
    arr = np.array(out[index[p]])
    sl = [slice(None)] * arr.ndim
    sl[a] = idx
    arr[tuple(sl)] = 0
    out[index[p]] = jnp.asarray(arr)
  return out


def _check(reference, small_fn, small_vars, inputs, rtol, seed) -> float:
  rng = np.random.default_rng(seed + 1)
  xs = [
    jnp.asarray(rng.normal(size=(CHECK_BATCH, *jnp.shape(x)[1:])), jnp.result_type(x))
    for x in inputs
  ]
  try:
    small_out = small_fn(small_vars, *xs)
  except Exception as e:  # a shape hard-coded in the model code, typically
    raise ValueError(
      "The shrunk model does not run: " + str(e).splitlines()[0] + ". Does the model code "
      "hard-code a width (e.g. reshape to a fixed size)? Derive sizes from the input."
    ) from e
  ref_out = reference(*xs)
  err, scale = 0.0, 1.0
  for a, b in zip(jax.tree.leaves(ref_out), jax.tree.leaves(small_out)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"The shrunk model's output has shape {np.shape(b)}, not {np.shape(a)}.")
    err = max(err, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    scale = max(scale, float(np.max(np.abs(np.asarray(a)))))
  if not err <= rtol * scale:  # NaN fails too
    raise ValueError(
      f"Surgery check failed: the shrunk model's outputs differ from the masked model's "
      f"by {err:.3g} (tolerance {rtol * scale:.3g}). Please report this model."
    )
  return err
