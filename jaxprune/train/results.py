"""What a run produced: :class:`TrainResult`, and :class:`PhaseResult` per extra phase."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

import jaxprune
from jaxprune.train.step import TrainState


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  """The outcome of one phase of a run (``"train"`` or ``"rethink"``).

  Attributes:
    name: the phase.
    final_accuracy: test accuracy after its last step.
    summary: :func:`jaxprune.summary` of its final params over the pruned params.
    state: its final :class:`TrainState`.
    history: its metric records (see :mod:`jaxprune.train.metrics`), in order.
  """

  name: str
  final_accuracy: float
  summary: jaxprune.Summary
  state: TrainState
  history: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a run produced.

  Attributes:
    dense_accuracy: test accuracy just before the first pruning step (``None`` when
      pruning starts at step 0); the final accuracy when nothing is pruned.
    dense_step: the step at which ``dense_accuracy`` was measured.
    final_accuracy: test accuracy after the last step (the fine-tuned model).
    summary: :func:`jaxprune.summary` of the pruned params (all kernels when unpruned).
    state: the final :class:`TrainState`.
    graphdef: rebuilds the model with ``state`` (see :meth:`model`).
    history: metric records of the main phase: ``{"phase", "step", "global_step",
      "epoch", ...}`` with ``loss`` / ``train_accuracy`` / ``learning_rate`` every
      ``log_every`` steps and ``test_accuracy`` at evaluations (see
      :mod:`jaxprune.train.metrics`).
    seconds: wall time of this invocation, compilation included.
    rethink: the from-scratch run of the pruned architecture (``rethink.enabled``).
    resumed_from: the global step of the checkpoint this invocation resumed from.
    regularized: whether a sparsity regularizer (``config.regularize``) trained the
      model before pruning, so the "dense" accuracy is that of the regularized model.
  """

  dense_accuracy: float | None
  dense_step: int
  final_accuracy: float
  summary: jaxprune.Summary
  state: TrainState
  graphdef: nnx.GraphDef
  history: tuple[dict[str, Any], ...]
  seconds: float
  rethink: PhaseResult | None = None
  resumed_from: int | None = None
  regularized: bool = False

  def model(self) -> nnx.Module:
    """The trained model as an ``nnx.Module`` (in eval mode)."""
    model = nnx.merge(self.graphdef, jax.device_get(self.state.params), self.state.rest)
    model.eval()
    return model

  def report(self) -> str:
    """Dense and final accuracy, the sparsity table and the time, as the CLI prints them."""
    dense = (
      "n/a (pruned from step 0)"
      if self.dense_accuracy is None
      else f"{self.dense_accuracy:.2%} (step {self.dense_step})"
    )
    if self.regularized and self.dense_accuracy is not None:
      dense += ", trained with the sparsity regularizer"
    lines = [f"dense accuracy: {dense}", f"final accuracy: {self.final_accuracy:.2%}"]
    perplexities = [r["test_perplexity"] for r in self.history if r.get("test_perplexity")]
    if perplexities:  # a language model: its token accuracy above, and this
      lines.append(f"validation perplexity: {perplexities[-1]:.3f}")
    if self.rethink is not None:
      lines.append(
        f"from scratch (rethinking, same masks, re-initialised): {self.rethink.final_accuracy:.2%}"
      )
    if self.resumed_from is not None:
      lines.append(f"resumed from checkpoint step {self.resumed_from}")
    return "\n".join([*lines, str(self.summary), f"time: {self.seconds:.1f} s"])
