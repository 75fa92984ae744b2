"""First-call cost: compile time of ``masks``, ``init`` and the first masked step, fresh processes.

Workload: LeNet-300-100 (784-300-100-10, Flax Linen param names), float32, CPU. Each
round starts a fresh Python process per tree (nothing cached, no persistent compilation
cache) that imports jaxprune, builds the params and times, in this order:

* ``masks``: the first ``jaxprune.magnitude(0.9).masks(params)`` (wall, until ready);
* ``init``: the first ``jaxprune.sparse.static_sparse(optax.adam(1e-3), 0.9).init(params)``;
* ``step compile``: ``jax.jit(step).lower(...).compile()`` of a train step with
  ``jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(jaxprune.agp(0.9, 0, 1000, 10)))``;
* ``process``: the whole process, from start to exit (imports included).

With ``--baseline DIR`` (a directory holding another ``jaxprune`` package, e.g. an older
commit from ``git archive <commit> jaxprune | tar -x -C DIR``) both trees run in the
same rounds, interleaved, and the table gives the median over rounds of each ratio.

Usage::

  python benchmarks/compile_time.py --baseline /tmp/base   # writes results/compile_time.md
  python benchmarks/compile_time.py --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timing

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("masks", "init", "step compile", "process")  # each as wall and CPU seconds

CHILD = r"""
import json, time
start = time.perf_counter()
import jax, jax.numpy as jnp, optax
import jaxprune
from jaxprune.sparse import static_sparse

sizes = [784, 300, 100, 10]
keys = jax.random.split(jax.random.key(0), 3)
params = {
  f"Dense_{i}": {
    "kernel": jax.random.normal(k, (a, b)) / a**0.5,
    "bias": jnp.zeros(b),
  }
  for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
}
jax.block_until_ready(params)
out = {}

def timed(name, f):
  t, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(f())
  out[name] = time.perf_counter() - t
  out[name + " cpu"] = time.process_time() - c

timed("masks", lambda: jaxprune.magnitude(0.9).masks(params))
timed("init", lambda: static_sparse(optax.adam(1e-3), 0.9).init(params))

tx = jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(jaxprune.agp(0.9, 0, 1000, 10)))

def loss(p, x, y):
  h = x
  for i in range(3):
    h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
    h = jax.nn.relu(h) if i < 2 else h
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

def step(p, s, x, y):
  g = jax.grad(loss)(p, x, y)
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s

x, y = jnp.zeros((128, 784)), jnp.zeros((128,), jnp.int32)
state = tx.init(params)
timed("step compile", lambda: jax.jit(step).lower(params, state, x, y).compile() and 0)
out["process"] = time.perf_counter() - start
out["process cpu"] = time.process_time()
print(json.dumps(out))
"""


def run_child(package_root: Path) -> dict[str, float]:
  """Runs the workload in a fresh process importing jaxprune from ``package_root``."""
  env = dict(os.environ, PYTHONPATH=str(package_root))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start = time.perf_counter()
  # cwd: `python -c` puts the working directory first on sys.path, before PYTHONPATH.
  done = subprocess.run(
    [sys.executable, "-c", CHILD],
    env=env,
    cwd=package_root,
    capture_output=True,
    text=True,
    check=True,
  )
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["process"] = time.perf_counter() - start  # interpreter start-up included
  return result


def quartiles(xs: list[float]) -> tuple[float, float]:
  if len(xs) < 2:
    return xs[0], xs[0]
  q = statistics.quantiles(xs, n=4, method="inclusive")
  return q[0], q[2]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", type=Path, default=None, help="dir with another jaxprune")
  parser.add_argument("--rounds", type=int, default=5, help="fresh processes per tree")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()
  trees = {"jaxprune": ROOT}
  if args.baseline is not None:
    if not (args.baseline / "jaxprune" / "__init__.py").exists():
      parser.error(f"--baseline {args.baseline}: no jaxprune/__init__.py there.")
    trees["baseline"] = args.baseline
  names = list(trees)
  results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
  loads = []
  for r in range(args.rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      results[name].append(run_child(trees[name]))
      loads.append(os.getloadavg()[0])
      print(name, json.dumps({k: round(v, 2) for k, v in results[name][-1].items()}), flush=True)

  header = ["first call", *(f"{n} (s, median [IQR])" for n in names)]
  if "baseline" in trees:
    header.append("jaxprune / baseline (median of rounds)")
  rows = []
  for metric in [f"{m}{kind}" for m in METRICS for kind in (" cpu", "")]:
    row: list[object] = [metric]
    for name in names:
      xs = [r[metric] for r in results[name]]
      lo, hi = quartiles(xs)
      row.append(f"{statistics.median(xs):.2f} [{lo:.2f}-{hi:.2f}]")
    if "baseline" in trees:
      ratio = timing.paired_ratio(
        [r[metric] for r in results["jaxprune"]], [r[metric] for r in results["baseline"]]
      )
      row.append(f"**{ratio:.2f}x**")
    rows.append(row)
  body = (
    f"LeNet-300-100 (266,200 params), CPU, {args.rounds} rounds of one fresh process per "
    "tree, interleaved (no compilation cache). Seconds of CPU time of the process (all "
    "threads: compiling is single-threaded, so on a loaded machine this is the steadier "
    "figure; 'process cpu' excludes the interpreter start-up) and of wall time, median and "
    "interquartile range over rounds; the ratio is the median over rounds of the paired "
    f"ratios. Load average during the run: {min(loads):.1f}-{max(loads):.1f} on "
    f"{os.cpu_count()} cores.\n\n" + timing.table(header, rows)
  )
  timing.report("compile_time", "First-call compile time", body, write=not args.no_write)


if __name__ == "__main__":
  main()
