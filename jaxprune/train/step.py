"""One training step and one evaluation pass: the jitted pure functions of a run.

The model is split once into a graph definition and pytrees (``nnx.split``); the
jitted step is a pure function of a :class:`TrainState`, run SPMD over a device mesh
(:mod:`jaxprune.train.sharding`), saved and restored by
:mod:`jaxprune.train.checkpoint`. :mod:`jaxprune.train.run` drives them over the
phases of a recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune
from jaxprune import tree as tree_lib
from jaxprune.train import data
from jaxprune.train import sharding as sharding_lib


class TrainState(NamedTuple):
  """Everything that changes during training: a pytree of arrays, ready to checkpoint.

  Attributes:
    params: the ``nnx.Param`` state of the model (paths like ``"fc1/kernel"``).
    rest: the model's other state (BatchNorm statistics; empty for the LeNets).
    opt_state: the optimizer state (holds the masks: see :func:`jaxprune.masks_of`).
    step: the number of steps taken in this phase (``int32`` scalar): with the seed,
      also the position in the data (:func:`jaxprune.train.data.stream`).
    rng: raw PRNG key data (``uint32[2]``), split once per step for augmentation.
  """

  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array


def init_state(
  model: nnx.Module, tx: optax.GradientTransformation, *, seed: int, masks: Any = None
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and starts training it with ``tx``.

  Args:
    model: the ``nnx.Module`` to train.
    tx: the optimizer (:func:`jaxprune.masked` or plain optax).
    seed: seeds the state's RNG key.
    masks: fixed masks to start from (the rethinking run): the params are masked and
      the masks put into the :class:`jaxprune.MaskedState` of ``tx``, wherever it sits
      in the state (e.g. inside ``optax.chain``).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  if masks is not None:
    params = jaxprune.apply_mask(params, masks)
    opt_state = jaxprune.set_masks(opt_state, masks)
  rng = jax.random.key_data(jax.random.key(seed))
  return graphdef, TrainState(params, rest, opt_state, jnp.zeros((), jnp.int32), rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.train import step
    >>> round(float(step.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
    1.3863
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames="paths")
def zero_fraction(params: Any, paths: tuple[str, ...]) -> jax.Array:
  """The fraction of exact zeros over the params at ``paths`` (the measured sparsity).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.train import step
    >>> float(step.zero_fraction({"w": jnp.array([0., 1., 0., 2.])}, paths=("w",)))
    0.5
  """
  leaves = dict(tree_lib.leaves_with_paths(params))
  zeros = sum(jnp.sum(leaves[p] == 0, dtype=jnp.float32) for p in paths)
  return jnp.asarray(zeros / max(1, sum(leaves[p].size for p in paths)))


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  *,
  augment: str = "none",
  measured: tuple[str, ...] = (),
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """``(state, images, labels) -> (state, metrics)``: one optimizer step (to be jitted).

  ``tx.update`` receives the params, as :func:`jaxprune.masked` needs, and
  ``optax.apply_updates`` leaves pruned weights exactly zero. The metrics are the
  batch's ``loss`` and ``accuracy`` and the ``sparsity`` of the ``measured`` params
  after the step.
  """

  def loss_fn(params, rest, images, labels):
    model = nnx.merge(graphdef, params, rest, copy=True)  # BatchNorm updates its copy
    logits = model(images)
    return cross_entropy(logits, labels), (logits, nnx.split(model, nnx.Param, ...)[2])

  def train_step(state, images, labels):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    images = data.augment(images, key, augment)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, rest)), grads = grad_fn(state.params, state.rest, images, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # apply_updates returns a tree of the structure of its first argument: an nnx.State.
    params = cast(nnx.State, optax.apply_updates(state.params, updates))
    new = TrainState(params, rest, opt_state, state.step + 1, jax.random.key_data(rng))
    metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "sparsity": zero_fraction(params, paths=measured),
    }
    return new, metrics

  return train_step


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(graphdef, params, rest, images, labels, valid):
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  logits = model(images)
  n = labels.shape[0]
  hits = (jnp.argmax(logits, -1) == labels).reshape(n, -1).mean(axis=1)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  losses = losses.reshape(n, -1).mean(axis=1)
  return jnp.stack([jnp.where(valid, hits, 0).sum(), jnp.where(valid, losses, 0).sum()])


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """``(params, rest, inputs, labels, valid) -> [correct, loss]`` summed over valid examples.

  Eval mode. An example's ``correct`` and ``loss`` are its accuracy and mean
  cross-entropy over its label positions (one for a classifier, every token of a
  sequence for a language model). Jitted once per model structure: runs of the same
  model share the compiled function.
  """
  return functools.partial(_eval_step, graphdef)


def evaluate(
  eval_step: Callable,
  state: TrainState,
  split: data.Source,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
) -> float:
  """Accuracy of the model in ``state`` on a whole split (see :func:`make_eval_step`).

  With a ``mesh``, each batch is split over its devices (and this process reads only
  its rows of each batch).
  """
  return accuracy(eval_step, state.params, state.rest, split, batch_size, mesh)


def accuracy(
  eval_step: Callable,
  params: nnx.State,
  rest: nnx.State,
  split: data.Source,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
) -> float:
  """:func:`evaluate` of a model's ``params`` and ``rest`` (``nnx.split(model, nnx.Param, ...)``).

  The accuracy of :func:`scores`.

  Examples:
    >>> from flax import nnx
    >>> from jaxprune.train import data, models, step
    >>> model = models.create("lenet300", (8, 8, 1), 10, seed=0)
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> test = data.load("digits").test
    >>> 0 <= step.accuracy(step.make_eval_step(graphdef), params, rest, test, 128) <= 1
    True
  """
  return scores(eval_step, params, rest, split, batch_size, mesh)["accuracy"]


def scores(
  eval_step: Callable,
  params: nnx.State,
  rest: nnx.State,
  split: data.Source,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
  """``{"accuracy", "loss"}``: means over a split's examples (:func:`make_eval_step`).

  For a language model whose examples all have the same length, ``loss`` is the mean
  token cross-entropy and ``exp(loss)`` the perplexity.
  """
  total = np.zeros(2)
  process = sharding_lib.process() if mesh is not None else (0, 1)
  for batch in data.eval_batches(split, batch_size, process=process):
    if mesh is not None:
      batch = sharding_lib.global_batch(batch, sharding_lib.batch_sharding(mesh))
    total += np.asarray(eval_step(params, rest, *batch), np.float64)
  return {"accuracy": float(total[0]) / len(split), "loss": float(total[1]) / len(split)}


def measured_paths(pruner: jaxprune.Pruner | None, params: Any) -> tuple[str, ...]:
  """The params whose sparsity a run reports: the pruned ones (all kernels when dense)."""
  if pruner is None:
    return tuple(tree_lib.selected_paths(params))
  return tuple(pruner.paths(params))


def sparsity_summary(pruner: jaxprune.Pruner | None, params: Any) -> jaxprune.Summary:
  """:func:`jaxprune.summary` of the :func:`measured_paths` of ``params``."""
  paths = set(measured_paths(pruner, params))
  return jaxprune.summary(sharding_lib.to_host(params), where=lambda path, _: path in paths)
