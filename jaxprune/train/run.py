"""One invocation of a recipe: phases, the device mesh, checkpoints, metrics, outputs.

:class:`Run` wires the pieces of :mod:`jaxprune.train` together for
:func:`jaxprune.train.loop.train` (the jitted step and evaluation are in
:mod:`jaxprune.train.step`, the first state and checkpoint restore in
:mod:`jaxprune.train.state`):

1. restore the newest checkpoint of ``checkpoint.dir``, if any (same command, same
   config: the run continues where it stopped);
2. the ``train`` phase: dense training, pruning, fine-tuning;
3. with ``rethink.enabled``, the ``rethink`` phase: the final masks of phase 2, fixed,
   on weights re-initialised with ``rethink.seed``, trained from scratch; its global
   steps follow those of phase 2 in checkpoints and metrics;
4. write ``params.npz``, ``summary.json`` and ``report.md`` into ``train.workdir``.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune
from jaxprune import fileio, progress
from jaxprune.analysis import plot_sensitivity
from jaxprune.train import checkpoint as checkpoint_lib
from jaxprune.train import config as config_lib
from jaxprune.train import data, models, optim, report, structured
from jaxprune.train import metrics as metrics_lib
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib
from jaxprune.train.config import config_json
from jaxprune.train.config_type import Config
from jaxprune.train.results import PhaseResult, TrainResult
from jaxprune.train.step import TrainState

# Fields whose change makes a checkpoint belong to another run.
RUN_IDENTITY = (
  "data.name",
  "data.batch_size",
  "model",
  "train.seed",
  "prune",
  "rethink",
  "regularize",
)


@dataclasses.dataclass
class Phase:
  """A phase's optimizer and schedule: ``train`` (global steps 1..T) or ``rethink``.

  ``prune_at`` is the step before which a channel method sets its masks (``None``:
  the pruner inside the optimizer does it).
  """

  name: str
  offset: int
  steps: int
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  targets: np.ndarray
  graphdef: nnx.GraphDef
  initial: TrainState
  prune_at: int | None = None


def _last_accuracy(history: list[dict[str, Any]]) -> float:
  return [r for r in history if r.get("test_accuracy") is not None][-1]["test_accuracy"]


def _field(tree: dict[str, Any], field: str) -> Any:
  node: Any = tree
  for key in field.split("."):
    node = node.get(key) if isinstance(node, dict) else None
  return node


class Run:
  """A configured run; :meth:`execute` trains (or resumes) and returns the result."""

  def __init__(self, config: Config, *, dataset: data.Dataset | None = None):
    config_lib.validate_config(config)
    if config.prune.method == "autopruner":
      raise config_lib.ConfigError(
        "prune.method: 'autopruner' trains its own gated net: run it with "
        "jaxprune.train.autopruner.train_recipe (or `jaxprune train`)."
      )
    self.started = time.perf_counter()
    self.config = config
    t = config.train
    # Everything that can fail on the config alone comes before the data.
    self.mesh = sharding_lib.make_mesh(config.parallel.devices)
    self.pruner = optim.make_pruner(config)
    self.channel_method = structured.is_channel_method(config)
    self.language_model = config.model.name in models.LANGUAGE_MODELS
    self.workdir = pathlib.Path(t.workdir) if t.workdir else None
    self.primary = jax.process_index() == 0
    self.rethink_steps = (config.rethink.steps or t.steps) if config.rethink.enabled else 0
    self.ckpt: checkpoint_lib.Checkpointer | None = None  # opened by execute, closed there
    self.writer = None
    self.ds = dataset or data.from_config(config.data)
    self.per_epoch = data.steps_per_epoch(self.ds.train, config.data.batch_size)

  # --- building phases ----------------------------------------------------------------

  def train_phase(self) -> Phase:
    t = self.config.train
    start = state_lib.initial(
      self.config, self.pruner, self.ds.image_shape, self.ds.num_classes, self.mesh
    )
    prune_at = self.config.prune.begin if self.channel_method else None
    if self.channel_method:
      # The channel fraction removed is known only once chosen: prune.sparsity is the
      # target of the methods that take one, 0 for ssl.
      target = 0.0 if self.config.prune.method == "ssl" else self.config.prune.sparsity
      targets = np.where(np.arange(t.steps) >= prune_at, target, 0.0)
    elif self.pruner is None:
      targets = np.zeros(t.steps)
    else:
      targets = np.asarray(jax.vmap(self.pruner.schedule.sparsity)(jnp.arange(t.steps)))
    return Phase(
      "train", 0, t.steps, start.tx, start.learning_rate, targets, start.graphdef, start.state,
      prune_at,
    )  # fmt: skip

  def rethink_phase(self, masks: Any) -> Phase:
    r, steps = self.config.rethink, self.rethink_steps
    if self.pruner is None:  # validate_config: rethink.enabled needs prune.method
      raise config_lib.ConfigError(
        "rethink.enabled: needs a pruned run to copy the masks from; prune.method is 'none'."
      )
    lr = optim.make_learning_rate(self.config, steps)
    tx = optim.make_optimizer(self.config, optim.frozen(self.pruner), lr)
    m = self.config.model
    model = models.from_config(m, self.ds.image_shape, self.ds.num_classes, seed=r.seed)
    graphdef, state = step_lib.init_state(model, tx, seed=r.seed, masks=masks)
    state = state_lib.place(state, self.mesh, shard_params=self.config.parallel.shard_params)
    targets = np.full(steps, self.pruner.schedule.final)
    offset = self.config.train.steps
    return Phase("rethink", offset, steps, tx, lr, targets, graphdef, state)

  def prune_channels(self, phase: Phase, state: TrainState) -> TrainState:
    """Chooses the channels of a channel method and sets their masks into ``state``."""
    config = self.config
    host = sharding_lib.to_host(state)
    model = nnx.merge(phase.graphdef, host.params, host.rest)
    validation = structured.validation_split(config, self.ds.train)
    eval_fn = step_lib.make_eval_step(phase.graphdef)

    def evaluate(params):
      masked = state._replace(params=params, rest=host.rest)
      return step_lib.evaluate(eval_fn, masked, validation, config.data.eval_batch_size)

    chosen = structured.prune_channels(
      config, model, validation, evaluate, example_input=self.ds.test.take(np.arange(1))[0]
    )
    if chosen.sensitivity is not None:
      progress.write(str(chosen.sensitivity))
      if self.workdir is not None and self.primary:
        chosen.sensitivity.to_csv(self.workdir / "sensitivity.csv")
        plot_sensitivity(chosen.sensitivity, self.workdir / "sensitivity.png")
    progress.write(chosen.report())
    masks = chosen.masks
    opt_state = jaxprune.set_masks(host.opt_state, masks)
    new = host._replace(params=jaxprune.apply_mask(host.params, masks), opt_state=opt_state)
    return jax.device_put(new, jax.tree.map(lambda x: x.sharding, state))

  def summary(self, params: Any) -> jaxprune.Summary:
    return step_lib.sparsity_summary(self.pruner, params)

  # --- running ------------------------------------------------------------------------

  def _meta(self, phase: Phase, done: int, history: list, extra: dict) -> dict[str, Any]:
    epoch, batch = divmod(done, self.per_epoch)
    position = {"seed": self.config.train.seed, "epoch": epoch, "batch": batch}
    return {
      "phase": phase.name,
      "step": done,
      "global_step": phase.offset + done,
      "data_position": {**position, "batch_size": self.config.data.batch_size},
      "history": history,
      "config": config_json(self.config),
      **extra,
    }

  def run_phase(self, phase: Phase, state: TrainState, history: list, extra: dict) -> TrainState:
    """Trains ``state`` from its step to ``phase.steps``; appends records to ``history``.

    ``extra`` is what checkpoints carry besides the state and the history: the dense
    accuracy and its step (recorded here by the train phase) and, from a checkpoint,
    the ``window`` of steps whose mean loss is not logged yet.
    """
    config, t = self.config, self.config.train
    measured = step_lib.measured_paths(self.pruner, state.params)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(
      step_lib.make_train_step(
        phase.graphdef, phase.tx, augment=config.data.augment, measured=measured
      ),
      out_shardings=(shardings, sharding_lib.replicated(self.mesh)),
    )
    eval_fn = step_lib.make_eval_step(phase.graphdef)
    start = int(state.step)
    batches = data.stream(
      self.ds.train,
      config.data.batch_size,
      seed=t.seed,
      start_step=start,
      process=sharding_lib.process(),
    )
    batch_sharding = sharding_lib.batch_sharding(self.mesh)
    if phase.prune_at is not None:
      dense_step = phase.prune_at
    elif phase.targets.any():
      dense_step = int(np.argmax(phase.targets > 0))
    else:
      dense_step = phase.steps
    accuracies = [r["test_accuracy"] for r in history if r.get("test_accuracy") is not None]
    acc = accuracies[-1] if accuracies else None
    perplexities = [r["test_perplexity"] for r in history if r.get("test_perplexity")]
    ppl = perplexities[-1] if perplexities else None
    # The steps since the last log (their mean is logged), carried across a resume.
    window = [{k: jnp.float32(v) for k, v in m.items()} for m in extra.pop("window", [])]
    desc = f"{config.model.name} on {self.ds.name}" + (
      " (from scratch)" if phase.name == "rethink" else ""
    )
    with progress.bar(
      total=phase.steps, initial=start, desc=desc, unit="step", disable=not t.progress
    ) as bar:
      for step in range(start, phase.steps):
        if step == phase.prune_at:
          state = self.prune_channels(phase, state)
        images, labels = sharding_lib.global_batch(next(batches), batch_sharding)
        state, metrics = step_fn(state, images, labels)
        window.append(metrics)
        done = step + 1
        common = {
          "phase": phase.name,
          "step": done,
          "global_step": phase.offset + done,
          "epoch": round(done / self.per_epoch, 4),
        }
        records = []
        if done % t.log_every == 0 or done == phase.steps:
          means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
          window = []
          records.append({
            **common,
            "loss": float(means["loss"]),
            "train_accuracy": float(means["accuracy"]),
            "sparsity": float(metrics["sparsity"]),
            "target_sparsity": float(phase.targets[step]),
            "learning_rate": float(np.asarray(phase.learning_rate(step))),
          })  # fmt: skip
          bar.set_postfix(
            {
              "loss": f"{records[-1]['loss']:.4f}",
              "acc": f"{records[-1]['train_accuracy']:.2%}",
              **({} if acc is None else {"test": f"{acc:.2%}"}),
              **({"ppl": f"{ppl:.3f}"} if ppl is not None else {}),
              "sparsity": f"{records[-1]['sparsity']:.0%}",
            },
            refresh=False,
          )
        is_dense_eval = phase.name == "train" and 0 < done == dense_step < phase.steps
        if done % t.eval_every == 0 or done == phase.steps or is_dense_eval:
          got = step_lib.scores(
            eval_fn, state.params, state.rest, self.ds.test, config.data.eval_batch_size,
            self.mesh,
          )  # fmt: skip
          acc = got["accuracy"]
          sparsity = float(step_lib.zero_fraction(state.params, paths=measured))
          records.append({**common, "test_accuracy": acc, "sparsity": sparsity})
          if self.language_model:  # validation perplexity: exp(mean token cross-entropy)
            records[-1].update(test_loss=got["loss"], test_perplexity=math.exp(got["loss"]))
            ppl = records[-1]["test_perplexity"]
          if is_dense_eval:
            extra.update(dense_accuracy=acc, dense_step=done)
        for record in records:
          history.append(record)
          if self.writer is not None:
            self.writer.write(record)
        global_step = phase.offset + done
        if self.ckpt is not None and (self.ckpt.due(global_step) or done == phase.steps):
          if self.writer is not None:
            self.writer.flush()
          pending = [{k: float(v) for k, v in m.items()} for m in jax.device_get(window)]
          meta = self._meta(phase, done, history, {**extra, "window": pending})
          self.ckpt.save(global_step, state, meta, force=done == phase.steps)
        bar.update()
    if phase.name == "train" and "dense_step" not in extra:
      extra.update(dense_accuracy=acc if dense_step == phase.steps else None, dense_step=dense_step)
    return state

  def _resume(self, phase: Phase) -> tuple[TrainState, dict[str, Any]] | None:
    if self.ckpt is None or self.ckpt.latest() is None:
      return None
    template = phase.initial
    state, meta = self.ckpt.restore(template)
    now = config_json(self.config)
    for field in RUN_IDENTITY:
      if _field(meta["config"], field) != _field(now, field):
        raise config_lib.ConfigError(
          f"{field}: checkpoint.dir {self.ckpt.directory} holds a run with {field} = "
          f"{_field(meta['config'], field)!r}, not {_field(now, field)!r}; use another "
          "checkpoint.dir (or train.workdir), or the config of that run."
        )
    return state, meta

  def execute(self) -> TrainResult:
    """Trains (or resumes, or just reports a finished run) and writes the outputs."""
    main = self.train_phase()
    self.ckpt = state_lib.checkpointer(self.config)
    try:  # the checkpointer is closed on every way out (its threads outlive a failure)
      resumed = self._resume(main)
      resumed_from = None if resumed is None else resumed[1]["global_step"]
      if self.workdir is not None and self.primary:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fileio.write_json(self.workdir / "config.json", config_json(self.config), indent=2)
        self.writer = metrics_lib.MetricsWriter(self.workdir, resume_step=resumed_from)
      result = self._execute(main, resumed, resumed_from)
    finally:
      if self.writer is not None:
        self.writer.close()
      if self.ckpt is not None:
        self.ckpt.close()
    if self.workdir is not None:
      # A rerun of a finished run trains nothing: keep the outputs of the run that did.
      done = resumed_from == self.config.train.steps + self.rethink_steps
      if not (done and (self.workdir / "summary.json").is_file()):
        self._write_outputs(self.workdir, result)
    return result

  def _execute(self, main: Phase, resumed: Any, resumed_from: int | None) -> TrainResult:
    state, rethink_state, history, r_history = main.initial, None, [], []
    r_extra: dict[str, Any] = {}
    if resumed is not None and resumed[1]["phase"] == "rethink":
      if self.ckpt is None:  # resumed states come from self.ckpt
        raise RuntimeError("resuming the rethink phase needs the run's checkpoints.")
      rethink_state, r_history = resumed[0], resumed[1]["history"]
      r_extra = {"window": resumed[1].get("window", [])}
      resumed = self.ckpt.restore(main.initial, step=main.steps)  # the end of phase 1
    extra: dict[str, Any] = {}
    if resumed is not None:
      state, meta = resumed
      history = meta["history"]
      extra = {k: meta[k] for k in ("dense_accuracy", "dense_step", "window") if k in meta}
    state = self.run_phase(main, state, history, extra)
    rethink = None
    if self.rethink_steps:
      phase = self.rethink_phase(jaxprune.masks_of(state.opt_state))
      r_state = phase.initial if rethink_state is None else rethink_state
      r_state = self.run_phase(phase, r_state, r_history, r_extra)
      rethink = PhaseResult(
        "rethink", _last_accuracy(r_history), self.summary(r_state.params), r_state,
        tuple(r_history),
      )  # fmt: skip
    return TrainResult(
      dense_accuracy=extra.get("dense_accuracy"),
      dense_step=extra["dense_step"],
      final_accuracy=_last_accuracy(history),
      summary=self.summary(state.params),
      state=state,
      graphdef=main.graphdef,
      history=tuple(history),
      seconds=time.perf_counter() - self.started,
      rethink=rethink,
      resumed_from=resumed_from,
      regularized=self.config.regularize.method != "none",
    )

  def _write_outputs(self, workdir: pathlib.Path, result: TrainResult) -> None:
    """``params.npz`` (and ``params_rethink.npz``), ``summary.json``, ``report.md``.

    Every process gathers the arrays (a collective); process 0 writes.
    """
    phases = [("params.npz", result.state)]
    if result.rethink is not None:
      phases.append(("params_rethink.npz", result.rethink.state))
    for name, state in phases:
      arrays = sharding_lib.flat_arrays({"params": state.params, "rest": state.rest})
      if self.primary:
        fileio.savez(workdir / name, arrays)
    if self.primary:
      report.write_summary(workdir, self.config, result)
      report.write_report(workdir)
