"""Functions over a whole gated model: find its gates, set alpha, freeze, read vectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import tree as tree_lib
from jaxprune.nn.autopruner.gate import Gate


def _path(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def gates(model: nnx.Module) -> dict[str, Gate]:
  """``{path: Gate}`` for every :class:`Gate` in ``model``, in graph traversal order.

  Examples:
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, gates
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(Gated(nnx.Linear(2, 3, rngs=rngs), rngs=rngs), nnx.relu)
    >>> list(gates(model))
    ['layers/0/gate']
  """
  return {_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, Gate)}


def set_alpha(model: nnx.Module, alpha: Any) -> None:
  """Sets every gate's ``alpha`` (a float or a traced array: no recompilation under jit).

  ``alpha = inf`` makes every gate a hard 0/1 vector, but still one computed from the
  batch: in eval mode (BatchNorm running statistics) or on small batches it can differ
  from the :func:`~jaxprune.nn.hard_masks` the model will be folded with. To evaluate
  the pruned model through the gated one, :func:`freeze_gates` it instead.

  Examples:
    >>> from flax import nnx
    >>> from jaxprune.nn import Gate, set_alpha
    >>> gate = Gate(3, rngs=nnx.Rngs(0))
    >>> set_alpha(gate, 50.0)
    >>> float(gate.alpha[...])
    50.0
  """
  found = gates(model)
  if not found:
    raise ValueError(f"{type(model).__name__} has no jaxprune.nn.Gate to set alpha on.")
  value = jnp.asarray(alpha, jnp.float32)
  for gate in found.values():
    gate.alpha.set_value(value)


def freeze_gates(model: nnx.Module, masks: Mapping[str, Any] | None) -> None:
  """Fixes every gate to its hard mask, so the gated model computes the pruned one.

  After ``freeze_gates(model, masks)`` each :class:`Gate` multiplies its input by
  ``masks[path]`` (as 0/1) whatever the batch, BatchNorm mode or ``alpha``, so
  ``model(x)`` equals ``ungate(model, masks)[0](x)`` on any input, one image or many.
  :func:`gate_vectors` then returns the masks. ``freeze_gates(model, None)`` makes the
  gates live again. Values only change, so jitted steps do not recompile.

  Args:
    model: an NNX model with :class:`Gate` layers.
    masks: ``{gate path: (C,) bool}`` for every gate, e.g. from :func:`hard_masks`,
      or ``None`` to unfreeze.

  Raises:
    ValueError: for a missing or extra gate path, or a mask of the wrong length.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, freeze_gates
    >>> block = Gated(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> freeze_gates(block, {"gate": jnp.array([True, False, True])})
    >>> bool((block(jnp.ones((1, 2)))[:, 1] == 0).all())
    True
  """
  found = gates(model)
  if not found:
    raise ValueError(f"{type(model).__name__} has no jaxprune.nn.Gate to freeze.")
  if masks is None:
    for gate in found.values():
      gate.frozen.set_value(jnp.full_like(gate.frozen.get_value(), jnp.nan))
    return
  missing, extra = sorted(set(found) - set(masks)), sorted(set(masks) - set(found))
  if missing or extra:
    raise ValueError(f"Masks do not match the gates: missing {missing}, unknown {extra}.")
  for path, gate in found.items():
    keep = jnp.asarray(masks[path])
    if keep.shape != gate.frozen.shape:
      raise ValueError(
        f"The mask for {path!r} has shape {keep.shape}; the gate has {gate.frozen.shape}."
      )
    gate.frozen.set_value(keep.astype(bool).astype(jnp.float32))


def gate_vectors(source: Any) -> dict[str, jax.Array]:
  """The gate vectors of the last forward pass, ``{gate path: v}``.

  Args:
    source: an NNX model (its :class:`Gate` modules are read), or the Linen
      ``"intermediates"`` collection (or the whole mutated-variables dict) of an
      ``apply(..., mutable=["intermediates"])`` call with Linen gates.

  Returns:
    ``{path: (C,) array}``, e.g. ``{"conv1/gate": v}`` for NNX or ``{"gate1": v}`` for
    a Linen gate named ``gate1``. Differentiable when read inside the loss function.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn import Gated, gate_vectors
    >>> block = Gated(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> _ = block(jnp.ones((5, 3)))
    >>> {p: v.shape for p, v in gate_vectors(block).items()}
    {'gate': (4,)}
  """
  if isinstance(source, nnx.Module):
    found = {p: g.vector[...] for p, g in gates(source).items()}
  else:
    found = {}
    for path, leaf in tree_lib.leaves_with_paths(source):
      parts = path.split("/")
      if parts[0] == "intermediates":
        parts = parts[1:]
      if parts[-1] == "gate_vector":  # the root module's own gate has the path ""
        found["/".join(parts[:-1])] = leaf
  if not found:
    raise ValueError(
      "No gate vectors found: pass an NNX model with jaxprune.nn.Gate layers, or the "
      "'intermediates' of a Linen apply(..., mutable=['intermediates'])."
    )
  return found
