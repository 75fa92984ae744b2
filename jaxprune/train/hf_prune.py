"""``jaxprune prune --checkpoint DIR``: one-shot pruning of a Hugging Face checkpoint.

  jaxprune prune --checkpoint llama-dir --text wiki.txt --method wanda --sparsity 0.5 --out pruned
  jaxprune prune --checkpoint llama-dir --text wiki.txt --method sparsegpt --structure 2:4 --out pruned
  jaxprune prune --config configs/hf_prune.py --config.method=sparsegpt --config.out=pruned

The checkpoint (:func:`jaxprune.models.hf.load_hf`: Llama, Mistral, Qwen2, Qwen3) is read
in ``--dtype``; the text is tokenised with the checkpoint's ``tokenizer.json`` (the
``tokenizers`` package). The last ``--eval-fraction`` of its tokens (or ``--eval-text``)
is held out: windows of ``--seq-len`` tokens give the perplexity before and after.
``--calibration`` windows at random offsets in the rest calibrate the layers. The
projections inside the blocks (``--layers``; embeddings and head stay dense, as in the
papers) are pruned block by block with :func:`jaxprune.posttrain.prune` (``wanda``,
``sparsegpt``; each block calibrated on the outputs of the blocks already pruned) or by
``magnitude``, with a progress line per block. The pruned model is written to ``--out``
in the checkpoint's own format (:func:`jaxprune.models.hf.save_hf`: same tensor names,
shapes, dtypes and config).

The config form: a file whose ``get_config()`` returns :func:`default_config` with its
fields set, one per option, named as the flags with ``_`` for ``-`` (``checkpoint``,
``text``, ``method``, ``sparsity`` or ``structure``, ``out``, ``seq_len``, ...).
:func:`config_arguments` turns it, after ``--config.FIELD=VALUE`` overrides, into the
flag form's arguments, which the command parses and checks as if they were typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import jaxprune
from jaxprune import posttrain
from jaxprune import tree as tree_lib
from jaxprune._extras import require
from jaxprune.models.decoder import Decoder
from jaxprune.structures import NM

METHODS = ("magnitude", "wanda", "sparsegpt")
LAYERS = r"^blocks/\d+/"  # every projection kernel inside the blocks


def add_arguments(command: argparse.ArgumentParser) -> None:
  """The ``--checkpoint`` form's options of ``jaxprune prune`` (``--checkpoint`` itself excluded)."""
  group = command.add_argument_group("pruning a Hugging Face checkpoint (--checkpoint DIR)")
  group.add_argument("--text", metavar="FILE", help="text to calibrate on and hold out from")
  group.add_argument(
    "--eval-text", metavar="FILE", help="held-out text (default: the end of --text)"
  )
  group.add_argument("--method", choices=METHODS, default="wanda")
  target = group.add_mutually_exclusive_group()
  target.add_argument("--sparsity", type=float, help="fraction of weights removed (default 0.5)")
  target.add_argument("--structure", metavar="N:M", help="N:M sparsity along each layer's inputs")
  group.add_argument("--out", metavar="DIR", help="where to write the pruned checkpoint")
  group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  group.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  group.add_argument(
    "--calibration", type=int, default=128, help="calibration windows (default 128)"
  )
  group.add_argument(
    "--eval-fraction", type=float, default=0.1, help="held-out share of --text (default 0.1)"
  )
  group.add_argument(
    "--layers", default=LAYERS, metavar="REGEX", help=f"kernels to prune ({LAYERS})"
  )
  group.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
  group.add_argument("--seed", type=int, default=0, help="picks the calibration windows")
  group.add_argument(
    "--devices",
    type=int,
    default=1,
    help="split the weights and each calibration batch over this many local devices "
    "(default 1; 0: all of them)",
  )


def option_defaults() -> dict[str, Any]:
  """``{dest: default}`` of the ``--checkpoint`` form's options (:func:`add_arguments`)."""
  parser = argparse.ArgumentParser(add_help=False)
  add_arguments(parser)
  return {a.dest: a.default for a in parser._actions}


def default_config() -> ml_collections.ConfigDict:
  """The config form's fields: ``checkpoint`` and every option of the flag form, at its default.

  ``None`` is an option not given (``text``, ``out``, ``eval_text``, ``sparsity``, ``structure``).

  Examples:
    >>> from jaxprune.train import hf_prune
    >>> config = hf_prune.default_config()
    >>> config.method, config.seq_len, config.structure
    ('wanda', 128, None)
  """
  return ml_collections.ConfigDict({"checkpoint": None, **option_defaults()})


def is_config(config: ml_collections.ConfigDict) -> bool:
  """Whether a config is the config form of ``--checkpoint`` (its ``checkpoint`` is a path,
  not the training configs' group of fields)."""
  return "checkpoint" in config and not isinstance(config["checkpoint"], ml_collections.ConfigDict)


def config_arguments(config: ml_collections.ConfigDict) -> list[str]:
  """The flag form's arguments that say what ``config`` says (``None`` fields left out).

  Raises:
    ValueError: a field that is no option of the command (naming it and the known ones),
      a group of fields, or no ``checkpoint``.

  Examples:
    >>> from jaxprune.train import hf_prune
    >>> config = hf_prune.default_config()
    >>> config.update(checkpoint="llama", text="wiki.txt", out="pruned", structure="2:4")
    >>> argv = hf_prune.config_arguments(config)  # fields in sorted order
    >>> argv[:4], argv[argv.index("--structure") :][:2]
    (['--batch-size', '8', '--calibration', '128'], ['--structure', '2:4'])
  """
  known = ["checkpoint", *option_defaults()]
  argv = []
  for name, value in config.items():
    if name not in known:
      raise ValueError(f"config.{name}: not an option of jaxprune prune --checkpoint; known: "
                       f"{', '.join(known)}.")  # fmt: skip
    if isinstance(value, ml_collections.ConfigDict):
      raise ValueError(f"config.{name}: a value is needed, not a group of fields.")
    if value is not None:
      argv += [f"--{name.replace('_', '-')}", str(value)]
  if config.get("checkpoint") is None:
    raise ValueError("config.checkpoint: no Hugging Face checkpoint directory given.")
  return argv


def check_arguments(args: argparse.Namespace) -> str | None:
  """The first problem with the ``--checkpoint`` form's options, as a message, or ``None``."""
  if not args.text or not args.out:
    return "--checkpoint needs --text FILE and --out DIR"
  if args.sparsity is not None and not 0 <= args.sparsity < 1:
    return f"--sparsity must be in [0, 1), got {args.sparsity}"
  if args.structure is not None and not re.fullmatch(r"\d+:\d+", args.structure):
    return f"--structure must be N:M (e.g. 2:4), got {args.structure!r}"
  if args.structure is not None:
    n, m = (int(x) for x in args.structure.split(":"))
    if not 0 < n < m:
      return f"--structure N:M needs 0 < N < M, got {args.structure!r}"
  for name in ("seq_len", "calibration", "batch_size"):
    if getattr(args, name) < 1:
      return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
  if args.devices < 0:
    return f"--devices must be >= 0 (0: all local devices), got {args.devices}"
  if not 0 < args.eval_fraction < 1 and args.eval_text is None:
    return f"--eval-fraction must be in (0, 1), got {args.eval_fraction}"
  try:
    re.compile(args.layers)
  except re.error as e:
    return f"--layers {args.layers!r} is not a regular expression ({e})"
  return None


def device_mesh(devices: int, batch_size: int, calibration: int) -> Mesh | None:
  """The ``("data",)`` mesh of ``--devices`` local devices (``0``: all), ``None`` for one.

  Over a mesh, :func:`jaxprune.posttrain.prune` splits each weight along its first output
  axis that divides (the others stay whole, with a warning) and each calibration batch
  along its rows: every batch must split evenly.

  Raises:
    ValueError: more devices than there are, or a batch (``--batch-size``, or the last,
      ``--calibration`` modulo ``--batch-size``) whose rows do not divide by the count.
  """
  local = jax.local_devices()
  n = len(local) if devices == 0 else devices
  if n > len(local):
    raise ValueError(
      f"--devices {devices}: this process sees {len(local)} local device(s) "
      f"({local[0].platform}); on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} "
      "set before jax starts simulates that many."
    )
  if n == 1:
    return None
  last = calibration % batch_size
  for name, rows in (("--batch-size", batch_size), ("the last batch", last)):
    if rows % n:
      raise ValueError(
        f"--devices {n} splits each calibration batch's rows, but {name} has {rows} "
        f"(--calibration {calibration}, --batch-size {batch_size}); use multiples of {n}."
      )
  return Mesh(np.array(local[:n]), ("data",))


def tokenize(checkpoint: pathlib.Path, path: str | pathlib.Path, vocab_size: int) -> np.ndarray:
  """The token ids of a text file under the checkpoint's ``tokenizer.json``.

  Raises:
    FileNotFoundError: no ``tokenizer.json`` or no text file.
    ValueError: an id outside the model's vocabulary.
  """
  require("tokenizers", extra="llm", by="jaxprune prune --checkpoint")
  from tokenizers import Tokenizer

  file = checkpoint / "tokenizer.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no such file; --checkpoint needs the tokenizer.json there.")
  text = pathlib.Path(path).read_text()
  ids = np.asarray(Tokenizer.from_file(str(file)).encode(text).ids, np.int32)
  if ids.size and ids.max() >= vocab_size:
    raise ValueError(
      f"{file} gives token id {int(ids.max())}, but the model's vocab_size is {vocab_size}."
    )
  return ids


def windows(ids: np.ndarray, length: int) -> np.ndarray:
  """Consecutive non-overlapping windows ``(n, length)`` (one shorter window if ``ids`` is short)."""
  if ids.size < 2:
    raise ValueError(f"{ids.size} tokens: too few for a window of two or more.")
  length = min(length, ids.size)
  n = ids.size // length
  return ids[: n * length].reshape(n, length)


def calibration_windows(ids: np.ndarray, length: int, count: int, seed: int) -> np.ndarray:
  """``count`` windows of ``length`` tokens at random offsets (``length`` capped by the text)."""
  length = min(length, ids.size)
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, ids.size - length + 1, size=count)
  return np.stack([ids[s : s + length] for s in starts])


def perplexity(model: Decoder, tokens: np.ndarray, batch_size: int = 8) -> float:
  """``exp`` of the mean next-token cross-entropy over every window of ``tokens`` ``(n, T)``."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state: Any, batch: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, state)(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum()

  total = sum(
    float(nll(state, jnp.asarray(tokens[i : i + batch_size])))
    for i in range(0, len(tokens), batch_size)
  )
  return math.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1)))


def _selected(pattern: str) -> Callable[[str, Any], bool]:
  return lambda path, leaf: np.ndim(leaf) >= 2 and re.search(pattern, path) is not None


def prune_blocks(
  model: Decoder,
  batches: list[np.ndarray],
  *,
  method: str,
  sparsity: float,
  structure: NM | None,
  layers: str = LAYERS,
  log: Callable[[str], None] = print,
  mesh: Mesh | None = None,
  **options: Any,
) -> None:
  """Prunes ``model`` in place block by block, logging one line per block.

  ``wanda`` / ``sparsegpt``: :func:`jaxprune.posttrain.prune` with ``stack=True``: the
  hidden states of ``batches`` cached at block 0's input, each block calibrated on them,
  pruned and re-run to give the next block's inputs (one pass per block). ``magnitude``:
  the smallest ``|w|`` per layer. ``sparsity`` is ignored with an N:M ``structure``.
  ``mesh``: the weights are split over it (in place) and each batch's rows too
  (:mod:`jaxprune.posttrain.sharded`); ``magnitude`` keeps the weights where they are.

  Raises:
    ValueError: ``layers`` selecting no kernel, or an N:M whose M does not divide a
      selected layer's inputs (naming the layer).
  """
  pick = _selected(layers)
  params = nnx.state(model, nnx.Param)
  chosen = [p for p, leaf in tree_lib.leaves_with_paths(params) if pick(p, leaf)]
  if not chosen:
    raise ValueError(f"--layers {layers!r} selects none of the model's kernels.")
  if structure is not None:
    for p, leaf in tree_lib.leaves_with_paths(params):
      if p in chosen and np.shape(leaf)[0] % structure.m:
        raise ValueError(
          f"N:M {structure.n}:{structure.m} groups {structure.m} inputs, but {p!r} has "
          f"{np.shape(leaf)[0]}; exclude it with --layers or choose another M."
        )
  depth = len(model.blocks)
  mine = [[p for p in chosen if p.startswith(f"blocks/{i}/")] for i in range(depth)]
  clock = [time.perf_counter()]

  def progress(done: int, total: int) -> None:
    now = time.perf_counter()
    if mine[done - 1]:
      log(f"block {done}/{total}: {method} on {len(mine[done - 1])} layers, {now - clock[0]:.1f} s")
    else:
      log(f"block {done}/{total}: no selected layers")
    clock[0] = now

  if method != "magnitude":  # one pass per block from cached hidden states
    params, _ = posttrain.prune(
      model,
      None,
      batches,
      method=method,
      sparsity=None if structure else sparsity,
      structure=structure,
      stack=True,
      where=lambda path, leaf: path in chosen,
      progress=progress,
      mesh=mesh,
      **options,
    )
    nnx.update(model, jax.block_until_ready(params))
    return
  for i in range(depth):
    if mine[i]:
      params = nnx.state(model, nnx.Param)
      where = lambda path, leaf, ours=mine[i]: path in ours  # noqa: E731
      pruner = jaxprune.magnitude(sparsity, where=where, structure=structure)
      nnx.update(model, jax.block_until_ready(jaxprune.apply_mask(params, pruner.masks(params))))
    progress(i + 1, depth)


@dataclasses.dataclass(frozen=True)
class HFPruneResult:
  """What ``jaxprune prune --checkpoint`` did.

  Attributes:
    method, target: ``wanda`` ..., ``"50%"`` or ``"2:4"``.
    dense, pruned: held-out perplexity before and after.
    summary: :func:`jaxprune.summary` of the pruned kernels.
    out: the directory written.
    seconds: pruning time (evaluation excluded).
  """

  method: str
  target: str
  dense: float
  pruned: float
  summary: jaxprune.Summary
  out: pathlib.Path
  seconds: float

  def report(self) -> str:
    """Perplexities, the per-layer sparsity table and where the checkpoint went."""
    return "\n".join(
      [
        "| model | sparsity | held-out perplexity |",
        "|---|---|---|",
        f"| dense | 0% | {self.dense:.3f} |",
        f"| {self.method} | {self.target} ({self.summary.sparsity:.1%} measured) | "
        f"{self.pruned:.3f} |",
        "",
        str(self.summary),
        f"time (calibrate + prune): {self.seconds:.1f} s",
        f"pruned checkpoint: {self.out}",
      ]
    )


def prune_checkpoint(args: argparse.Namespace, log: Callable[[str], None] = print) -> HFPruneResult:
  """Runs the ``--checkpoint`` form of ``jaxprune prune`` (arguments of :func:`add_arguments`)."""
  require("safetensors", "tokenizers", extra="llm", by="jaxprune prune --checkpoint")
  from jaxprune.models import hf

  source = pathlib.Path(args.checkpoint)
  mesh = device_mesh(args.devices, args.batch_size, args.calibration)
  model, checkpoint = hf.load_hf(source, args.dtype, mesh=mesh)
  config = checkpoint.config
  arch = (checkpoint.hf_config.get("architectures") or ["?"])[0]
  log(f"checkpoint: {source} ({arch}, {config.depth} layers, hidden {config.dim}, {args.dtype})")
  ids = tokenize(source, args.text, config.vocab_size)
  if args.eval_text:
    calib_ids, eval_ids = ids, tokenize(source, args.eval_text, config.vocab_size)
  else:
    cut = int(round(ids.size * (1 - args.eval_fraction)))
    calib_ids, eval_ids = ids[:cut], ids[cut:]
  if calib_ids.size < 2 or eval_ids.size < 2:
    raise ValueError(
      f"--text {args.text}: {ids.size} tokens leave {calib_ids.size} to calibrate on and "
      f"{eval_ids.size} held out; each needs at least 2 (a longer text, or --eval-text)."
    )
  held_out = windows(eval_ids, args.seq_len)
  calibration = calibration_windows(calib_ids, args.seq_len, args.calibration, args.seed)
  log(
    f"tokens: {calib_ids.size} to calibrate on ({len(calibration)} windows of "
    f"{calibration.shape[1]}), {eval_ids.size} held out ({len(held_out)} windows of "
    f"{held_out.shape[1]})"
  )
  dense = perplexity(model, held_out, args.batch_size)
  log(f"dense perplexity: {dense:.3f}")
  if args.structure:
    n, m = (int(x) for x in args.structure.split(":"))
    structure, sparsity, target = jaxprune.n_m(n, m), 1 - n / m, args.structure
  else:
    sparsity = 0.5 if args.sparsity is None else args.sparsity
    structure, target = None, f"{sparsity:.0%}"
  batches = [
    calibration[i : i + args.batch_size] for i in range(0, len(calibration), args.batch_size)
  ]
  start = time.perf_counter()
  if mesh is not None:
    log(f"weights and calibration batches split over {mesh.size} devices")
  prune_blocks(
    model, batches, method=args.method, sparsity=sparsity, structure=structure,
    layers=args.layers, log=log, mesh=mesh,
  )  # fmt: skip
  seconds = time.perf_counter() - start
  pruned = perplexity(model, held_out, args.batch_size)
  params = nnx.state(model, nnx.Param)
  summary = jaxprune.summary(params, where=_selected(args.layers))
  out = hf.save_hf(model, checkpoint, args.out)
  return HFPruneResult(args.method, target, dense, pruned, summary, out, seconds)
