"""One call from a model and calibration data to pruned params and masks.

Block by block (the papers' procedure): the layers of block ``i`` are calibrated on
inputs that flowed through blocks ``0..i-1`` already pruned, then pruned; or one pass
(every layer's statistics from the dense model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxprune import tree as tree_lib
from jaxprune.posttrain.calibration import Program, check_batches
from jaxprune.posttrain.layers import Layer
from jaxprune.posttrain.sparsegpt_solver import check_options, sparsegpt
from jaxprune.posttrain.wanda_masks import wanda

METHODS = ("wanda", "sparsegpt")


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


def _params_of(model: Any, variables: Any) -> Any:
  if isinstance(model, nnx.Module):
    return nnx.state(model, nnx.Param)
  return (
    variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
  )


def prune(
  model: Any,
  variables: Any = None,
  batches: Iterable[Any] = (),
  *,
  method: str = "sparsegpt",
  sparsity: float | None = None,
  structure: Any = None,
  blocks: str | Sequence[str] | None = None,
  where: tree_lib.Where = None,
  apply_kwargs: Mapping[str, Any] | None = None,
  mesh: Mesh | None = None,
  batch_axis: str | None = None,
  **options: Any,
) -> tuple[Any, Any]:
  """Prunes a model's linear layers from calibration data with Wanda or SparseGPT.

  With ``blocks``, block by block as in both papers: for block ``i`` the whole
  calibration set is run through the model with blocks ``0..i-1`` already pruned (and,
  for SparseGPT, updated), the inputs of block ``i``'s layers are reduced to
  statistics, and the block is pruned. Cost: one forward pass over the calibration
  data per block, each up to that block (the compiled program returns only the
  statistics, so XLA drops the layers after the block): about ``L^2 / 2`` block
  evaluations per batch for ``L`` blocks, against ``L`` for a method that caches
  block outputs; memory stays that of one forward pass. Without ``blocks``, one pass
  over the dense model gives every selected layer's statistics at once (faster; each
  layer sees dense inputs).

  Args:
    model: an ``nnx.Module`` or a ``linen.Module`` (with ``variables``).
    variables: Linen variables (``{"params": ...}``); ``None`` for NNX.
    batches: calibration batches (arrays, or tuples of positional inputs); read once
      per block, so an iterator is first put in a list.
    method: ``"sparsegpt"`` (updates the kept weights) or ``"wanda"`` (masks only).
    sparsity: fraction removed (default 0.5): SparseGPT per layer, Wanda per output.
    structure: ``None`` or ``jaxprune.n_m(n, m)`` along the input features.
    blocks: a regex with one group (``r"blocks/(\\d+)/"``) or a list of regexes over
      param paths, one per block in data-flow order (:func:`group_blocks`); only the
      layers in blocks are pruned. ``None``: one pass over the dense model.
    where: which layers (regexes or a predicate over exact paths; default every float
      kernel read by a ``dot_general``), within the blocks when given.
    apply_kwargs: keyword arguments of the forward pass.
    mesh, batch_axis: split the batches over a data-parallel mesh axis
      (:func:`~jaxprune.posttrain.calibrate`).
    **options: ``blocksize=`` and ``dampening=`` for SparseGPT.

  Returns:
    ``(params, masks)``: the params tree (Linen: ``variables["params"]``; NNX:
    ``nnx.state(model, nnx.Param)``, apply with ``nnx.update(model, params)``) with
    pruned weights zero, and masks of the same structure (``None`` for unpruned params)
    for ``jaxprune.masked(inner, masks)``.

  Raises:
    ValueError: an unknown method, no batches, a batch the model cannot run (its
      shapes, and a hint for ``(inputs, labels)`` tuples), a selection or block matching
      nothing, NaN / inf in a layer's calibration inputs (naming the layer and the input
      feature), a bad ``blocksize`` / ``dampening``, and the errors of :func:`wanda` /
      :func:`sparsegpt` (each naming the layer).
    TypeError: options other than SparseGPT's ``blocksize`` and ``dampening``.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if method == "wanda" and options:
    raise TypeError(f"wanda takes no options, got {sorted(options)}.")
  if method == "sparsegpt":  # checked before any calibration pass
    unknown = sorted(set(options) - {"blocksize", "dampening"})
    if unknown:
      raise TypeError(f"sparsegpt's options are blocksize= and dampening=, got {unknown}.")
    check_options(options.get("blocksize", 128), options.get("dampening", 0.01))
  data = check_batches(batches, "prune")
  program = Program.of(model, variables, apply_kwargs, mesh, batch_axis)
  layers = program.layers(data[0], where)
  groups = [list(layers)] if blocks is None else group_blocks(layers, blocks)
  paths = program.paths
  flat, treedef = jax.tree.flatten(program.variables)
  current = dict(zip(paths, flat))
  mask_of: dict[str, Any] = {}
  for group in groups:
    got = program.statistics([current[p] for p in paths], data, group, method == "sparsegpt")
    kernels = {p: current[p] for p in group}
    if method == "wanda":
      masks = wanda(kernels, got, sparsity, structure=structure)
      updated = {p: kernels[p] * masks[p].astype(kernels[p].dtype) for p in group}
    else:
      updated, masks = sparsegpt(kernels, got, sparsity, structure=structure, **options)
    current.update(updated)
    mask_of.update(masks)
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
