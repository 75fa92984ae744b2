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
from jaxprune.surgery import candidates as candidates_lib
from jaxprune.surgery import capture, linen, rebuild
from jaxprune.surgery import check as check_lib
from jaxprune.surgery.planning import UNITS, Plan, trace
from jaxprune.surgery.removal import host_values, kept_indices, plan_removal, slice_tree, take
from jaxprune.surgery.source import exception_line


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
  fn, variables = capture.forward(model, variables, dict(apply_kwargs or {}))
  return _trace(model, fn, variables, capture.as_inputs(example_input), "plan")


def _trace(model: Any, fn: Callable, variables: Any, inputs: tuple, caller: str) -> Plan:
  """:func:`trace`, with an error about ``example_input`` when the model does not run;
  for a Linen model, groups whose widths its code does not follow are blocked."""
  for x in inputs:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(
        f"{caller}(): example_input must be an array or jax.ShapeDtypeStruct (a tuple "
        f"for several inputs), got {type(x).__name__}."
      )
  try:
    the_plan = trace(fn, variables, *inputs)
  except (TypeError, ValueError) as e:
    raise check_lib.example_input_error(caller, inputs, e) from e
  if isinstance(model, nn.Module):
    the_plan = linen.rebuild_blocks(fn, the_plan)
  if isinstance(model, nnx.Module):
    the_plan = rebuild.tie_head_dims(model, the_plan)
  return the_plan


@dataclasses.dataclass(frozen=True)
class Shrunk:
  """A smaller model and what was cut.

  Attributes:
    model: the new NNX module, or the Linen module to ``apply`` with ``variables``.
    variables: the sliced variables (for NNX: ``nnx.state(model)``).
    plan: the groups of the original model.
    removed: ``{group name: [removed channel indices]}``.
    kept: ``{path: {axis: kept indices}}`` for every sliced array.
    widths: ``{module path: {attribute: new size}}``, the new architecture as a config
      (a size is a tuple for ``nnx.LinearGeneral``'s ``in_features``/``out_features``;
      for Linen, the dataclass fields set: ``features``, ``num_heads``, ``n_head``, an
      ``Einsum``'s ``shape``...).
    max_error: the largest output difference from the masked model found by the check
      (over every input size it ran at).
    kept_constant: ``{group name: [channel indices]}`` that were dead (all producer
      weights zero, so their output is a constant) but are kept, because a consumer
      cannot absorb that constant exactly (no bias, a zero-padded conv at the borders,
      a strided conv whose padding depends on the input size).
    why_kept: ``{group name: reason}`` for ``kept_constant``, naming the consumer.
    stayed: ``{group name: [(channels, why), ...]}``: every other pruned channel that
      stays (zero in some producers only, the last channel of a layer, a block of
      outputs such as a GroupNorm group pruned in part, rounding to ``multiple_of``).
    checked_shapes: the input shapes the check ran at (the example's, and each axis
      the model lets vary grown by one).
  """

  model: Any
  variables: Any
  plan: Plan
  removed: dict[str, list[int]]
  kept: dict[str, dict[int, np.ndarray]]
  widths: dict[str, dict[str, int | tuple[int, ...]]]
  max_error: float | None
  kept_constant: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  why_kept: dict[str, str] = dataclasses.field(default_factory=dict)
  stayed: candidates_lib.Stayed = dataclasses.field(default_factory=dict)
  checked_shapes: tuple = ()

  def slice(self, tree: Any) -> Any:
    """Slices the params-shaped parts of a tree (masks, Adam moments, a whole optax state).

    The tree may be built from the params (``tx.init(variables["params"])``,
    ``tx.init(nnx.state(model, nnx.Param))``) or from all variables.
    """
    return slice_tree(tree, self.plan, self.kept)

  def report(self) -> str:
    """One line per group: channels before -> after, why blocked, pruned channels kept.

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
      line = f"{g.name}: {g.size} -> {g.size - n} {UNITS[g.kind]}"
      if g.blocked:
        line += f" (blocked: {g.blocked})"
      kept = self.kept_constant.get(g.name)
      if kept:
        dead = "dead channel" if len(kept) == 1 else "dead channels"
        line += f" (kept {len(kept)} {dead} {kept}: {self.why_kept.get(g.name, '')})"
      for chans, why in self.stayed.get(g.name, ()):
        word = "pruned channel" if len(chans) == 1 else "pruned channels"
        line += f" (kept {len(chans)} {word} {chans}: {why})"
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
  head_dim: bool = False,
  apply_kwargs: Mapping[str, Any] | None = None,
  verify: bool = True,
  rtol: float = 1e-5,
  seed: int = 0,
) -> Shrunk:
  """Physically removes pruned channels: a smaller model that computes the same outputs.

  Channels are removed where the masks (or ``remove=``) say: a channel goes when all its
  producers' weights are zero after masking (structured masks, SSL zero groups, hard
  gates). Constant outputs of removed channels (``relu(bias)``...) are folded into the
  consumers' biases where that is exact at every input size; other such channels are
  kept. Groups that reach the model output, or pass an op slicing cannot follow, are
  never cut; if ``remove=`` asks for such a group the error names the op and where it
  is. The small model takes every input shape the original takes; the check runs it
  at the example's shape and with each axis the model lets vary (spatial, sequence)
  grown by one.

  Args:
    model: an ``nnx.Module`` or a ``linen.Module``.
    variables: Linen variables; ``None`` for NNX.
    masks: a mask pytree over the params (or over all variables), matched to the
      arrays by exact path; ``None`` = no masks.
    example_input: an input array or ``jax.ShapeDtypeStruct`` (batch axis first).
    remove: ``{group name: channel indices}`` to remove explicitly (all their
      producers' weights are then treated as zero).
    keep: layers whose outputs must not shrink: a group is kept whole when one of its
      producers' paths matches (regexes over paths, or a predicate).
    multiple_of: round every new width up to a multiple (8 for GPU tensor cores, 128
      for TPU lanes) by keeping some channels that could have gone.
    head_dim: also remove pruned dimensions of every attention head (groups of kind
      ``"head_dim"``); by default they stay (rotary embeddings depend on the head
      dimension), unless ``remove=`` names them. An ``nnx.MultiHeadAttention``'s query
      is rescaled so its ``1/sqrt(head_dim)`` stays the original's.
    apply_kwargs: extra keyword arguments of the forward call.
    verify: run the shrunk model and the original one with the masks applied on random
      inputs and raise if outputs differ (the error names the groups involved).
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
  inputs = capture.as_inputs(example_input)
  kwargs = dict(apply_kwargs or {})
  fn, state = capture.forward(model, variables, kwargs)
  the_plan = _trace(model, fn, state, inputs, "shrink")
  remove = dict(remove or {})
  candidates_lib.check_remove(the_plan, remove)
  # The user's masked model: its variables are the reference of the check, run through
  # the model's own forward pass (not through anything the removal computes).
  masked_state = check_lib.masked_variables(state, masks)
  treedef = jax.tree.structure(state)
  leaves = jax.tree.leaves(masked_state)
  leaves = _zero_producers(the_plan, leaves, remove)
  values = host_values(the_plan.paths, leaves)
  protect = tree_lib.as_predicate(keep) if keep else (lambda path, leaf: False)
  chosen, stayed = candidates_lib.choose(the_plan, values, remove, protect, head_dim)

  rng = np.random.default_rng(seed)
  shapes = [tuple(tuple(jnp.shape(x)) for x in inputs)]
  grown = check_lib.grown_shapes(fn, state, inputs)
  if grown is not None:
    shapes.append(grown)
  batches = [check_lib.random_inputs(inputs, rng, s) for s in shapes]
  try:
    removal = plan_removal(the_plan, leaves, batches, chosen)
  except (TypeError, ValueError):  # the first run at the check batch: no batch axis?
    check_lib.check_batch_axis("shrink", fn, state, inputs)
    raise
  removed = candidates_lib.round_widths(the_plan, removal.removed, multiple_of, stayed)
  if removed != {k: v for k, v in removal.removed.items() if v}:
    # Channels kept for the rounding must not be folded too: fold again without them.
    removal = plan_removal(the_plan, leaves, batches, removed)
    removed = {k: v for k, v in removal.removed.items() if v}

  def build(removed):
    bias_delta = plan_removal(the_plan, leaves, batches, removed).bias_delta
    return _build(model, kwargs, the_plan, leaves, treedef, bias_delta, removed)

  small, small_vars, small_fn, kept, widths = _build(
    model, kwargs, the_plan, leaves, treedef, removal.bias_delta, removed
  )
  max_error = None
  if verify:
    reference = jax.tree.unflatten(treedef, leaves)
    check_rng = np.random.default_rng(seed + 1)
    checks = [check_lib.random_inputs(inputs, check_rng, s) for s in shapes]
    try:
      max_error = _check(fn, reference, small_fn, small_vars, checks, rtol)
    except _Mismatch as e:
      names = _culprits(removed, build, fn, reference, checks, rtol)
      hint = _head_count_hint(model, the_plan, names)
      raise ValueError(f"{e} Groups involved: {', '.join(names)}.{hint}") from None
    except ValueError as e:
      unsized = rebuild.unsized_norms(small) if isinstance(small, nnx.Module) else []
      if not unsized:
        raise
      raise ValueError(
        f"{e} (More likely: the nnx.GroupNorm at {', '.join(map(repr, unsized))} has no "
        "scale or bias, so surgery cannot tell how many of its channels stay and it keeps "
        "its num_groups; give it a scale (use_scale=True), or keep= the layer feeding it.)"
      ) from e
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
    stayed=stayed,
    checked_shapes=tuple(shapes),
  )


def _zero_producers(
  the_plan: Plan, leaves: list[Any], remove: Mapping[str, Sequence[int]]
) -> list[Any]:
  """``leaves`` with the producers of the channels ``remove`` names set to zero."""
  index = {p: i for i, p in enumerate(the_plan.paths)}
  out = list(leaves)
  for name, chans in remove.items():
    g = the_plan.group(name)
    chans = sorted({int(j) for j in chans})
    if not chans:
      continue
    for p, a in g.producers:
      arr = np.array(out[index[p]])
      sl: list[slice | np.ndarray] = [slice(None)] * arr.ndim
      sl[a] = np.concatenate([g.channels[j][(p, a)] for j in chans])
      arr[tuple(sl)] = 0
      out[index[p]] = jnp.asarray(arr)
  return out


def _build(model, kwargs, the_plan, leaves, treedef, bias_delta, removed) -> tuple:
  """The small model: biases corrected, arrays sliced, layer sizes set."""
  folded = [
    jnp.asarray((np.asarray(x) + bias_delta[p]).astype(np.asarray(x).dtype))
    if p in bias_delta
    else x
    for p, x in zip(the_plan.paths, leaves)
  ]
  kept = kept_indices(the_plan, removed)
  if isinstance(model, nnx.Module):
    folded = rebuild.rescale_queries(model, the_plan, folded, removed)
  new_leaves = [take(x, kept[p]) if p in kept else x for p, x in zip(the_plan.paths, folded)]
  new_state = jax.tree.unflatten(treedef, new_leaves)
  if isinstance(model, nnx.Module):
    small = nnx.merge(nnx.graphdef(model), new_state)
    widths = rebuild.fix_head_counts(small, the_plan, removed)
    for path, new in rebuild.fix_nnx_attributes(small).items():
      widths.setdefault(path, {}).update(new)
    for path, new in rebuild.fix_shape_attributes(small, the_plan).items():
      widths.setdefault(path, {}).update(new)
    small_fn, small_vars = capture.forward(small, None, kwargs)
  else:
    small, widths = linen.resized(model, the_plan, kept, removed)
    small_fn, small_vars = capture.forward(small, new_state, kwargs)
  return small, small_vars, small_fn, kept, widths


class _Mismatch(ValueError):
  """The shrunk model's outputs differ from the masked model's."""


def _check(fn, reference, small_fn, small_vars, checks, rtol) -> float:
  """The largest difference between the masked and shrunk models over ``checks``."""
  err = 0.0
  small_fn, fn = jax.jit(small_fn), jax.jit(fn)  # one compile per size, not one per op
  for xs in checks:
    shape = ", ".join(str(tuple(x.shape)) for x in xs)
    try:
      small_out = small_fn(small_vars, *xs)
    except Exception as e:
      line = exception_line(e)
      text = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(".")
      if "reshape" in text:
        hint = (
          f" Does the model code{' at ' + line if line else ''} hard-code a width (e.g. "
          "reshape to a fixed size)? Derive sizes from the input."
        )
      else:
        hint = (
          f" (raised {'at ' + line if line else 'in library code'}). This is a limit of "
          "jaxprune's surgery, not of the model: please report it."
        )
      raise ValueError(
        f"The shrunk model does not run on an input of shape {shape}: {text}.{hint}"
      ) from e
    ref_out = fn(reference, *xs)
    try:
      err = max(
        err,
        check_lib.check_outputs(
          ref_out,
          small_out,
          rtol,
          check="Surgery",
          model="shrunk model",
          reference="masked model",
          where=f" at input shape {shape}",
          nonfinite_hint=(
            " Do the masks zero all of a weight the model divides by (a weight-normalised"
            " layer: w / ||w||)? Mask such a layer's scale instead, or keep= it."
          ),
        ),
      )
    except check_lib.NonFiniteReference:
      raise
    except ValueError as e:
      raise _Mismatch(str(e)) from None
  return err


def _head_count_hint(model: Any, the_plan: Plan, names: Sequence[str]) -> str:
  """Why a hand-written NNX attention module may compute wrongly once its heads are
  cut: its head count kept under a name surgery does not update."""
  if not isinstance(model, nnx.Module):
    return ""
  modules = {"/".join(str(k) for k in path): m for path, m in nnx.iter_modules(model)}
  for name in names:
    group = the_plan.group(name)
    module = name.rpartition("/")[0]
    mod = modules.get(module)
    if group.kind in ("heads", "head_dim") and not isinstance(mod, nnx.MultiHeadAttention):
      where = f"{module!r} ({type(mod).__name__})" if module else type(mod).__name__
      return (
        f" The heads of {where} were cut: surgery updates its int attributes "
        f"{', '.join(rebuild.HEAD_COUNTS)}; a head count under another name (or a "
        "literal, e.g. reshape(b, t, self.h, -1)) still splits the features the old way."
      )
  return ""


def _culprits(removed, build, fn, reference, checks, rtol) -> list[str]:
  """The groups whose removal alone makes the check fail (all of them if none alone)."""
  bad = []
  for name, chans in removed.items():
    _, small_vars, small_fn, _, _ = build({name: chans})
    try:
      _check(fn, reference, small_fn, small_vars, checks, rtol)
    except ValueError:
      bad.append(name)
  return bad or sorted(removed)
