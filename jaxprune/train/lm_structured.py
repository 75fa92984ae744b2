"""``jaxprune prune`` with ``posttrain.method`` ``flap`` or ``taylor``: a smaller language model.

Structured pruning of a trained :class:`jaxprune.models.decoder.Decoder`, end to end:

1. restore the run's checkpoint (as ``jaxprune prune`` does) and trace it
   (:func:`jaxprune.surgery.plan`): attention heads and MLP neurons as coupled groups;
2. score them from ``posttrain.calibration`` training sequences: ``flap``
   (:func:`jaxprune.surgery.scores.flap_scores`, ``Var(X_j) * ||W[j, :]||^2``
   standardised per group; the removed inputs' mean folded into the readers' biases
   where a reader has one: the CharLM's projections have none) or ``taylor``
   (:func:`jaxprune.surgery.scores.taylor_scores`, ``|w * g|`` of the next-character
   loss);
3. remove ``posttrain.heads`` of the query heads (the same number from every KV group of
   a block, so the query/KV ratio stays integral; the KV heads stay) and
   ``posttrain.neurons`` of the MLP neurons, each ranked over all blocks at once
   (FLAP's global ranking: blocks that matter less lose more);
4. cut them out (:func:`jaxprune.surgery.shrink`, checked against the masked model):
   an ordinary ``CharLM`` with per-block head counts and MLP widths;
5. fine-tune the smaller model for ``posttrain.finetune_steps`` Adam steps;
6. report validation perplexity dense / pruned / pruned + fine-tuned, params, FLOPs per
   token (XLA's cost analysis) and CPU latency per token (jitted, batch 1 and 32, the
   dense and the small model timed side by side in interleaved rounds, median of the
   per-round ratios), against the target: a latency speed-up of at least 0.8 of the
   FLOP reduction.

Writes ``structured.md``, ``structured.json`` (numbers and per-block widths) and
``shrunk.npz`` (the fine-tuned smaller model's params) into ``posttrain.out`` (default
``<train.workdir>/<method>_structured``).

Examples:
  >>> from jaxprune.train import lm_structured
  >>> lm_structured.METHODS, lm_structured.TARGET
  (('flap', 'taylor'), 0.8)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import fileio, surgery
from jaxprune import tree as tree_lib
from jaxprune.models.decoder import CharLM
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors
from jaxprune.train import prune as prune_lib
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib
from jaxprune.train.config_type import Config

METHODS = ("flap", "taylor")
TARGET = 0.8  # latency speed-up >= TARGET * FLOP reduction
BATCHES = (1, 32)
REPORT_NAME, JSON_NAME, NPZ_NAME = "structured.md", "structured.json", "shrunk.npz"


@dataclasses.dataclass(frozen=True)
class Latency:
  """Seconds per token of the dense and the small model at one batch size.

  Attributes:
    batch: sequences per call (each ``data.seq_len`` tokens).
    dense: median seconds per token of the dense model.
    small: the same for the smaller model.
    speedup: median over rounds of ``dense / small`` (both timed in the same round).
  """

  batch: int
  dense: float
  small: float
  speedup: float


@dataclasses.dataclass(frozen=True)
class StructuredResult:
  """What the structured recipe did and measured.

  Attributes:
    method: ``flap`` or ``taylor``.
    heads: ``(dense, kept)`` query heads per block.
    kv_heads: KV heads per block (unchanged).
    neurons: ``(dense, kept)`` MLP neurons per block.
    perplexity: validation perplexity ``{"dense", "pruned", "finetuned"}``.
    params: ``{"dense", "small"}`` parameter counts.
    flops: ``{"dense", "small"}`` FLOPs per token (batch 1, a full sequence).
    latency: one :class:`Latency` per batch size.
    max_error: the shrink check's largest difference to the masked model (relative).
    out: the directory written (``None``: nothing saved).
    seconds: the whole recipe's time.
  """

  method: str
  heads: list[tuple[int, int]]
  kv_heads: list[int]
  neurons: list[tuple[int, int]]
  perplexity: dict[str, float]
  params: dict[str, int]
  flops: dict[str, float]
  latency: list[Latency]
  max_error: float | None
  out: pathlib.Path | None
  seconds: float

  @property
  def flop_reduction(self) -> float:
    return self.flops["dense"] / self.flops["small"]

  def met(self, latency: Latency) -> bool:
    """Whether the latency speed-up is at least :data:`TARGET` of the FLOP reduction."""
    return latency.speedup >= TARGET * self.flop_reduction

  def table(self) -> str:
    """Dense and small side by side: perplexities, params, FLOPs, latencies."""
    ppl = self.perplexity
    heads = lambda i: ", ".join(str(h[i]) for h in self.heads)  # noqa: E731
    neurons = lambda i: ", ".join(str(n[i]) for n in self.neurons)  # noqa: E731
    rows = [
      "| | dense | pruned | pruned + fine-tuned |",
      "|---|---|---|---|",
      f"| val. perplexity | {ppl['dense']:.3f} | {ppl['pruned']:.3f} | {ppl['finetuned']:.3f} |",
      "",
      "| | dense | smaller | ratio |",
      "|---|---|---|---|",
      f"| query heads per block | {heads(0)} | {heads(1)} | |",
      f"| KV heads per block | {', '.join(map(str, self.kv_heads))} | (kept) | |",
      f"| MLP neurons per block | {neurons(0)} | {neurons(1)} | |",
      f"| params | {self.params['dense']:,} | {self.params['small']:,} | "
      f"{self.params['dense'] / self.params['small']:.2f}x |",
      f"| FLOPs per token | {self.flops['dense'] / 1e6:.3f} M | {self.flops['small'] / 1e6:.3f} M "
      f"| {self.flop_reduction:.2f}x |",
    ]
    for lat in self.latency:
      rows.append(
        f"| CPU latency per token, batch {lat.batch} | {lat.dense * 1e6:.2f} us | "
        f"{lat.small * 1e6:.2f} us | **{lat.speedup:.2f}x** |"
      )
    return "\n".join(rows)

  def verdicts(self) -> str:
    """One line per batch size: the speed-up against the FLOP reduction."""
    return "\n".join(
      f"batch {lat.batch}: speed-up {lat.speedup:.2f}x / FLOP reduction "
      f"{self.flop_reduction:.2f}x = {lat.speedup / self.flop_reduction:.2f} "
      f"(target >= {TARGET}): {'met' if self.met(lat) else 'MISSED'}"
      for lat in self.latency
    )

  def report(self) -> str:
    """The tables, the verdicts and where the outputs went, as the CLI prints them."""
    removed_heads = sum(d - k for d, k in self.heads)
    removed_neurons = sum(d - k for d, k in self.neurons)
    lines = [
      f"{self.method}: removed {removed_heads} of {sum(d for d, _ in self.heads)} query heads "
      f"(the same number from every KV group of a block) and {removed_neurons} of "
      f"{sum(d for d, _ in self.neurons)} MLP neurons, ranked over all blocks",
      "",
      self.table(),
      "",
      self.verdicts(),
      f"shrunk == masked: largest difference {self.max_error:.2e} (relative)"
      if self.max_error is not None
      else "shrunk == masked: not checked",
      f"time: {self.seconds:.1f} s",
    ]
    if self.out is not None:
      lines.append(f"{REPORT_NAME}, {JSON_NAME} and {NPZ_NAME} in {self.out}")
    return "\n".join(lines)

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["out"] = None if self.out is None else str(self.out)
    out["flop_reduction"] = self.flop_reduction
    return out


def check(config: Config) -> None:
  """The fields this recipe needs, before any data is loaded.

  Raises:
    ConfigError: naming the field: ``model.name`` not ``charlm``, ``posttrain.method``
      not structured, no heads or neurons to remove.
  """
  config_lib.validate_config(config)
  if config.model.name != "charlm":
    raise config_lib.ConfigError(
      f"model.name: posttrain.method={config.posttrain.method!r} prunes the heads and MLP "
      f"neurons of charlm, got {config.model.name!r}."
    )
  if config.posttrain.method not in METHODS:
    raise config_lib.ConfigError(
      f"posttrain.method: {config.posttrain.method!r} is not structured ({', '.join(METHODS)})."
    )


def output_dir(config: Config) -> pathlib.Path | None:
  """``posttrain.out``, else ``<train.workdir>/<method>_structured``, else ``None``."""
  return prune_lib.posttrain_out(config, f"{config.posttrain.method}_structured")


def channel_scores(
  method: str, model: nnx.Module, plan: surgery.Plan, batches: list[np.ndarray]
) -> tuple[dict[str, np.ndarray], Any]:
  """``(scores, stats)``: FLAP or Taylor scores of every group from calibration inputs.

  ``stats`` are the input moments for FLAP's bias compensation (``None`` for Taylor).
  Taylor's loss predicts each calibration sequence's next characters from the ones
  before.
  """
  params = nnx.state(model, nnx.Param)
  if method == "flap":
    stats = surgery.scores.input_moments(model, batches)
    return surgery.scores.flap_scores(plan, params, stats), stats
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grad(params, tokens):
    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      return step_lib.cross_entropy(logits, tokens[:, 1:])

    return jax.grad(loss)(params)

  total = None
  for tokens in batches:
    g = grad(params, jnp.asarray(tokens))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return surgery.scores.taylor_scores(plan, params, total), None


def _forward(model: nnx.Module) -> tuple[Callable, Any]:
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  return forward, state


def flops_per_token(model: nnx.Module, seq_len: int) -> float:
  """XLA's FLOPs of one jitted forward pass over a ``(1, seq_len)`` batch, per token."""
  forward, state = _forward(model)
  cost = forward.lower(state, jnp.zeros((1, seq_len), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost["flops"]) / seq_len


def latency(models: dict[str, nnx.Module], batch: int, seq_len: int, rounds: int) -> Latency:
  """Seconds per token of ``models["dense"]`` and ``models["small"]``, timed interleaved.

  Each round times both (the order alternating), each over enough calls to last about
  20 ms; the speed-up is the median of the per-round ratios, robust to load that
  drifts between rounds on a shared machine.
  """
  tokens = jnp.asarray(np.random.default_rng(batch).integers(0, 2, (batch, seq_len)), jnp.int32)
  calls = {}
  for name, model in models.items():
    forward, state = _forward(model)
    jax.block_until_ready(forward(state, tokens))  # compile
    calls[name] = lambda f=forward, s=state: jax.block_until_ready(f(s, tokens))
  start = time.perf_counter()
  calls["dense"]()
  reps = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
  times: dict[str, list[float]] = {name: [] for name in calls}
  names = list(calls)
  for r in range(rounds):
    for name in names[r % 2 :] + names[: r % 2]:
      start = time.perf_counter()
      for _ in range(reps):
        calls[name]()
      times[name].append((time.perf_counter() - start) / reps / (batch * seq_len))
  ratio = statistics.median(d / s for d, s in zip(times["dense"], times["small"]))
  return Latency(batch, statistics.median(times["dense"]), statistics.median(times["small"]), ratio)


def finetune(config: Config, model: nnx.Module, train: data.Source) -> nnx.Module:
  """``posttrain.finetune_steps`` Adam steps (cosine-decayed learning rate) of ``model``."""
  steps = config.posttrain.finetune_steps
  if steps == 0:
    return model
  lr = optax.cosine_decay_schedule(config.posttrain.finetune_learning_rate, steps)
  tx = optax.adam(lr)
  graphdef, state = step_lib.init_state(model, tx, seed=config.train.seed)
  train_step = jax.jit(step_lib.make_train_step(graphdef, tx), donate_argnums=0)
  stream = data.stream(train, config.data.batch_size, seed=config.train.seed + 1)
  for _ in range(steps):
    tokens, labels = next(stream)
    state, _ = train_step(state, tokens, labels)
  return nnx.merge(graphdef, state.params, state.rest)


def _perplexity(model: nnx.Module, split: data.Source, batch_size: int) -> float:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  scores = step_lib.scores(step_lib.make_eval_step(graphdef), params, rest, split, batch_size)
  return math.exp(scores["loss"])


def _n_params(model: nnx.Module) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _widths(model: nnx.Module) -> tuple[list[int], list[int], list[int]]:
  if not isinstance(model, CharLM):
    raise TypeError(f"structured LM pruning takes a CharLM, got {type(model).__name__}.")
  blocks = list(model.blocks)
  return (
    [b.attn.num_heads for b in blocks],
    [b.attn.num_kv_heads for b in blocks],
    [b.mlp.up_proj.out_features for b in blocks],
  )


def prune_structured(
  config: Config, *, step: int | None = None, dataset: data.Dataset | None = None
) -> StructuredResult:
  """Restores, scores, removes heads and neurons, shrinks, fine-tunes, measures, saves.

  Args:
    config: the run's config with ``posttrain.method`` ``flap`` or ``taylor``.
    step: the checkpoint's step (default: the newest).
    dataset: the data (default: ``config.data``).

  Raises:
    ConfigError: a bad field (:func:`check`) or no checkpoint directory, before any
      data is loaded.
    FileNotFoundError: no checkpoint there.
  """
  check(config)
  errors.check_out_dir(output_dir(config), "posttrain.out")
  state_lib.require_checkpoints(config, "prune", step)
  started = time.perf_counter()
  p = config.posttrain
  ds = dataset or data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, step=step, purpose="prune")
  host = sharding_lib.to_host(restored.state)
  model = nnx.merge(restored.graphdef, host.params, host.rest)
  model.eval()
  seq_len, batch = config.data.seq_len, config.data.eval_batch_size
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  plan = surgery.plan(model, example_input=tokens)
  params = nnx.state(model, nnx.Param)
  dense_perplexity = _perplexity(model, ds.test, batch)
  calibration = prune_lib.calibration_batches(config, ds.train)
  scores, stats = channel_scores(p.method, model, plan, calibration)
  ratios = {k: v for k, v in (("heads", p.heads), ("neurons", p.neurons)) if v > 0}
  remove = surgery.pruned_channels(plan, params, ratios, scores=scores, scope="global")
  remove = {name: chans for name, chans in remove.items() if chans}
  if stats is not None:
    compensated = surgery.scores.flap_compensate(plan, params, stats, remove)
    nnx.update(model, compensated)
    params = nnx.state(model, nnx.Param)
  # Every array of a removed channel is masked: a query head whose q columns alone were
  # zero would still average v, so its rows of o_proj go too.
  masks = surgery.group_masks(plan, params, remove)
  small = surgery.shrink(model, masks=masks, example_input=tokens)
  pruned_model = small.model
  perplexity = {
    "dense": dense_perplexity,
    "pruned": _perplexity(pruned_model, ds.test, batch),
  }
  tuned = finetune(config, pruned_model, ds.train)
  tuned.eval()
  perplexity["finetuned"] = _perplexity(tuned, ds.test, batch)
  dense_heads, kv_heads, dense_mlp = _widths(model)
  small_heads, _, small_mlp = _widths(tuned)
  pair = {"dense": model, "small": tuned}
  result = StructuredResult(
    p.method,
    list(zip(dense_heads, small_heads)),
    kv_heads,
    list(zip(dense_mlp, small_mlp)),
    perplexity,
    {k: _n_params(m) for k, m in pair.items()},
    {k: flops_per_token(m, seq_len) for k, m in pair.items()},
    [latency(pair, b, seq_len, p.latency_rounds) for b in BATCHES],
    small.max_error,
    output_dir(config),
    0.0,
  )
  result = dataclasses.replace(result, seconds=time.perf_counter() - started)
  if result.out is not None and jax.process_index() == 0:
    _save(config, result, tuned)
  return result


def _save(config: Config, result: StructuredResult, model: nnx.Module) -> None:
  out = result.out
  assert out is not None
  out.mkdir(parents=True, exist_ok=True)
  params = nnx.state(model, nnx.Param)
  arrays = {p: np.asarray(x) for p, x in tree_lib.leaves_with_paths(params)}
  fileio.savez(out / NPZ_NAME, arrays)
  numbers = {**result.as_dict(), "config": config_lib.config_json(config)}
  fileio.write_json(out / JSON_NAME, numbers, indent=2, default=str)
  title = f"# Structured pruning of charlm: {result.method}"
  fileio.write_text(out / REPORT_NAME, f"{title}\n\n{result.report()}\n")
