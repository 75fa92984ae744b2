"""The LM table: validation perplexity of the character LM after one-shot pruning.

Magnitude, Wanda and SparseGPT at 50%, 60%, 70% unstructured and at 2:4 and 4:8, on
every projection of the transformer blocks (embeddings and head dense), calibrated on
128 training sequences, block by block; the same code as ``jaxprune prune`` (the
``posttrain`` fields of ``configs/charlm_*.py``), on the newest checkpoint of the run of
``configs/charlm.py``:

  jaxprune train --config configs/charlm.py          # runs/charlm
  python benchmarks/charlm_pruning.py [--workdir runs/charlm] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import jax
import numpy as np
from flax import nnx

from jaxprune import fileio, posttrain
from jaxprune.train import config as config_lib
from jaxprune.train import data, prune
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train import step as step_lib

TARGETS = (
  ("unstructured", 0.5),
  ("unstructured", 0.6),
  ("unstructured", 0.7),
  ("2:4", 0.5),
  ("4:8", 0.5),
)
METHODS = ("magnitude", "wanda", "sparsegpt")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/charlm.py")
  parser.add_argument("--workdir", default="", help="the trained run (default: the config's)")
  parser.add_argument("--out", default="benchmarks/results/charlm_pruning.md")
  parser.add_argument("--sequential", default=True, action=argparse.BooleanOptionalAction)
  args = parser.parse_args()
  overrides = [f"train.workdir={args.workdir}"] if args.workdir else []
  config = config_lib.load_config(args.config, overrides)
  ds = data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, purpose="prune")
  host = sharding_lib.to_host(restored.state)
  model = nnx.merge(restored.graphdef, host.params, host.rest)
  model.eval()
  eval_fn = step_lib.make_eval_step(restored.graphdef)

  def perplexity(params):
    got = step_lib.scores(eval_fn, params, host.rest, ds.test, config.data.eval_batch_size)
    return math.exp(got["loss"])

  dense = perplexity(host.params)
  print(f"dense: {dense:.3f}", flush=True)
  batches = prune.calibration_batches(config, ds.train)
  # Wanda's edge over magnitude comes from input features of very unequal norms (the
  # outlier features of large LMs): how unequal are they here?
  stats = posttrain.calibrate(
    model, None, batches, where=prune.selected(config.posttrain.layers), hessian=False
  )
  spread = {}
  for path, s in stats.items():
    norms = np.sqrt(np.asarray(s.sq_norms))
    spread[path] = float(norms.max() / np.median(norms))
  widest = max(spread, key=spread.get)
  rows: dict[str, dict[str, float]] = {}
  seconds: dict[str, float] = {}
  for method in METHODS:
    rows[method], seconds[method] = {}, 0.0
    for structure, sparsity in TARGETS:
      config.posttrain.update(
        method=method, structure=structure, sparsity=sparsity, sequential=args.sequential
      )
      prune.check(config)
      start = time.perf_counter()
      params, _ = prune.prune_model(config, model, batches)
      seconds[method] += time.perf_counter() - start
      name = prune.target_name(config)
      rows[method][name] = perplexity(params)
      print(f"{method} {name}: {rows[method][name]:.3f}", flush=True)
  names = list(rows[METHODS[0]])
  m = config.model
  n_params = sum(x.size for x in jax.tree.leaves(host.params))
  lines = [
    "# One-shot pruning of the character LM: validation perplexity",
    "",
    f"`charlm` (dim {m.dim}, {m.depth} blocks, {m.heads} query / {m.kv_heads} KV heads, "
    f"gated MLP {m.mlp_dim}, {n_params:,} params) trained by `configs/charlm.py` "
    f"({config.train.steps} steps) on `pydoc_topics` (CPython {platform.python_version()}'s "
    f"help texts, sequences of {config.data.seq_len} characters); validation: the last 10% "
    f"of the text, {len(ds.test)} windows. Pruned: every q/k/v/o and gate/up/down "
    "projection of the blocks (embeddings and head dense); calibration: "
    f"{config.posttrain.calibration} training sequences, "
    + (
      "block by block (each block on the pruned blocks' outputs)."
      if args.sequential
      else "one pass over the dense model."
    )  # fmt: skip
    + f" Produced by `python benchmarks/charlm_pruning.py` ({platform.machine()}).",
    "",
    f"Dense validation perplexity: **{dense:.3f}**.",
    "",
    "| method | " + " | ".join(names) + " | time (s, all five) |",
    "|---|" + "---|" * (len(names) + 1),
  ]
  for method in METHODS:
    cells = " | ".join(f"{rows[method][n]:.3f}" for n in names)
    lines.append(f"| {method} | {cells} | {seconds[method]:.1f} |")
  lines += [
    "",
    "Input-feature norms `||X_j||` of the pruned layers (calibration tokens), largest over "
    f"median: median {np.median(list(spread.values())):.2f} over the {len(spread)} layers, "
    f"at most {spread[widest]:.2f} (`{widest}`). The outlier features of large LMs that "
    "Wanda's score exploits are tens to hundreds of times the median; with norms this "
    "even, `|W_ij| * ||X_j||` ranks the weights of an output almost as `|W_ij|` does, so "
    "Wanda lands next to magnitude here, while SparseGPT, which also updates the kept "
    "weights to reconstruct each layer's output from `X^T X`, stays far ahead.",
  ]
  text = "\n".join(lines) + "\n"
  fileio.write_text(args.out, text)
  print(text)


if __name__ == "__main__":
  main()
