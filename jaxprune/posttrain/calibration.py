"""Calibration: statistics of every linear layer's inputs, from the traced forward pass.

The model is traced once per input shape (:mod:`jaxprune.surgery.capture`); its linear
layers are the params read by ``dot_general`` equations (Dense / Linear, LinearGeneral,
einsum projections), found by exact path; the inputs of those equations are recorded
while the traced program runs under ``jax.jit`` and reduced there to
:class:`~jaxprune.posttrain.stats.InputStats` (float32 sums), so no Flax class is
patched and no activation leaves the device. With a mesh, batches are split over a data
axis, the weights over their output features (:mod:`~jaxprune.posttrain.sharded`), and
the sums are all-reduced by the compiler.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune import tree as tree_lib
from jaxprune.posttrain import sharded
from jaxprune.posttrain import stats as stats_lib
from jaxprune.posttrain.stats import InputStats
from jaxprune.surgery import capture
from jaxprune.surgery.linear import Layer, linear_layers


def as_inputs(batch: Any) -> tuple:
  """A batch as the model's positional inputs: a tuple as it is, anything else alone."""
  return tuple(batch) if isinstance(batch, tuple) else (batch,)


class ProgramCache(dict):
  """Compiled programs by a key of what they compute; past ``size`` entries the oldest
  goes (a program holds no weights, only its compiled code)."""

  def __init__(self, size: int = 32):
    super().__init__()
    self.size = size

  def put(self, key: Any, program: Callable) -> Callable:
    while len(self) >= self.size:
      del self[next(iter(self))]
    self[key] = program
    return program


# Statistics programs of models with a ``Program.key``.
_STATS = ProgramCache()


def _key(model: Any, variables: Any, apply_kwargs: Mapping[str, Any] | None) -> Any:
  """What an NNX model's forward pass is a function of (its graph definition, state
  structure and call keywords), hashable; ``None`` where it cannot be told (Linen, or
  keywords that cannot be hashed): such programs are compiled per :class:`Program`."""
  if not isinstance(model, nnx.Module):
    return None
  graphdef = nnx.graphdef(model)
  key = (graphdef, jax.tree.structure(variables), tuple(sorted((apply_kwargs or {}).items())))
  try:
    hash(key)
  except TypeError:
    return None
  return key


@dataclasses.dataclass
class Program:
  """A model's forward pass, traced per input shape, and its linear layers.

  Attributes:
    fn: ``fn(variables, *inputs)``, the eval-mode forward pass.
    variables: the variables traced (an NNX state or Linen variables).
    mesh: a mesh to split batches over (``batch_axis``) and weights over
      (``param_axis``), or ``None``.
    key: what ``fn`` is a function of, hashable (an NNX model's graph definition, state
      structure and call keywords), or ``None``: programs of an equal key are equal, so
      their compiled statistics are kept across calls.
  """

  fn: Callable[..., Any]
  variables: Any
  mesh: Mesh | None = None
  batch_axis: str | None = None
  param_axis: str | None = None
  key: Any = None
  _traced: dict = dataclasses.field(default_factory=dict)
  _compiled: ProgramCache = dataclasses.field(default_factory=lambda: ProgramCache(sys.maxsize))
  _shardings: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def of(
    cls,
    model: Any,
    variables: Any = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    batch_axis: str | None = None,
    param_axis: str | None = None,
  ) -> Program:
    if mesh is not None:
      batch_axis, param_axis = sharded.check_axes(mesh, batch_axis, param_axis)
    if (
      not isinstance(model, nnx.Module)
      and isinstance(variables, Mapping)
      and "params" not in variables
    ):
      raise ValueError(
        f"{type(model).__name__} is a Linen module: pass its variables as module.init "
        f"returns them, {{'params': params, ...}}; got a dict with the keys "
        f"{sorted(map(str, variables))[:8]} (the params alone? wrap them: {{'params': params}})."
      )
    fn, variables = capture.forward(model, variables, dict(apply_kwargs or {}))
    return cls(fn, variables, mesh, batch_axis, param_axis, _key(model, variables, apply_kwargs))

  @property
  def paths(self) -> list[str]:
    return [
      tree_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(self.variables)[0]
    ]

  def traced(self, inputs: tuple) -> tuple[capture.Traced, dict[str, Layer | str]]:
    key = (
      jax.tree.structure(inputs),
      tuple((jax.numpy.shape(x), jax.numpy.result_type(x)) for x in jax.tree.leaves(inputs)),
    )
    if key not in self._traced:
      try:
        traced = capture.trace(self.fn, self.variables, *inputs)
      except (TypeError, ValueError) as e:
        raise ValueError(self._cannot_run(inputs, e)) from e
      self._traced[key] = (traced, _tied_are_not_layers(traced, linear_layers(traced)))
    return self._traced[key]

  def _cannot_run(self, inputs: tuple, error: Exception) -> str:
    """Why a calibration batch could not be traced, with what was given and what ran."""
    shapes = [tuple(jax.numpy.shape(x)) for x in jax.tree.leaves(inputs)]
    said = f"`batches`: the model cannot run on a calibration batch of shape(s) {shapes}"
    if self._traced:
      (_, first), _ = next(iter(self._traced.items()))
      said += f" (an earlier batch had {[s for s, _ in first]})"
    said += f": {type(error).__name__}: {str(error).rstrip('.')}"
    if len(inputs) > 1:
      said += (
        f". A tuple batch is the model's {len(inputs)} positional inputs; if it is "
        "(inputs, labels), pass the inputs alone (e.g. [x for x, _ in batches])"
      )
    return said + "."

  def layers(self, example: tuple, where: tree_lib.Where = None) -> dict[str, Layer]:
    """The linear layers ``where`` selects among the float params with ndim >= 2 (biases
    and norms never are), by default all of those that a ``dot_general`` reads.

    Non-float kernels (int8, ...) are never pruned: a warning lists those skipped.

    Raises:
      ValueError: ``where`` selects a param that no ``dot_general`` reads on these
        inputs, or one read in a way that is not one linear layer (naming it and why);
        no float linear layer is selected (listing the float ones and those skipped).
    """
    _, found = self.traced(example)
    pred = tree_lib.as_predicate(where)
    chosen: dict[str, Layer] = {}
    skipped: dict[str, str] = {}  # linear layers whose weight is not float: their dtype
    tied: list[str] = []
    for path, leaf in tree_lib.leaves_with_paths(self.variables):
      if leaf is None:
        continue
      layer = found.get(path)
      if isinstance(layer, Layer) and not tree_lib.is_float(leaf):
        if where is None or pred(path, leaf):
          skipped[path] = str(leaf.dtype)
        continue
      if not (tree_lib.default_where(path, leaf) and pred(path, leaf)):
        continue
      if isinstance(layer, Layer):
        chosen[path] = layer
      elif where is not None:
        why = layer or (
          "no dot_general of the forward pass reads it on the calibration inputs (the "
          "calibration data does not reach it)"
        )
        raise ValueError(f"Layer {path!r} is selected for pruning, but {why}.")
      elif isinstance(layer, str) and layer.startswith(_TIED):
        tied.append(path)
      elif isinstance(layer, str) and "convolution" not in layer:
        raise ValueError(f"Layer {path!r} cannot be pruned after training: {layer}.")
    note = f"Only float weights are pruned; skipped the non-float linear layers {skipped}."
    if not chosen:
      listed = [p for p, v in found.items() if isinstance(v, Layer) and p not in skipped]
      raise ValueError(
        f"No float linear layer selected by where={where!r}; the float linear layers are "
        f"{listed}." + (f" {note}" if skipped else "")
      )
    if skipped:
      warnings.warn(note, stacklevel=3)
    if tied:
      warnings.warn(
        f"Not pruned: {tied}, read both by a dot (an output projection) and by a gather (a "
        "token lookup): tied embeddings are left dense, as the reference Wanda and SparseGPT "
        "leave lm_head.",
        stacklevel=3,
      )
    order = {p: i for i, p in enumerate(found)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))

  def _stats_fn(self, inputs: tuple, paths: tuple[str, ...], hessian: bool) -> Callable:
    traced, found = self.traced(inputs)
    if self.key is None:
      key, compiled = (id(traced), paths, hessian), self._compiled
    else:  # kept across calls (prune() again, a sweep): the same model's program is equal
      avals = tuple((jax.numpy.shape(x), jax.numpy.result_type(x)) for x in jax.tree.leaves(inputs))
      leaf_avals = tuple((x.shape, x.dtype) for x in jax.tree.leaves(self.variables))
      key, compiled = (self.key, leaf_avals, avals, paths, hessian, self.mesh), _STATS
    if key not in compiled:
      layers = [layer for p in paths if isinstance(layer := found[p], Layer)]
      if len(layers) != len(paths):
        raise ValueError(
          f"Not linear layers: {[p for p in paths if p not in found or isinstance(found[p], str)]}."
        )
      site_of = {s: (i, k) for i, layer in enumerate(layers) for k, s in enumerate(layer.sites)}

      def run(leaves, inputs):
        _, records = capture.evaluate(traced, leaves, inputs, lambda site, eqn: site in site_of)
        got: list[list] = [[None] * len(layer.sites) for layer in layers]
        for r in records:
          i, k = site_of[r.site]
          got[i][k] = r.ins[layers[i].inputs[k][0]]
        return {
          layer.path: stats_lib.of_inputs(layer, xs, hessian) for layer, xs in zip(layers, got)
        }

      if self.mesh is None:
        program = jax.jit(run)
      else:
        program = jax.jit(run, out_shardings=NamedSharding(self.mesh, PartitionSpec()))
      compiled.put(key, program)
    return compiled[key]

  def leaf_shardings(self, inputs: tuple) -> list[NamedSharding] | None:
    """Each variable's sharding over the mesh (:func:`~jaxprune.posttrain.sharded.leaf_spec`:
    linear weights split along their output features, found by tracing on ``inputs``), or
    ``None`` without a mesh."""
    if self.mesh is None:
      return None
    traced, found = self.traced(inputs)
    if id(traced) not in self._shardings:
      assert self.param_axis is not None
      leaves = jax.tree.leaves(self.variables)
      self._shardings[id(traced)] = sharded.leaf_shardings(
        self.paths, leaves, found, self.mesh, self.param_axis
      )
    return self._shardings[id(traced)]

  def place_leaves(self, leaves: list, inputs: tuple) -> list:
    """``leaves`` (the variables' leaves, or updated ones) placed on the mesh, if any."""
    shardings = self.leaf_shardings(inputs)
    return leaves if shardings is None else jax.device_put(leaves, shardings)

  def place_batch(self, inputs: Any) -> Any:
    """A batch (any pytree) split along its leading axis over ``batch_axis``, if a mesh."""
    return sharded.split_batch(inputs, self.mesh, self.batch_axis)

  def place(self, leaves: list, inputs: tuple) -> tuple[list, tuple]:
    """Leaves split over ``param_axis`` and inputs along ``batch_axis`` (with a mesh)."""
    return self.place_leaves(leaves, inputs), self.place_batch(inputs)

  def statistics(
    self, leaves: list, batches: Sequence[tuple], layers: Iterable[str], hessian: bool
  ) -> dict[str, InputStats]:
    """Input statistics of ``layers`` summed over ``batches``, with the variables ``leaves``."""
    paths = tuple(layers)
    total: dict[str, InputStats] | None = None
    for inputs in batches:
      placed_leaves, placed = self.place(leaves, inputs)
      got = self._stats_fn(inputs, paths, hessian)(placed_leaves, placed)
      total = got if total is None else {p: total[p] + got[p] for p in paths}
    assert total is not None
    for st in total.values():  # NaN / inf inputs would rank first (Wanda) or break Cholesky
      st.layer.check_finite(st.sq_norms, "calibration")
    return total


_TIED = "it is also read by a gather, as a tied embedding"
_LOOKUPS = ("gather", "dynamic_slice")


def _tied_are_not_layers(
  traced: capture.Traced, found: dict[str, Layer | str]
) -> dict[str, Layer | str]:
  """``found``, with the layers whose weight is also looked up (a gather: a tied token
  embedding read as the output projection too) replaced by why they are not pruned:
  a mask chosen from the projection's inputs would also remove entries of the lookup,
  which no calibration statistic covers (the reference implementations leave lm_head out).
  """
  the_flow = capture.flow(traced)
  looked_up = {
    traced.paths[the_flow.params[node.ins[0]].leaf]
    for node in the_flow.nodes
    if node.primitive in _LOOKUPS and node.ins and node.ins[0] in the_flow.params
  }
  return {
    path: (
      f"{_TIED}: a mask chosen from its inputs as the output projection would also remove "
      "entries of the token lookup, which the calibration does not measure"
      if isinstance(layer, Layer) and path in looked_up
      else layer
    )
    for path, layer in found.items()
  }


def check_batches(batches: Iterable[Any], what: str) -> list[tuple]:
  """The calibration batches as a list of input tuples (an iterator is read once)."""
  out = [as_inputs(b) for b in batches]
  if not out:
    raise ValueError(f"{what}: no calibration batches given.")
  return out


def calibrate(
  model: Any,
  variables: Any = None,
  batches: Iterable[Any] = (),
  *,
  where: tree_lib.Where = None,
  hessian: bool = True,
  apply_kwargs: Mapping[str, Any] | None = None,
  mesh: Mesh | None = None,
  batch_axis: str | None = None,
  param_axis: str | None = None,
) -> dict[str, InputStats]:
  """Input statistics of every linear layer of the dense model (one pass over the batches).

  Args:
    model: an ``nnx.Module`` (``variables=None``) or a ``linen.Module`` with its
      ``variables``; run in eval mode (NNX) / as ``model.apply(variables, *inputs,
      **apply_kwargs)`` (Linen).
    variables: Linen variables; ``None`` for NNX.
    batches: calibration batches: each an array (the model's one input) or a tuple of
      positional inputs. Batches of a new shape trace the model again.
    where: which params' layers (regex(es) over exact paths or a ``(path, leaf)``
      predicate); default every float kernel (ndim >= 2) that a ``dot_general`` reads.
      Convolutions are not handled.
    hessian: also collect ``X^T X`` (SparseGPT); ``False`` keeps only the norms (Wanda).
    apply_kwargs: keyword arguments of the forward pass.
    mesh: a ``jax.sharding.Mesh``; batches are split along ``batch_axis`` (their leading
      axis) and the statistics all-reduced (they come back replicated); each linear
      weight is split over ``param_axis`` along its output features
      (:mod:`~jaxprune.posttrain.sharded`).
    batch_axis: the mesh axis of the data (default: the mesh's axis, if it has one).
    param_axis: the mesh axis the weights are split over (default ``batch_axis``: FSDP).

  Returns:
    ``{path: InputStats}`` per layer, paths as in the model's variables (Linen:
    ``params/...``), in the order the forward pass reads them.

  Raises:
    ValueError: no batches; a batch the model cannot run (its shapes; a hint for
      ``(inputs, labels)`` tuples); ``where`` selects nothing, or a param the
      calibration data does not reach (naming it); NaN or inf among a layer's inputs
      (naming the layer and the input feature). Non-float kernels (int8, ...) are
      skipped with a warning listing them.
  """
  data = check_batches(batches, "calibrate")
  program = Program.of(model, variables, apply_kwargs, mesh, batch_axis, param_axis)
  layers = program.layers(data[0], where)
  leaves = jax.tree.leaves(program.variables)
  return program.statistics(leaves, data, layers, hessian)
