"""One call from a model and calibration data to pruned params and masks.

Block by block (the papers' procedure): the layers of block ``i`` are calibrated on
inputs that flowed through blocks ``0..i-1`` already pruned, then pruned: from cached
hidden states, one pass per block, for a model whose blocks are a sequence
(:mod:`~jaxprune.posttrain.blockwise`), or by running the traced model up to each block
(any model); or one pass (every layer's statistics from the dense model). Sparsity is
one number, one per block, or OWL's outlier-weighted distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxprune import tree as tree_lib
from jaxprune.posttrain import blockwise, sharded
from jaxprune.posttrain import owl as owl_lib
from jaxprune.posttrain.blockwise import Stack, group_blocks, solve_group
from jaxprune.posttrain.calibration import Program, check_batches
from jaxprune.posttrain.sparsegpt_solver import check_options

METHODS = ("wanda", "sparsegpt")


def _params_of(model: Any, variables: Any) -> Any:
  if isinstance(model, nnx.Module):
    return nnx.state(model, nnx.Param)
  return (
    variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
  )


def _one_number(sparsity: Any) -> Any:
  """A numpy or JAX scalar sparsity as a Python float (a list, a string, ... as given)."""
  scalar = isinstance(sparsity, np.number | np.ndarray | jax.Array) and np.ndim(sparsity) == 0
  if scalar and np.issubdtype(np.asarray(sparsity).dtype, np.number):
    return float(sparsity)
  return sparsity


def _per_block(sparsity: Any, n_blocks: int) -> list[Any]:
  if sparsity is None or isinstance(sparsity, int | float) or np.ndim(sparsity) == 0:
    return [sparsity] * n_blocks  # one number (or a value the checks then refuse)
  values = list(sparsity)
  if len(values) != n_blocks:
    raise ValueError(
      f"sparsity: {len(values)} values given, one per block is {n_blocks} (or give one number)."
    )
  return values


def prune(
  model: Any,
  variables: Any = None,
  batches: Iterable[Any] = (),
  *,
  method: str = "sparsegpt",
  sparsity: float | Sequence[float] | None = None,
  structure: Any = None,
  blocks: str | Sequence[str] | None = None,
  stack: Stack | bool | None = None,
  owl: owl_lib.Owl | bool = False,
  where: tree_lib.Where = None,
  apply_kwargs: Mapping[str, Any] | None = None,
  mesh: Mesh | None = None,
  batch_axis: str | None = None,
  param_axis: str | None = None,
  cache_bytes: float | None = None,
  progress: Callable[[int, int], None] | None = None,
  **options: Any,
) -> tuple[Any, Any]:
  """Prunes a model's linear layers from calibration data with Wanda or SparseGPT.

  Block by block, as in both papers, in one of two ways:

  * ``stack=True`` (or a :class:`~jaxprune.posttrain.Stack`), for an NNX model whose
    blocks are a sequence (``embed -> blocks -> norm -> head``, see
    :func:`~jaxprune.posttrain.stack_of`): the calibration hidden states are cached at
    block 0's input; block ``i`` is calibrated on them alone, pruned, and run again to
    give block ``i + 1``'s inputs: ``2 L - 1`` block evaluations per batch for ``L``
    blocks. The states stay on the device while they take at most ``cache_bytes``
    (default: half the device's memory where the backend reports it), else on the host,
    one batch sent to the device at a time.
  * ``blocks=`` regexes (any model, NNX or Linen): for block ``i`` the whole calibration
    set is run through the traced model with blocks ``0..i-1`` already pruned (the
    compiled program returns only the statistics, so XLA drops the layers after the
    block): about ``L^2 / 2`` block evaluations per batch, memory that of one forward.

  Both give the same masks and weights (up to float rounding). With neither, one pass
  over the dense model gives every selected layer's statistics at once (faster; each
  layer sees dense inputs).

  Statistics are float32 sums and the SparseGPT solve runs in float32 whatever the
  weights' and activations' dtype (bfloat16 models are pruned in bfloat16, results cast
  back to the weights' dtype).

  Args:
    model: an ``nnx.Module`` or a ``linen.Module`` (with ``variables``).
    variables: Linen variables (``{"params": ...}``); ``None`` for NNX.
    batches: calibration batches (arrays, or tuples of positional inputs); an iterator is
      first put in a list.
    method: ``"sparsegpt"`` (updates the kept weights) or ``"wanda"`` (masks only).
    sparsity: fraction removed (default 0.5): SparseGPT per layer, Wanda per output; or
      one fraction per block (in data-flow order).
    structure: ``None`` or ``jaxprune.n_m(n, m)`` along the input features.
    blocks: a regex with one group (``r"blocks/(\\d+)/"``) or a list of regexes over
      param paths, one per block in data-flow order (:func:`group_blocks`); only the
      layers in blocks are pruned. ``None``: one pass over the dense model.
    stack: ``True`` (the model's :func:`~jaxprune.posttrain.stack_of`) or a
      :class:`~jaxprune.posttrain.Stack`: one pass per block from cached states (NNX);
      the layers of the stack's blocks are pruned.
    owl: ``True`` or :class:`~jaxprune.posttrain.Owl` ``(threshold, lam)``: each block's
      sparsity from the outlier ratio of its Wanda scores on the dense model
      (:func:`~jaxprune.posttrain.owl_sparsities`), averaging ``sparsity``. Needs blocks
      (``blocks=`` or ``stack=``), unstructured.
    where: which layers (regexes or a predicate over exact paths; default every float
      kernel read by a ``dot_general``), within the blocks when given.
    apply_kwargs: keyword arguments of the forward pass (not with ``stack``).
    mesh, batch_axis, param_axis: run over a ``jax.sharding.Mesh``
      (:mod:`~jaxprune.posttrain.sharded`): batches split along ``batch_axis`` (default:
      the mesh's one axis), every linear weight split over ``param_axis`` (default
      ``batch_axis``) along its output features, statistics all-reduced, the Wanda and
      SparseGPT solves run on each device's output columns. An NNX model's variables
      are first moved onto the mesh in place (values unchanged), so no device holds the
      whole model; the returned params and masks keep these shardings. Batches must
      split evenly (with several processes: global arrays from
      ``jax.make_array_from_process_local_data``, see ``docs/multi_host.md``).
    cache_bytes: ``stack``: the most bytes of hidden states kept on one device.
    progress: called as ``progress(done, total)`` after each block (or group of
      ``blocks``) is pruned, e.g. to print a line per block.
    **options: ``blocksize=`` and ``dampening=`` for SparseGPT.

  Returns:
    ``(params, masks)``: the params tree (Linen: ``variables["params"]``; NNX:
    ``nnx.state(model, nnx.Param)``, apply with ``nnx.update(model, params)``) with
    pruned weights zero, and masks of the same structure (``None`` for unpruned params)
    for ``jaxprune.masked(inner, masks)``.

  Raises:
    ValueError: an unknown method, no batches, a batch the model cannot run (its
      shapes, and a hint for ``(inputs, labels)`` tuples), a selection or block matching
      nothing, ``blocks`` and ``stack`` together, a stack that does not
      reproduce the model, NaN / inf in a layer's calibration inputs (naming the layer and the input
      feature), a bad ``blocksize`` / ``dampening``, and the errors of :func:`wanda` /
      :func:`sparsegpt` (each naming the layer); with ``mesh``: an axis the mesh does
      not have (listing its axes), or a batch whose leading size does not split over
      ``batch_axis`` (naming its shape). A weight whose output axis does not divide is
      kept whole on every device, with a warning naming it.
    TypeError: options other than SparseGPT's ``blocksize`` and ``dampening``; a
      ``mesh`` that is not a ``jax.sharding.Mesh``.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  sparsity = _one_number(sparsity)  # np.float32(0.5), jnp.float32(0.5): one number
  if method == "wanda" and options:
    raise TypeError(f"wanda takes no options, got {sorted(options)}.")
  if method == "sparsegpt":  # checked before any calibration pass
    unknown = sorted(set(options) - {"blocksize", "dampening"})
    if unknown:
      raise TypeError(f"sparsegpt's options are blocksize= and dampening=, got {unknown}.")
    check_options(options.get("blocksize", 128), options.get("dampening", 0.01))
  if stack is not None and stack is not False:
    if blocks is not None:
      raise ValueError("prune: give blocks= (the generic traced path) or stack=, not both.")
    if not isinstance(model, nnx.Module):
      raise ValueError(
        f"prune: stack= needs an nnx.Module, got {type(model).__name__}; use blocks=<regex>."
      )
    if apply_kwargs:
      raise ValueError("prune: stack= calls each block as x = block(x); apply_kwargs not taken.")
  data = check_batches(batches, "prune")
  program = Program.of(model, variables, apply_kwargs, mesh, batch_axis, param_axis)
  if mesh is not None:
    _place_model(model, program, data)
  if stack is not None and stack is not False:
    the_stack = blockwise.stack_of(model) if stack is True else stack
    assert isinstance(the_stack, Stack)
    prefixes = blockwise.block_paths(model, the_stack.blocks)
    n_blocks = len(prefixes)
  else:
    the_stack, prefixes = None, []
    layers = program.layers(data[0], where)
    groups = [list(layers)] if blocks is None else group_blocks(layers, blocks)
    n_blocks = len(groups)
  sparsities = _per_block(sparsity, n_blocks)
  if owl:
    sparsities = _owl(
      program, data, where, owl, sparsity, structure, prefixes, groups=None if the_stack else groups
    )
  paths = program.paths
  flat, treedef = jax.tree.flatten(program.variables)
  current = dict(zip(paths, flat))
  mask_of: dict[str, Any] = {}
  if the_stack is not None:
    updated, mask_of = blockwise.prune_stack(
      model, the_stack, data, method=method, sparsities=sparsities, structure=structure,
      where=where, options=options, cache_bytes=cache_bytes, mesh=mesh,
      batch_axis=program.batch_axis, param_axis=program.param_axis, progress=progress,
    )  # fmt: skip
    current.update(updated)
  else:
    for i, (group, s) in enumerate(zip(groups, sparsities)):
      got = program.statistics([current[p] for p in paths], data, group, method == "sparsegpt")
      kernels = {p: current[p] for p in group}
      updated, masks = solve_group(method, kernels, got, s, structure, options)
      if mesh is not None:  # the solves' outputs on their weights' shardings
        updated, masks = sharded.put_like(updated, current), sharded.put_like(masks, current)
      current.update(updated)
      mask_of.update(masks)
      if progress is not None:
        progress(i + 1, len(groups))
  new_variables = jax.tree.unflatten(treedef, [current[p] for p in paths])
  if isinstance(model, nnx.Module):
    graphdef, _ = nnx.split(model)
    new_model = nnx.merge(graphdef, new_variables)
    params = nnx.state(new_model, nnx.Param)
  else:
    params = _params_of(model, new_variables)
  stripped = {tree_lib.strip_collection(p): m for p, m in mask_of.items()}
  flat_params, params_def = jax.tree_util.tree_flatten_with_path(params)
  masks = [stripped.get(tree_lib.strip_collection(tree_lib.path_str(k))) for k, _ in flat_params]
  return params, jax.tree.unflatten(params_def, masks)


def _place_model(model: Any, program: Program, data: list[tuple]) -> None:
  """Moves the traced variables onto the program's mesh (and an NNX model's own, in place).

  Raises:
    ValueError: a batch whose leading axis does not split over the batch axis.
  """
  assert program.mesh is not None and program.batch_axis is not None
  for inputs in data:
    sharded.check_batch(inputs, program.mesh, program.batch_axis)
  leaves, treedef = jax.tree.flatten(program.variables)
  program.variables = jax.tree.unflatten(treedef, program.place_leaves(leaves, data[0]))
  if isinstance(model, nnx.Module):
    nnx.update(model, program.variables)


def _owl(
  program: Program,
  data: list[tuple],
  where: tree_lib.Where,
  owl: owl_lib.Owl | bool,
  sparsity: Any,
  structure: Any,
  prefixes: list[str],
  groups: list[list[str]] | None,
) -> list[float]:
  """OWL's per-block sparsities from one pass over the dense model."""
  if structure is not None:
    raise ValueError("prune: owl= sets each block's sparsity; it does not apply to N:M.")
  if sparsity is not None and not isinstance(sparsity, int | float):
    raise ValueError("prune: owl= distributes one sparsity over the blocks; give one number.")
  if groups is None:
    layers = program.layers(data[0], where)
    groups = [[p for p in layers if p.startswith(f"{prefix}/")] for prefix in prefixes]
    empty = [prefix for prefix, g in zip(prefixes, groups) if not g]
    if empty:
      raise ValueError(f"prune: owl= needs pruned layers in every block; none in {empty}.")
  elif len(groups) < 2:
    raise ValueError("prune: owl= distributes the sparsity over blocks; give blocks= or stack=.")
  hyper = owl if isinstance(owl, owl_lib.Owl) else owl_lib.Owl()
  chosen = [p for g in groups for p in g]
  stats = program.statistics(jax.tree.leaves(program.variables), data, chosen, False)
  params = dict(zip(program.paths, jax.tree.leaves(program.variables)))
  s = 0.5 if sparsity is None else float(sparsity)
  return owl_lib.owl_sparsities(params, stats, groups, s, threshold=hyper.threshold, lam=hyper.lam)
