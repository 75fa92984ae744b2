"""First-call cost: compile time of ``masks``, ``init`` and the first masked step, fresh
processes, side by side with jaxpruner.

Workload: LeNet-300-100 (784-300-100-10, Flax Linen param names, the same params for every
library), float32, CPU, 90% sparsity of the three kernels (biases dense). Each round starts a
fresh Python process per library (nothing cached, no persistent compilation cache) that
imports it, builds the params and times, in this order:

* ``masks``: the first mask computation, until ready. jaxprune:
  ``jaxprune.magnitude(0.9).masks(params)``; jaxpruner: what its ``instant_sparsify`` does
  before applying the masks, ``create_masks(calculate_scores(params), uniform(params, 0.9))``
  of a ``MagnitudePruning``;
* ``init``: the first init of a statically sparse Adam (random masks). jaxprune:
  ``jaxprune.sparse.static_sparse(optax.adam(1e-3), 0.9).init(params)``; jaxpruner:
  ``StaticRandomSparse(...).wrap_optax(optax.adam(1e-3)).init(params)``;
* ``step lower`` and ``step compile``: ``jax.jit(step).lower(...)`` and then ``.compile()``
  of a train step (batch 128) with gradual magnitude pruning, cubic from 0 to 90% over
  steps 0-1000, masks updated every 10 steps. jaxprune: ``jaxprune.masked(optax.adam(1e-3),
  jaxprune.magnitude(jaxprune.agp(0.9, 0, 1000, 10)))``; jaxpruner: ``MagnitudePruning``
  with ``PolynomialSchedule(update_freq=10, update_start_step=0, update_end_step=1000)``,
  ``wrap_optax(optax.adam(1e-3))`` and ``post_gradient_update`` after the update, as its
  README's training loop does;
* ``process``: the whole process, from start to exit (imports included).

jaxpruner runs from its own source (it has no package for this Python): a checkout of
``github.com/google-research/jaxpruner`` given by ``--jaxpruner DIR`` or the
``JAXPRUNER_SRC`` environment variable, imported by a Python that has chex, flax and
ml_collections (``--jaxpruner-python`` or ``JAXPRUNER_PYTHON``; default: this one). Without
it, jaxpruner is skipped with a message. Its code calls ``jax.tree_map``, which jax removed
in 0.6: with a newer jax its process sets the alias ``jax.tree_map = jax.tree_util.tree_map``
before importing it (its files are not changed), so both libraries compile with the same
jax and XLA.

With ``--baseline DIR`` (a directory holding another ``jaxprune`` package, e.g. an older
commit from ``git archive <commit> jaxprune | tar -x -C DIR``) that tree runs in the same
rounds too. All processes of a round run one after the other, in an order rotated each
round; the table gives the median over rounds of each ratio to jaxprune.

Usage::

  git clone https://github.com/google-research/jaxpruner /tmp/jaxpruner
  python3 -m venv .venv-jaxpruner
  .venv-jaxpruner/bin/pip install jax==<this jax> optax flax chex ml_collections
  JAXPRUNER_SRC=/tmp/jaxpruner JAXPRUNER_PYTHON=.venv-jaxpruner/bin/python \
    python benchmarks/compile_time.py            # writes results/compile_time.md
  python benchmarks/compile_time.py --rounds 3 --no-write --baseline /tmp/base
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
METRICS = ("masks", "init", "step lower", "step compile", "process")  # wall and CPU seconds

COMMON = r"""
import json, time
start = time.perf_counter()
import jax, jax.numpy as jnp, optax
{imports}
sizes = [784, 300, 100, 10]
keys = jax.random.split(jax.random.key(0), 3)
params = {{
  f"Dense_{{i}}": {{
    "kernel": jax.random.normal(k, (a, b)) / a**0.5,
    "bias": jnp.zeros(b),
  }}
  for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
}}
jax.block_until_ready(params)
out = {{}}

def timed(name, f):
  t, c = time.perf_counter(), time.process_time()
  r = f()
  jax.block_until_ready(r)
  out[name] = time.perf_counter() - t
  out[name + " cpu"] = time.process_time() - c
  return r

def loss(p, x, y):
  h = x
  for i in range(3):
    h = h @ p[f"Dense_{{i}}"]["kernel"] + p[f"Dense_{{i}}"]["bias"]
    h = jax.nn.relu(h) if i < 2 else h
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

x, y = jnp.zeros((128, 784)), jnp.zeros((128,), jnp.int32)
{body}
lowered = timed("step lower", lambda: jax.jit(step).lower(params, state, x, y))
timed("step compile", lambda: lowered.compile() and 0)
out["process"] = time.perf_counter() - start
out["process cpu"] = time.process_time()
print(json.dumps(out))
"""

JAXPRUNE = COMMON.format(
  imports="import jaxprune\nfrom jaxprune.sparse import static_sparse",
  body=r"""
timed("masks", lambda: jaxprune.magnitude(0.9).masks(params))
timed("init", lambda: static_sparse(optax.adam(1e-3), 0.9).init(params))
tx = jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(jaxprune.agp(0.9, 0, 1000, 10)))

def step(p, s, x, y):
  g = jax.grad(loss)(p, x, y)
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s

state = tx.init(params)
""",
)

JAXPRUNER = COMMON.format(
  imports=r"""import functools
if not hasattr(jax, "tree_map"):  # removed in jax 0.6; jaxpruner calls it (files unchanged)
  jax.tree_map = jax.tree_util.tree_map
import jaxpruner
uniform = functools.partial(jaxpruner.sparsity_distributions.uniform, sparsity=0.9)""",
  body=r"""
pruner = jaxpruner.MagnitudePruning(sparsity_distribution_fn=uniform)
timed("masks", lambda: pruner.create_masks(pruner.calculate_scores(params), uniform(params)))
static = jaxpruner.StaticRandomSparse(sparsity_distribution_fn=uniform)
timed("init", lambda: static.wrap_optax(optax.adam(1e-3)).init(params))
pruner = jaxpruner.MagnitudePruning(
  sparsity_distribution_fn=uniform,
  scheduler=jaxpruner.PolynomialSchedule(
    update_freq=10, update_start_step=0, update_end_step=1000
  ),
)
tx = pruner.wrap_optax(optax.adam(1e-3))

def step(p, s, x, y):
  g = jax.grad(loss)(p, x, y)
  u, s = tx.update(g, s, p)
  return pruner.post_gradient_update(optax.apply_updates(p, u), s), s

state = tx.init(params)
""",
)


def run_child(python: str, code: str, path: Path) -> dict[str, float]:
  """Runs ``code`` in a fresh ``python`` process with ``path`` first on ``sys.path``."""
  env = dict(os.environ, PYTHONPATH=str(path))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start = time.perf_counter()
  # cwd: `python -c` puts the working directory first on sys.path, before PYTHONPATH.
  done = subprocess.run(
    [python, "-c", code], env=env, cwd=path, capture_output=True, text=True, check=False
  )
  if done.returncode:
    raise RuntimeError(f"{python} with {path} failed:\n{done.stderr[-3000:]}")
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
  parser.add_argument(
    "--jaxpruner",
    type=Path,
    default=os.environ.get("JAXPRUNER_SRC"),
    help="jaxpruner source checkout (default: $JAXPRUNER_SRC)",
  )
  parser.add_argument(
    "--jaxpruner-python",
    default=os.environ.get("JAXPRUNER_PYTHON", sys.executable),
    help="Python with chex/flax/ml_collections for jaxpruner (default: $JAXPRUNER_PYTHON)",
  )
  parser.add_argument("--rounds", type=int, default=5, help="fresh processes per library")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()
  trees = {"jaxprune": (sys.executable, JAXPRUNE, ROOT)}
  if args.jaxpruner is None:
    print(
      "jaxpruner: skipped (no source given). Clone github.com/google-research/jaxpruner and "
      "pass --jaxpruner DIR or set JAXPRUNER_SRC (see this script's docstring).",
      flush=True,
    )
  elif not (args.jaxpruner / "jaxpruner" / "__init__.py").exists():
    parser.error(f"--jaxpruner {args.jaxpruner}: no jaxpruner/__init__.py there.")
  else:
    trees["jaxpruner"] = (args.jaxpruner_python, JAXPRUNER, args.jaxpruner)
  if args.baseline is not None:
    if not (args.baseline / "jaxprune" / "__init__.py").exists():
      parser.error(f"--baseline {args.baseline}: no jaxprune/__init__.py there.")
    trees["baseline"] = (sys.executable, JAXPRUNE, args.baseline)
  names = list(trees)
  others = names[1:]
  results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
  loads = []
  for r in range(args.rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      results[name].append(run_child(*trees[name]))
      loads.append(os.getloadavg()[0])
      print(name, json.dumps({k: round(v, 2) for k, v in results[name][-1].items()}), flush=True)

  header = ["first call", *(f"{n} (s, median [IQR])" for n in names)]
  header += [f"jaxprune / {n} (median of rounds)" for n in others]
  rows = []
  for metric in [f"{m}{kind}" for m in METRICS for kind in (" cpu", "")]:
    row: list[object] = [metric]
    for name in names:
      xs = [r[metric] for r in results[name]]
      lo, hi = quartiles(xs)
      row.append(f"{statistics.median(xs):.2f} [{lo:.2f}-{hi:.2f}]")
    for name in others:
      ours = [r[metric] for r in results["jaxprune"]]
      ratio = timing.paired_ratio(ours, [r[metric] for r in results[name]])
      row.append(f"**{ratio:.2f}x**")
    rows.append(row)
  versions = ""
  if "jaxpruner" in trees:
    versions = (
      f" jaxpruner: source at {args.jaxpruner} run by {args.jaxpruner_python} "
      f"({_versions(args.jaxpruner_python)})."
    )
  body = (
    f"LeNet-300-100 (266,200 params), CPU, {args.rounds} rounds of one fresh process per "
    "library, interleaved (no compilation cache). Seconds of CPU time of the process (all "
    "threads: compiling is single-threaded, so on a loaded machine this is the steadier "
    "figure; 'process cpu' excludes the interpreter start-up) and of wall time, median and "
    "interquartile range over rounds; a ratio is the median over rounds of the paired "
    f"ratios. Load average during the run: {min(loads):.1f}-{max(loads):.1f} on "
    f"{os.cpu_count()} cores.{versions}\n\n" + timing.table(header, rows)
  )
  timing.report("compile_time", "First-call compile time", body, write=not args.no_write)


def _versions(python: str) -> str:
  code = (
    "import importlib.metadata as m\n"
    "print(', '.join(f'{p} {m.version(p)}' for p in ('jax', 'jaxlib', 'optax', 'flax', 'chex')))"
  )
  done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
  return done.stdout.strip() or "versions unknown"


if __name__ == "__main__":
  main()
