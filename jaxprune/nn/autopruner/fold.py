"""Folding hard AutoPruner gates into the producer layers: a gate-free model plus masks.

A hard gate ``m in {0, 1}^C`` right after a producer multiplies its output channels:
``m * (x @ W + b) = x @ (W * m) + b * m``. After a BatchNorm and an activation ``f``
with ``f(0) = 0`` it is ``f(BN'(y))`` with the norm's scale and bias times ``m``. So the
gate can be dropped once those params are multiplied by ``m``: the result is a plain
model (conv-BN-ReLU) whose removed channels are exactly zero, and a jaxprune mask
tree saying which entries were removed, ready for ``jaxprune.surgery`` to slice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import unfreeze

from jaxprune import tree as tree_lib
from jaxprune.nn.autopruner.gate import Gate, Gated


def _channel_mask(keep: Any, shape: tuple[int, ...], where: str) -> jax.Array:
  keep = jnp.asarray(keep, bool)
  if keep.ndim != 1 or not shape or shape[-1] != keep.shape[0]:
    raise ValueError(
      f"The hard mask for {where} has shape {keep.shape}, but the param it folds into has "
      f"shape {shape}: its last axis must be the {keep.shape[-1:]} gated channels."
    )
  return jnp.broadcast_to(keep, shape)


def _replace(root: Any, path: tuple, new: Any) -> None:
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _check_activation(activation: Any, where: str) -> None:
  if activation is not None and float(activation(jnp.zeros((), jnp.float32))) != 0.0:
    raise ValueError(
      f"The activation of {where} is not zero at zero, so a removed channel would emit "
      "f(0) and the hard gate cannot be folded exactly. Gate after a ReLU-like activation."
    )


def ungate(model: nnx.Module, masks: Mapping[str, Any]) -> tuple[nnx.Module, Any]:
  """A gate-free copy of ``model`` with the hard gates folded into the producers.

  Every :class:`~jaxprune.nn.Gated` at path ``P`` is replaced by its layer, or by
  ``nnx.Sequential(layer, norm, activation)`` when it has a norm or an activation
  (params at ``P/layers/0/...``, ``P/layers/1/...``). The layer's kernel and bias and
  the norm's scale and bias are zero in the removed channels (``masks[P + "/gate"]``
  False). Its outputs equal those of ``model`` with hard gates (``set_alpha(model,
  jnp.inf)``) on inputs whose gates give these masks, BatchNorm in either mode; surgery
  can then slice the removed channels. ``model`` itself is left unchanged.

  Args:
    model: an NNX model whose gates are all inside :class:`~jaxprune.nn.Gated`.
    masks: ``{gate path: (C,) bool}`` for every gate, e.g. from
      :func:`~jaxprune.nn.hard_masks`.

  Returns:
    ``(plain_model, param_masks)``: ``param_masks`` has the structure of
    ``nnx.state(plain_model, nnx.Param)``; a folded param's leaf is a bool array of its
    shape (its removed output channels, the last axis, are False), every other leaf is
    ``None``. Use it with :func:`jaxprune.apply_mask` / :func:`jaxprune.summary`.

  Raises:
    ValueError: for a gate outside ``Gated``, a missing or extra mask, a mask of the
      wrong length, or an activation that is not zero at zero.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, ungate
    >>> model = nnx.Sequential(Gated(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)))
    >>> plain, pm = ungate(model, {"layers/0/gate": jnp.array([True, False, True])})
    >>> type(plain.layers[0]).__name__, pm["layers"][0]["kernel"][...].tolist()
    ('Linear', [[True, False, True], [True, False, True]])
  """
  model = nnx.clone(model)
  wrapped = [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, Gated)]
  inside = {id(m.gate) for _, m in wrapped}
  bare = [
    "/".join(map(str, p))
    for p, m in nnx.iter_graph(model)
    if isinstance(m, Gate) and id(m) not in inside
  ]
  if bare:
    raise ValueError(
      f"The gates at {bare} are not inside jaxprune.nn.Gated, so their producer is unknown "
      "and they cannot be folded. Wrap the producer layer: Gated(conv, norm=..., rngs=...)."
    )
  gate_paths = {"/".join(map(str, p + ("gate",))): (p, m) for p, m in wrapped}
  missing, extra = sorted(set(gate_paths) - set(masks)), sorted(set(masks) - set(gate_paths))
  if missing or extra:
    raise ValueError(f"Masks do not match the gates: missing {missing}, unknown {extra}.")

  folded: dict[int, jax.Array] = {}
  for where, (path, block) in gate_paths.items():
    _check_activation(block.activation, where)
    targets = [getattr(block.layer, "kernel", None), getattr(block.layer, "bias", None)]
    if block.norm is not None:
      targets += [block.norm.scale, block.norm.bias]
    for var in targets:
      if isinstance(var, nnx.Param) and var.get_value() is not None:
        value = var.get_value()
        keep = _channel_mask(masks[where], value.shape, where)
        var.set_value(jnp.where(keep, value, jnp.zeros((), value.dtype)))
        folded[id(var)] = keep
    parts = [x for x in (block.layer, block.norm, block.activation) if x is not None]
    plain = block.layer if len(parts) == 1 else nnx.Sequential(*parts)
    if path:
      _replace(model, path, plain)
    else:
      model = plain

  by_path = {
    "/".join(map(str, p)): folded[id(v)]
    for p, v in nnx.iter_graph(model)
    if isinstance(v, nnx.Variable) and id(v) in folded
  }
  params = nnx.state(model, nnx.Param)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [by_path.get(tree_lib.path_str(p)) for p, _ in flat]
  return model, jax.tree.unflatten(treedef, leaves)


def ungate_params(
  params: Any, masks: Mapping[str, Any], into: Mapping[str, str | Sequence[str]]
) -> tuple[dict, dict]:
  """Folds hard gates into Linen params: drops the gates' params, zeros removed channels.

  For each gate path ``g`` (a Linen :class:`~jaxprune.nn.linen.Gate`'s scope, e.g.
  ``"gate1"``), every param under each prefix in ``into[g]`` (the producer, e.g.
  ``"conv1"``, and a BatchNorm after it, e.g. ``"bn1"``) is multiplied by ``masks[g]``
  along its last axis, and the params under ``g`` are removed. Apply the result to the
  same Linen model built without its gates.

  Args:
    params: the Linen ``"params"`` collection (a nested dict).
    masks: ``{gate path: (C,) bool}``, e.g. from :func:`~jaxprune.nn.hard_masks`.
    into: ``{gate path: producer path or paths}`` (``/``-joined scope names).

  Returns:
    ``(params, param_masks)``: nested dicts; ``param_masks`` has a bool array of the
    param's shape for every folded param and ``None`` elsewhere.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.nn import ungate_params
    >>> params = {"conv1": {"kernel": jnp.ones((1, 2)), "bias": jnp.ones(2)},
    ...           "gate1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    >>> p, m = ungate_params(params, {"gate1": jnp.array([True, False])}, {"gate1": "conv1"})
    >>> sorted(p), p["conv1"]["bias"].tolist(), m["conv1"]["kernel"].tolist()
    (['conv1'], [1.0, 0.0], [[True, False]])
  """
  flat: dict[str, Any] = traverse_util.flatten_dict(unfreeze(params), sep="/")
  unknown = sorted(set(masks) - set(into))
  if unknown:
    raise ValueError(f"No producer given in `into` for the gates {unknown}.")
  out, param_masks = dict(flat), dict.fromkeys(flat)
  for gate, keep in masks.items():
    gate_keys = [k for k in flat if k.startswith(gate + "/")]
    if not gate_keys:
      raise ValueError(f"No params under the gate path {gate!r}; params: {sorted(flat)}.")
    for k in gate_keys:
      del out[k], param_masks[k]
    producer = into[gate]
    targets = [producer] if isinstance(producer, str) else list(producer)
    for target in targets:
      keys = [k for k in flat if k.startswith(target + "/")]
      if not keys:
        raise ValueError(f"No params under {target!r} (the producer of {gate!r}).")
      for k in keys:
        m = _channel_mask(keep, np.shape(flat[k]), f"{gate!r} (folded into {k!r})")
        out[k] = jnp.where(m, flat[k], jnp.zeros((), flat[k].dtype))
        param_masks[k] = m
  unflatten = traverse_util.unflatten_dict
  return unflatten(out, sep="/"), unflatten(param_masks, sep="/")
