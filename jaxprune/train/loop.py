"""The training loop: a config in, a trained (and pruned) model and its numbers out.

:func:`train` runs a recipe: train the model dense, prune it with the pruner that
:func:`jaxprune.train.config.make_pruner` builds from ``config.prune`` (inside the
optimizer, through :func:`jaxprune.masked`), fine-tune, and report the dense and final
test accuracy with the per-layer sparsity. The model is split once into a graph
definition and pytrees (``nnx.split``); the jitted step is a pure function of a
:class:`TrainState`, so checkpointing and sharding can wrap it without changing it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

import jaxprune
from jaxprune.train import config as config_lib
from jaxprune.train import data, models


class TrainState(NamedTuple):
  """Everything that changes during training: a pytree of arrays, ready to checkpoint.

  Attributes:
    params: the ``nnx.Param`` state of the model (paths like ``"fc1/kernel"``).
    rest: the model's other state (batch statistics, RNG counters; empty for LeNets).
    opt_state: the optimizer state (holds the masks: see :func:`jaxprune.masks_of`).
  """

  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.train import loop
    >>> round(float(loop.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
    1.3863
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
  """``(state, images, labels) -> (state, loss)``: one jitted optimizer step.

  ``tx.update`` receives the params, as :func:`jaxprune.masked` needs, and
  ``optax.apply_updates`` leaves pruned weights exactly zero.
  """

  def loss_fn(params, rest, images, labels):
    model = nnx.merge(graphdef, params, rest)
    loss = cross_entropy(model(images), labels)
    return loss, nnx.split(model, nnx.Param, ...)[2]

  @jax.jit
  def train_step(state, images, labels):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, rest), grads = grad_fn(state.params, state.rest, images, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), rest, opt_state), loss

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """``(params, rest, images, labels, valid) -> number of correct valid predictions``."""

  @jax.jit
  def eval_step(params, rest, images, labels, valid):
    logits = nnx.merge(graphdef, params, rest)(images)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)

  return eval_step


def evaluate(eval_step: Callable, state: TrainState, split: data.Source, batch_size: int) -> float:
  """Accuracy of the model in ``state`` on a whole split (see :func:`make_eval_step`)."""
  correct = sum(
    eval_step(state.params, state.rest, x, y, valid)
    for x, y, valid in data.eval_batches(split, batch_size)
  )
  return int(correct) / len(split)


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a run produced.

  Attributes:
    dense_accuracy: test accuracy just before the first pruning step (``None`` when
      pruning starts at step 0); the final accuracy when nothing is pruned.
    dense_step: the step at which ``dense_accuracy`` was measured.
    final_accuracy: test accuracy after the last step.
    summary: :func:`jaxprune.summary` of the pruned params (all kernels when unpruned).
    state: the final :class:`TrainState`.
    graphdef: rebuilds the model with ``state`` (see :meth:`model`).
    history: ``{"step", "loss"}`` and ``{"step", "accuracy"}`` records, in order.
    seconds: wall time of the run, compilation included.
  """

  dense_accuracy: float | None
  dense_step: int
  final_accuracy: float
  summary: jaxprune.Summary
  state: TrainState
  graphdef: nnx.GraphDef
  history: tuple[dict[str, float], ...]
  seconds: float

  def model(self) -> nnx.Module:
    """The trained model as an ``nnx.Module``."""
    return nnx.merge(self.graphdef, self.state.params, self.state.rest)

  def report(self) -> str:
    """Dense and final accuracy, the sparsity table and the time, as the CLI prints them."""
    dense = (
      "n/a (pruned from step 0)"
      if self.dense_accuracy is None
      else f"{self.dense_accuracy:.2%} (step {self.dense_step})"
    )
    return "\n".join(
      [
        f"dense accuracy: {dense}",
        f"final accuracy: {self.final_accuracy:.2%}",
        str(self.summary),
        f"time: {self.seconds:.1f} s",
      ]
    )


def train(config: ml_collections.ConfigDict, *, dataset: data.Dataset | None = None) -> TrainResult:
  """Runs a recipe: validates the config, trains, prunes, fine-tunes, evaluates.

  A tqdm bar (``config.train.progress``) shows the mean loss of the last
  ``train.log_every`` steps, the latest test accuracy (every ``train.eval_every``
  steps) and the target sparsity.

  Args:
    config: a config with the fields of :func:`jaxprune.train.config.default_config`.
    dataset: use this dataset instead of loading ``config.data.name``.

  Returns:
    A :class:`TrainResult`; ``print(result.report())`` shows the numbers.

  Raises:
    ConfigError: before any work, naming a bad field.

  Examples:
    >>> from jaxprune.train import config as config_lib, loop
    >>> config = config_lib.default_config()
    >>> config.data.name, config.train.steps, config.train.progress = "digits", 30, False
    >>> result = loop.train(config)
    >>> result.summary["fc1/kernel"].zeros, round(result.summary.sparsity, 3)
    (17280, 0.9)
  """
  config_lib.validate_config(config)
  started = time.perf_counter()
  t = config.train
  ds = data.load(config.data.name) if dataset is None else dataset
  model = models.create(config.model.name, ds.image_shape, ds.num_classes, seed=t.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pruner = config_lib.make_pruner(config)
  tx = config_lib.make_optimizer(config, pruner)
  state = TrainState(params, rest, tx.init(params))
  train_step, eval_step = make_train_step(graphdef, tx), make_eval_step(graphdef)

  if pruner is None:
    targets = np.zeros(t.steps)
  else:
    targets = np.asarray(jax.vmap(pruner.schedule.sparsity)(jnp.arange(t.steps)))
  pruned_steps = np.flatnonzero(targets > 0)
  dense_step = int(pruned_steps[0]) if pruned_steps.size else t.steps

  def accuracy():
    return evaluate(eval_step, state, ds.test, config.data.eval_batch_size)

  history, losses, dense_accuracy, acc = [], [], None, None
  batches = data.stream(ds.train, config.data.batch_size, seed=t.seed)
  desc = f"{config.model.name} on {ds.name}"
  with tqdm.tqdm(total=t.steps, desc=desc, unit="step", disable=not t.progress) as bar:
    for step in range(t.steps):
      if step == dense_step > 0:
        dense_accuracy = acc = accuracy()
        history.append({"step": step, "accuracy": acc})
      state, loss = train_step(state, *next(batches))
      losses.append(loss)
      done = step + 1
      if done % t.eval_every == 0 or done == t.steps:
        acc = accuracy()
        history.append({"step": done, "accuracy": acc})
      if done % t.log_every == 0 or done == t.steps:
        mean_loss, losses = float(jnp.mean(jnp.stack(losses))), []
        history.append({"step": done, "loss": mean_loss})
        postfix = {"loss": f"{mean_loss:.4f}", "sparsity": f"{targets[step]:.0%}"}
        bar.set_postfix(postfix if acc is None else {**postfix, "acc": f"{acc:.2%}"}, refresh=False)
      bar.update()
  if dense_step == t.steps:
    dense_accuracy = acc
  if pruner is None:
    summary = jaxprune.summary(state.params, where=None)  # None: all weight matrices
  else:
    pruned = set(pruner.paths(params))
    summary = jaxprune.summary(state.params, where=lambda path, _: path in pruned)
  return TrainResult(
    dense_accuracy=dense_accuracy,
    dense_step=dense_step,
    final_accuracy=acc,
    summary=summary,
    state=state,
    graphdef=graphdef,
    history=tuple(history),
    seconds=time.perf_counter() - started,
  )
