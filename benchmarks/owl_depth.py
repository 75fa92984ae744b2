"""OWL and depth pruning of the character LM: validation perplexity.

* OWL (Yin et al. 2024): Wanda and SparseGPT at 60%, 70% and 80%, the same sparsity in
  every block (uniform) or each block's from the outlier ratio of its Wanda scores
  (``posttrain.prune(..., owl=True)``, M = 5, lambda = 0.08), one pass per block.
* Depth (ShortGPT, Men et al. 2024): the ``n`` blocks of lowest Block Influence
  (``posttrain.block_influence`` on the calibration data) removed
  (``posttrain.drop_blocks``: a shorter model), next to removing the last ``n`` blocks.

On the newest checkpoint of the run of ``configs/charlm.py``; calibration: the
``posttrain.calibration`` training sequences of ``jaxprune prune``; every projection of
the blocks pruned (embeddings and head dense):

  jaxprune train --config configs/charlm.py          # runs/charlm
  python benchmarks/owl_depth.py [--workdir runs/charlm] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import pathlib
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

SPARSITIES = (0.6, 0.7, 0.8)
METHODS = ("wanda", "sparsegpt")


def perplexity(model: nnx.Module, split: data.Source, batch_size: int) -> float:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  got = step_lib.scores(step_lib.make_eval_step(graphdef), params, rest, split, batch_size)
  return math.exp(got["loss"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/charlm.py")
  parser.add_argument("--workdir", default="", help="the trained run (default: the config's)")
  parser.add_argument("--out", default="benchmarks/results/owl_depth.md")
  args = parser.parse_args()
  overrides = [f"train.workdir={args.workdir}"] if args.workdir else []
  config = config_lib.load_config(args.config, overrides)
  ds = data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, purpose="prune")
  host = sharding_lib.to_host(restored.state)
  model = nnx.merge(restored.graphdef, host.params, host.rest)
  model.eval()
  step = int(restored.meta["step"])
  batch = config.data.eval_batch_size

  def ppl(m: nnx.Module) -> float:
    return perplexity(m, ds.test, batch)

  dense = ppl(model)
  print(f"dense (step {step}): {dense:.3f}", flush=True)
  batches = prune.calibration_batches(config, ds.train)
  where = prune.selected(config.posttrain.layers)
  stats = posttrain.calibrate(model, None, batches, where=where, hessian=False)
  groups = posttrain.group_blocks({p: s.layer for p, s in stats.items()}, config.posttrain.blocks)
  params = nnx.state(model, nnx.Param)
  ratios = posttrain.outlier_ratios(params, stats, groups)
  owl_rows: list[list[object]] = []
  seconds = 0.0
  for method in METHODS:
    for sparsity in SPARSITIES:
      cells: list[object] = [method, f"{sparsity:.0%}"]
      for owl in (False, True):
        start = time.perf_counter()
        pruned, _ = posttrain.prune(
          model, None, batches, method=method, sparsity=sparsity, stack=True, owl=owl,
          where=where,
        )  # fmt: skip
        seconds += time.perf_counter() - start
        m = nnx.clone(model)
        nnx.update(m, pruned)
        cells.append(f"{ppl(m):.3f}")
        print(method, sparsity, "owl" if owl else "uniform", cells[-1], flush=True)
      owl_rows.append(cells)
  owl_s = {s: posttrain.owl_sparsities(params, stats, groups, s) for s in SPARSITIES}

  bi = posttrain.block_influence(model, batches)
  order = [int(i) for i in np.argsort(bi, kind="stable")]
  depth = len(bi)
  depth_rows: list[list[object]] = []
  for n in range(depth):
    lowest, last = sorted(order[:n]), list(range(depth - n, depth))
    row: list[object] = [n, ", ".join(map(str, lowest)) or "-"]
    row.append(f"{ppl(posttrain.drop_blocks(model, lowest)):.3f}" if n else f"{dense:.3f}")
    row.append(", ".join(map(str, last)) or "-")
    row.append(f"{ppl(posttrain.drop_blocks(model, last)):.3f}" if n else f"{dense:.3f}")
    depth_rows.append(row)
    print("depth", row, flush=True)

  m = config.model
  table = lambda header, rows: "\n".join(  # noqa: E731
    ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  )
  lines = [
    "# OWL and depth pruning of the character LM: validation perplexity",
    "",
    f"`charlm` (dim {m.dim}, {m.depth} blocks, {m.heads} query / {m.kv_heads} KV heads, gated "
    f"MLP {m.mlp_dim}) trained by `configs/charlm.py` ({step} steps) on `pydoc_topics` "
    f"(CPython {platform.python_version()}); validation: {len(ds.test)} windows of "
    f"{config.data.seq_len} characters; calibration: {config.posttrain.calibration} training "
    "sequences. Produced by `python benchmarks/owl_depth.py` "
    f"({platform.machine()}, jax {jax.__version__}).",
    "",
    f"Dense validation perplexity: **{dense:.3f}**.",
    "",
    "## OWL: uniform vs outlier-weighted block sparsity",
    "",
    "Every q/k/v/o and gate/up/down projection of the blocks; one pass per block "
    "(`posttrain.prune(stack=True)`); OWL with M = 5, lambda = 0.08 "
    f"(calibrate + prune, all 12 cells: {seconds:.0f} s).",
    "",
    table(["method", "sparsity", "uniform", "OWL"], owl_rows),
    "",
    "Outlier ratios `D_b` (fraction of a block's Wanda scores above 5x its mean): "
    + ", ".join(f"block {i}: {r:.4f}" for i, r in enumerate(ratios))
    + ". OWL's block sparsities: "
    + "; ".join(f"{s:.0%}: " + ", ".join(f"{v:.3f}" for v in owl_s[s]) for s in SPARSITIES)
    + ".",
    "",
    "## Depth: blocks removed by Block Influence vs the last blocks",
    "",
    "Block Influence `BI_i = 1 - mean cos(x_in, x_out)` on the calibration tokens: "
    + ", ".join(f"block {i}: {v:.4f}" for i, v in enumerate(bi))
    + ". The blocks are really removed (`posttrain.drop_blocks`: a shorter model, blocks "
    "renumbered), no fine-tuning.",
    "",
    table(
      [
        "blocks removed",
        "lowest BI: which",
        "lowest BI: perplexity",
        "last: which",
        "last: perplexity",
      ],
      depth_rows,
    ),  # fmt: skip
  ]
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fileio.write_text(out, "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
