"""One pass per block: prune a model whose blocks are a sequence, from cached hidden states.

The procedure of the reference code (SparseGPT's ``llama.py``, Wanda's ``prune.py``): the
calibration hidden states are computed once at block 0's input; for each block, its
linear layers' inputs are captured in one evaluation of that block alone on the cached
states and reduced to statistics, the block is pruned, and the pruned block is run once
more on the cached states to give the next block's inputs. ``2 L - 1`` block
evaluations per batch for ``L`` blocks (the last block's output is not needed), against
about ``L^2 / 2`` for the generic path that runs the whole model up to each block.

A model fits this path when its forward pass is ``suffix(blocks[L-1](...blocks[0](
prefix(*inputs))))``, each block an ``nnx.Module`` called as ``x = block(x)``
(:class:`Stack`). :func:`stack_of` recognises the usual attribute names (``embed`` /
``embed_tokens``, ``blocks`` / ``layers``, ``norm``, ``head`` / ``lm_head``) and checks the
decomposition against the model's own output before any pruning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxprune import tree as tree_lib
from jaxprune.posttrain import sharded
from jaxprune.posttrain.calibration import Program, ProgramCache
from jaxprune.posttrain.layers import Layer
from jaxprune.posttrain.sparsegpt_solver import sparsegpt
from jaxprune.posttrain.stats import InputStats
from jaxprune.posttrain.wanda_masks import wanda

_PREFIXES = ("embed", "embed_tokens")
BLOCK_ATTRIBUTES = ("blocks", "layers")
_NORMS = ("norm", "final_norm")
_HEADS = ("head", "lm_head")


@dataclasses.dataclass(frozen=True)
class Stack:
  """A model's forward pass as ``prefix`` -> a sequence of blocks -> ``suffix``.

  Attributes:
    prefix: ``prefix(*inputs) -> x``, the hidden states at block 0's input (e.g. the
      token embedding).
    blocks: the blocks in data-flow order, each an ``nnx.Module`` of the model called as
      ``x = block(x)`` (eval mode).
    suffix: ``suffix(x) -> output`` after the last block (e.g. final norm and head), or
      ``None``. When given, the composition is checked against the model's output on
      the first calibration batch before anything is pruned.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import posttrain
    >>> from jaxprune.models.decoder import CharLM
    >>> model = CharLM(16, dim=16, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=32,
    ...                rngs=nnx.Rngs(0))
    >>> stack = posttrain.stack_of(model)  # embed -> blocks -> norm, head
    >>> len(stack.blocks), bool(jnp.allclose(stack(jnp.ones((1, 4), int)),
    ...                                      model(jnp.ones((1, 4), int)), atol=1e-5))
    (2, True)
  """

  prefix: Callable[..., Any]
  blocks: Sequence[nnx.Module]
  suffix: Callable[[Any], Any] | None = None

  def __call__(self, *inputs: Any) -> Any:
    """The composed forward pass (eager): ``suffix(blocks(prefix(*inputs)))``."""
    x = self.prefix(*inputs)
    for block in self.blocks:
      x = block(x)
    return x if self.suffix is None else self.suffix(x)


def attribute(model: Any, names: Sequence[str]) -> tuple[str, Any] | None:
  for name in names:
    value = getattr(model, name, None)
    if value is not None:
      return name, value
  return None


def stack_of(model: Any) -> Stack:
  """The :class:`Stack` of a model: given, from a ``stack()`` method, or from attributes.

  A model that defines ``stack()`` returning a :class:`Stack` decides for itself.
  Otherwise the pattern is ``embed`` (or ``embed_tokens``) -> ``blocks`` (or ``layers``,
  a sequence of ``nnx.Module``) -> ``norm`` (optional) -> ``head`` (or ``lm_head``);
  :func:`~jaxprune.posttrain.prune` checks the guess against the model's output.

  Raises:
    ValueError: the model has no such attributes (naming what is missing and how to
      pass a :class:`Stack` instead).
  """
  if isinstance(model, Stack):
    return model
  method = getattr(model, "stack", None)
  if callable(method):
    got = method()
    if not isinstance(got, Stack):
      raise TypeError(f"{type(model).__name__}.stack() returned {type(got).__name__}, not Stack.")
    return got
  name = type(model).__name__
  blocks = attribute(model, BLOCK_ATTRIBUTES)
  if blocks is None or not all(isinstance(b, nnx.Module) for b in blocks[1]) or not blocks[1]:
    raise ValueError(
      f"{name} has no attribute {' or '.join(BLOCK_ATTRIBUTES)} holding a sequence of nnx.Modules; "
      "pass stack=posttrain.Stack(prefix, blocks, suffix) describing its forward pass, or "
      "prune it with blocks=<regex> (the generic traced path)."
    )
  prefix = attribute(model, _PREFIXES)
  head = attribute(model, _HEADS)
  if prefix is None or head is None:
    missing = " or ".join(_PREFIXES) if prefix is None else " or ".join(_HEADS)
    raise ValueError(
      f"{name} has {blocks[0]!r} but no {missing}; pass stack=posttrain.Stack(prefix, blocks, "
      "suffix) describing its forward pass."
    )
  norm = attribute(model, _NORMS)
  embed_fn, head_fn = prefix[1], head[1]
  if norm is None:
    suffix = head_fn
  else:
    norm_fn = norm[1]

    def suffix(x: Any) -> Any:
      return head_fn(norm_fn(x))

  return Stack(embed_fn, list(blocks[1]), suffix)


def group_blocks(layers: Mapping[str, Layer], blocks: str | Sequence[str]) -> list[list[str]]:
  """The layers of each block, in data-flow order.

  ``blocks`` is one regex with one capturing group (``r"layers/(\\d+)/"``: a block per
  value of the group, ordered by the first layer that the forward pass reads), or a
  list of regexes, one per block, in the order the data flows through them. Layers
  that no block matches are not pruned.

  Raises:
    ValueError: a regex without exactly one group, a regex of the list matching no
      layer, or a layer matched by two blocks (naming them and the layers).
  """
  names = list(layers)
  if isinstance(blocks, str):
    pattern = re.compile(blocks)
    if pattern.groups != 1:
      raise ValueError(
        f"blocks={blocks!r}: a single regex needs exactly one capturing group naming the "
        "block (e.g. r'layers/(\\d+)/'); or pass a list of regexes, one per block."
      )
    grouped: dict[str, list[str]] = {}
    for p in names:
      m = pattern.search(p)
      if m:
        grouped.setdefault(m.group(1), []).append(p)
    if not grouped:
      raise ValueError(f"blocks={blocks!r} matches none of the linear layers {names}.")
    return list(grouped.values())
  out, owner = [], {}
  for pattern in blocks:
    chosen = [p for p in names if re.search(pattern, p)]
    if not chosen:
      raise ValueError(f"Block {pattern!r} matches none of the linear layers {names}.")
    for p in chosen:
      if p in owner:
        raise ValueError(f"Layer {p!r} is in two blocks: {owner[p]!r} and {pattern!r}.")
      owner[p] = pattern
    out.append(chosen)
  return out


def block_paths(model: Any, blocks: Sequence[nnx.Module]) -> list[str]:
  """Each block's path in ``model`` (``"blocks/3"``), found by identity.

  Raises:
    ValueError: a block that is not a submodule of ``model``.
  """
  where = {id(node): "/".join(str(k) for k in path) for path, node in nnx.iter_graph(model)}
  out = []
  for i, block in enumerate(blocks):
    if id(block) not in where:
      raise ValueError(f"Stack block {i} ({type(block).__name__}) is not a submodule of the model.")
    out.append(where[id(block)])
  return out


def solve_group(
  method: str,
  kernels: dict[str, Any],
  stats: dict[str, InputStats],
  sparsity: float | None,
  structure: Any,
  options: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(updated kernels, masks)`` of one block's layers by Wanda or SparseGPT."""
  if method == "wanda":
    masks = wanda(kernels, stats, sparsity, structure=structure)
    return {p: k * masks[p].astype(k.dtype) for p, k in kernels.items()}, masks
  return sparsegpt(kernels, stats, sparsity, structure=structure, **options)


def default_cache_bytes() -> float:
  """Half the first device's memory where the backend reports it, else no limit."""
  try:
    got = jax.devices()[0].memory_stats()
  except Exception:  # backends without memory statistics
    got = None
  if got and "bytes_limit" in got:
    return got["bytes_limit"] / 2
  return float("inf")


class HiddenCache:
  """The calibration hidden states at one block boundary, one array per batch.

  On the devices while the most bytes they take on one device (all of them on one
  device; a share of them when split over a mesh) is within ``budget``; otherwise as
  numpy arrays on the host, each batch sent to the devices when a block reads it.
  """

  def __init__(self, arrays: list[Any], budget: float):
    per_device = sharded.device_bytes(arrays)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in arrays)
    self.on_host = (max(per_device.values()) if per_device else total) > budget
    self.arrays = [self._keep(x) for x in arrays]

  def _keep(self, x: Any) -> Any:
    return np.asarray(x) if self.on_host else x

  def map(self, fn: Callable[[Any], Any]) -> HiddenCache:
    """A cache of ``fn(x)`` for every batch ``x`` (kept where this one is)."""
    new = HiddenCache.__new__(HiddenCache)
    new.on_host = self.on_host
    new.arrays = [new._keep(fn(x)) for x in self.arrays]
    return new


def _compare_output(got: Any, expected: Any) -> float:
  """The largest difference relative to the largest ``|expected|``, reduced on the devices
  (arrays split over several hosts are never copied to one)."""
  got, expected = (jnp.asarray(x, jnp.float32) for x in (got, expected))
  if got.shape != expected.shape:
    return float("inf")
  return float(jnp.max(jnp.abs(got - expected))) / max(float(jnp.max(jnp.abs(expected))), 1e-30)


# Compiled block forward passes kept across calls (a sparsity sweep, OWL, calling prune()
# again): keyed by what the program is a function of, the block's graph definition and
# state structure and the mesh, so no block's weights are held. Oldest out past the bound.
_RUNS = ProgramCache()


def _block_runner(program: Program, treedef: Any, mesh: Mesh | None, batch_axis: str | None):
  """``jit(run)`` with ``run(leaves, *x) = program.fn(unflatten(treedef, leaves), *x)``,
  kept per ``(program.key, mesh, batch_axis)`` (a new one each call without a key).

  ``program.fn`` is a block's (or a model's) eval-mode forward pass
  (:func:`~jaxprune.surgery.capture.forward`), a function of its graph definition only:
  every module of an equal ``program.key`` gives the same program.
  """
  fn = program.fn
  key = None if program.key is None else (program.key, mesh, batch_axis)
  compiled = None if key is None else _RUNS.get(key)
  if compiled is None:

    def run(leaves, *x):
      return fn(jax.tree.unflatten(treedef, leaves), *x)

    if mesh is None:
      compiled = jax.jit(run)
    else:  # the next block's inputs stay split over the batch axis
      assert batch_axis is not None
      compiled = jax.jit(run, out_shardings=sharded.batch_sharding(mesh, batch_axis))
    if key is not None:
      _RUNS.put(key, compiled)
  return compiled


@dataclasses.dataclass
class BlockPrograms:
  """Each block's traced program and its compiled forward pass, shared by blocks of one
  structure (equal graph definitions)."""

  mesh: Mesh | None
  batch_axis: str | None
  param_axis: str | None = None
  programs: dict[Any, tuple[Program, Any, Callable]] = dataclasses.field(default_factory=dict)

  def of(self, block: nnx.Module) -> tuple[Program, list, Callable]:
    """``(program, the block's state leaves, run)``: ``run(leaves, x)`` is the block's output."""
    graphdef, state = nnx.split(block)
    entry = self.programs.get(graphdef)
    if entry is None:
      program = Program.of(block, None, None, self.mesh, self.batch_axis, self.param_axis)
      treedef = jax.tree.structure(program.variables)
      compiled = _block_runner(program, treedef, self.mesh, self.batch_axis)
      entry = (program, treedef, compiled)
      self.programs[graphdef] = entry
    program, treedef, run = entry
    leaves = jax.tree.leaves(state)
    if jax.tree.structure(state) != treedef:
      raise ValueError(f"Block {type(block).__name__}: its state changed structure.")
    return program, leaves, run

  def place(self, x: Any) -> Any:
    """Hidden states split along their leading axis over the batch axis (with a mesh)."""
    return sharded.split_batch(x, self.mesh, self.batch_axis)

  def prefix(self, stack: Stack, inputs: tuple) -> Any:
    """The hidden states at block 0's input, split over the batch axis (with a mesh)."""
    return self.place(stack.prefix(*(self.place(x) for x in inputs)))


def prune_stack(
  model: Any,
  stack: Stack,
  data: list[tuple],
  *,
  method: str,
  sparsities: Sequence[float | None],
  structure: Any,
  where: tree_lib.Where,
  options: Mapping[str, Any],
  cache_bytes: float | None,
  mesh: Mesh | None = None,
  batch_axis: str | None = None,
  param_axis: str | None = None,
  progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """``({path: updated leaf}, {path: mask})`` over the model's paths, one pass per block.

  See :func:`~jaxprune.posttrain.prune` (``stack=``).
  """
  paths = block_paths(model, stack.blocks)
  pred = tree_lib.as_predicate(where)
  budget = default_cache_bytes() if cache_bytes is None else cache_bytes
  programs = BlockPrograms(mesh, batch_axis, param_axis)
  if stack.suffix is not None:
    _check_stack(model, stack, data[0], programs)
  hidden = HiddenCache([programs.prefix(stack, inputs) for inputs in data], budget)
  updated: dict[str, Any] = {}
  mask_of: dict[str, Any] = {}
  last = len(stack.blocks) - 1
  for i, (block, path) in enumerate(zip(stack.blocks, paths)):
    program, leaves, run = programs.of(block)
    local = dict(tree_lib.leaves_with_paths(program.variables))

    def chosen(p: str, leaf: Any, path: str = path) -> bool:
      return pred(f"{path}/{p}", leaf)

    if any(tree_lib.default_where(p, x) and chosen(p, x) for p, x in local.items()):
      example = (hidden.arrays[0],)
      layers = program.layers(example, None if where is None else chosen)
      rel = program.paths
      leaves = program.place_leaves(leaves, example)
      current = dict(zip(rel, leaves))
      got = program.statistics(leaves, [(x,) for x in hidden.arrays], layers, method == "sparsegpt")
      new, masks = solve_group(
        method, {p: current[p] for p in layers}, got, sparsities[i], structure, options
      )
      if mesh is not None:  # the solves' outputs on their weights' shardings
        new, masks = sharded.put_like(new, current), sharded.put_like(masks, current)
      current.update(new)
      leaves = [current[p] for p in rel]
      for p in layers:
        updated[f"{path}/{p}"] = new[p]
        mask_of[f"{path}/{p}"] = masks[p]
    if i < last:
      hidden = hidden.map(lambda x, leaves=leaves, run=run: run(leaves, programs.place(x)))
    if progress is not None:
      progress(i + 1, last + 1)
  if not mask_of:
    raise ValueError(
      f"No linear layer selected by where={where!r} in the {len(paths)} blocks of the stack "
      f"({', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''})."
    )
  return updated, mask_of


def _check_stack(model: Any, stack: Stack, inputs: tuple, programs: BlockPrograms) -> None:
  """Raises unless ``stack`` reproduces ``model``'s output on the first example of ``inputs``
  (over a mesh: the first example per device along the batch axis, which must split).

  One example (the leading axis of every input cut to 1), not the batch: the check runs
  the model twice (stack and whole), which on a whole batch costs half a pruning pass
  over one more batch (a 1B model: minutes on a CPU); whether the composition is the
  model's does not depend on the batch size.
  """
  rows = 1 if programs.mesh is None else programs.mesh.shape[programs.batch_axis]
  inputs = tuple(x[:rows] if np.ndim(x) else x for x in inputs)  # over a mesh: one per device
  x = stack.prefix(*inputs)
  for block in stack.blocks:
    _, leaves, run = programs.of(block)
    x = run(leaves, x)
  assert stack.suffix is not None
  got = stack.suffix(x)
  reference = Program.of(model)
  leaves, treedef = jax.tree.flatten(reference.variables)
  expected = _block_runner(reference, treedef, None, None)(leaves, *inputs)
  error = _compare_output(got, expected)
  if not error <= 1e-2:
    raise ValueError(
      f"The stack of {type(model).__name__} (prefix -> {len(stack.blocks)} blocks -> suffix) "
      f"does not reproduce the model's output (relative difference {error:.3g}): its forward "
      "pass does more than embed -> blocks -> norm -> head. Pass stack=posttrain.Stack(prefix, "
      "blocks, suffix) that computes it, or prune with blocks=<regex> (the generic path)."
    )
