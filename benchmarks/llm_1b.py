"""A 1B-parameter decoder pruned end to end: Wanda and SparseGPT, time per block and memory.

A random Llama-shaped :class:`~jaxprune.models.decoder.Decoder` of TinyLlama-1.1B's shape
(22 blocks, dim 2048, MLP 5632, 32 query / 4 KV heads, vocab 32000; 1.1B params) in
bfloat16, made leaf by leaf (``nnx.eval_shape``, then each param drawn in bfloat16: the
model never exists in float32), is pruned to 50% unstructured by
:func:`jaxprune.train.hf_prune.prune_blocks`, the function ``jaxprune prune --checkpoint``
calls (``posttrain.prune(stack=True)``: hidden states cached at block 0's input, one pass
per block). Calibration: ``--sequences`` random token-id sequences of ``--seq`` tokens in
batches of ``--batch``. Recorded: wall time per block (the command's progress line),
the total, the process's peak resident memory (``ru_maxrss``) and, on a GPU, the device's
peak bytes; checked: every pruned kernel exactly 50% zeros and finite logits after pruning.

  python benchmarks/llm_1b.py                     # both methods, all 22 blocks
  python benchmarks/llm_1b.py --blocks 2          # a model of 2 such blocks (extrapolate)
  python benchmarks/llm_1b.py --quick             # a tiny model, writes nothing

Each method runs on a fresh model in its own process (``--method``), so each peak
memory figure is that method's; without ``--method`` the script runs one subprocess per
method and writes ``benchmarks/results/llm_1b.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import fileio
from jaxprune import tree as tree_lib
from jaxprune.models.decoder import Decoder, DecoderConfig
from jaxprune.train import hf_prune

METHODS = ("wanda", "sparsegpt")
TINYLLAMA = DecoderConfig(
  32_000, dim=2048, depth=22, num_heads=32, num_kv_heads=4, mlp_dim=5632, norm_eps=1e-5
)
QUICK = DecoderConfig(512, dim=64, depth=2, num_heads=8, num_kv_heads=2, mlp_dim=176)


def random_model(config: DecoderConfig, dtype: Any = jnp.bfloat16, seed: int = 0) -> Decoder:
  """A random model of ``config`` whose params are made in ``dtype`` one at a time.

  Kernels and embeddings ``N(0, 0.02)`` (Llama's initializer range), norm scales 1. Drawn
  by NumPy (a float32 copy of one param at a time, no JAX program compiled per shape), so
  the float32 model never exists.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: config.make(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path: Any, leaf: Any) -> jax.Array:
    if tree_lib.path_str(path).endswith("scale"):
      return jnp.ones(leaf.shape, dtype)
    return jnp.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32), dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def _load() -> str:
  return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def peak_rss_gib() -> float:
  """The process's peak resident memory (``ru_maxrss``, KiB on Linux) in GiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_gib() -> float | None:
  """The first device's peak bytes in use, where the backend reports it (GPU, TPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # backends without memory statistics
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def run_method(
  config: DecoderConfig,
  method: str,
  sequences: int,
  seq: int,
  batch: int,
  json_path: str | None = None,
) -> dict[str, Any]:
  """Builds the model, prunes it with ``method`` and checks it; the measurements as a dict
  (also written to ``json_path`` after each block, so an interrupted run keeps its blocks)."""
  start = time.perf_counter()
  model = random_model(config)
  jax.block_until_ready(nnx.state(model))
  built = time.perf_counter() - start
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  rss_model = peak_rss_gib()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (sequences, seq)).astype(np.int32)
  batches = [tokens[i : i + batch] for i in range(0, len(tokens), batch)]
  lines: list[tuple[str, float]] = []
  base = {"method": method, "params": params, "depth": config.depth, "load": _load()}
  base["build_s"] = built
  base["tokens"] = f"{sequences} x {seq} (batches of {batch})"
  clock = [time.perf_counter()]

  def log(line: str) -> None:
    now = time.perf_counter()
    lines.append((line, now - clock[0]))
    clock[0] = now
    print(f"{method}: {line} (rss peak {peak_rss_gib():.2f} GiB)", flush=True)
    if json_path:  # what is done so far survives an interrupted run
      partial = {**base, "block_s": [s for _, s in lines], "peak_rss_gib": peak_rss_gib()}
      fileio.write_text(json_path, json.dumps(partial))

  start = time.perf_counter()
  hf_prune.prune_blocks(model, batches, method=method, sparsity=0.5, structure=None, log=log)
  total = time.perf_counter() - start
  rss_pruning = peak_rss_gib()
  blocks = [seconds for _, seconds in lines]
  zeros = {  # one kernel at a time: no host copy of the model
    p: float(jnp.mean(leaf == 0))
    for p, leaf in tree_lib.leaves_with_paths(nnx.state(model, nnx.Param))
    if p.startswith("blocks/") and np.ndim(leaf) == 2
  }
  logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(batches[0]))
  finite = bool(jnp.isfinite(logits.astype(jnp.float32)).all())
  return {
    **base,
    "load": f"{base['load']} at the start, {_load()} at the end",
    "build_s": built,
    "rss_after_build_gib": rss_model,
    "block_s": blocks,
    "total_s": total,
    "peak_rss_pruning_gib": rss_pruning,
    "peak_rss_gib": peak_rss_gib(),
    "device_peak_gib": device_peak_gib(),
    "layers": len(zeros),
    "sparsity_min": min(zeros.values()),
    "sparsity_max": max(zeros.values()),
    "finite_logits": finite,
  }


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
  """The markdown of the results file (a method stopped early: its blocks so far)."""
  depth = max(r["depth"] for r in results)
  header = ["block"] + [r["method"] + " (s)" for r in results]
  rows = [
    [str(i + 1)] + [f"{r['block_s'][i]:.1f}" if i < len(r["block_s"]) else "-" for r in results]
    for i in range(depth)
  ]
  lines = [
    "# A 1B-parameter decoder pruned end to end (benchmarks/llm_1b.py)",
    "",
    "Random TinyLlama-shaped Decoder (blocks of dim 2048, MLP 5632, 32/4 heads, vocab "
    "32000; 22 blocks = 1.10B params) in bfloat16, 50% unstructured, "
    "calibrated on random token ids (sequences x tokens per method below), "
    "through `jaxprune.train.hf_prune.prune_blocks` (what `jaxprune prune "
    "--checkpoint` runs: `posttrain.prune(stack=True)`, one pass per block). "
    f"Backend: {jax.default_backend()} ({os.cpu_count()} CPUs).",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *("| " + " | ".join(r) + " |" for r in rows),
    "",
    "| method | params | calibration | blocks done | build (s) | total (s) | median block (s) | "
    "peak RSS pruning / with checks (GiB) | device peak (GiB) | kernels | sparsity min / max | "
    "logits finite | "
    "load average (1/5/15 min) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    done = len(r["block_s"])
    finished = "total_s" in r
    device = r.get("device_peak_gib")
    lines.append(
      f"| {r['method']} | {r['params'] / 1e9:.2f}B | "
      f"{r.get('tokens', f'{args.sequences} x {args.seq} (batches of {args.batch})')} | "
      f"{done} / {r['depth']} | "
      f"{r.get('build_s', float('nan')):.0f} | "
      f"{r['total_s'] if finished else sum(r['block_s']):.0f} | "
      f"{np.median(r['block_s'][1:] or r['block_s']):.1f} | "
      f"{r.get('peak_rss_pruning_gib', r['peak_rss_gib']):.2f} / {r['peak_rss_gib']:.2f} | "
      f"{'-' if device is None else f'{device:.2f}'} | {r.get('layers', '-')} | "
      + (f"{r['sparsity_min']:.4f} / {r['sparsity_max']:.4f}" if finished else "-")
      + f" | {r.get('finite_logits', '-')} | {r['load']} |"
    )
  lines += [
    "",
    "Block 1's time includes compiling the block programs (shared by all blocks) and the "
    "check that embed -> blocks -> logits reproduces the model (on one example); "
    "the median leaves it out. The last block is not re-run (its output is not needed). "
    "Peak RSS (`ru_maxrss`, the whole process) when pruning returns, and after this "
    "script's checks (a full forward pass for the logits; a 1.10B model alone: 2.05 GiB in "
    "bfloat16). "
    "Rerun: `python benchmarks/llm_1b.py` (each method in its own process, one after "
    "the other).",
  ]
  if args.note:
    lines += ["", args.note]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", choices=METHODS, help="one method in this process")
  parser.add_argument("--blocks", type=int, default=22, help="blocks of the model (default 22)")
  parser.add_argument("--sequences", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--quick", action="store_true", help="a tiny model; writes nothing")
  parser.add_argument("--json", help="with --method: write the measurements here (each block)")
  parser.add_argument(
    "--report", nargs="+", metavar="JSON", help="only write the table from these --json files"
  )
  parser.add_argument("--note", help="a paragraph appended to the results file")
  parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm_1b.md"))
  args = parser.parse_args()
  if args.quick:
    args.sequences, args.seq, args.batch, args.blocks = 4, 32, 2, QUICK.depth
  config = QUICK if args.quick else TINYLLAMA
  config = dataclasses.replace(config, depth=args.blocks)
  if args.report:
    results = [json.loads(Path(f).read_text()) for f in args.report]
  elif args.method:
    result = run_method(config, args.method, args.sequences, args.seq, args.batch, args.json)
    print(json.dumps(result), flush=True)
    if args.json:
      fileio.write_text(args.json, json.dumps(result))
    return
  elif args.quick:
    results = [run_method(config, m, args.sequences, args.seq, args.batch) for m in METHODS]
  else:
    results = []
    for method in METHODS:  # one process per method: each peak memory is that method's
      out = Path(args.out).with_suffix(f".{method}.json")
      command = [sys.executable, __file__, "--method", method, "--json", str(out)]
      command += ["--blocks", str(args.blocks), "--sequences", str(args.sequences)]
      command += ["--seq", str(args.seq), "--batch", str(args.batch)]
      subprocess.run(command, check=True)
      results.append(json.loads(out.read_text()))
      out.unlink()
  for r in results:
    if "total_s" in r:
      assert r["finite_logits"], f"{r['method']}: non-finite logits after pruning"
      assert r["sparsity_min"] == r["sparsity_max"] == 0.5, f"{r['method']}: sparsity not 50%"
  if not args.quick:
    fileio.write_text(args.out, table(results, args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
