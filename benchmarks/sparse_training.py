"""Sparse training on LeNet-300-100 / mnist5k at 90%, 95% and 98%: the results table.

Every run is a recipe of ``configs/`` trained by :func:`jaxprune.train.loop.train` in
this one process (one run at a time), with these changes:

* ``STEPS`` Adam steps (lr 1e-3, batch 128) instead of 3,000, to fit the table in about
  half an hour of CPU; evaluation on the 1,000 test digits at the end of each phase;
* ``prune.sparsity`` = the column, ``train.seed`` = 0, 1, 2 (init, data order, masks);
* every sparse method spreads the sparsity over the layers with ERK
  (``prune.distribution=erk``, the output layer denser), AGP included;
* SET / RigL: ``prune.every=100`` (dT), ``prune.end`` = 75% of ``STEPS``;
* AGP (``lenet300_agp.py``): dense until ``STEPS // 3``, prunes to ``2 * STEPS // 3``;
* lottery (``lenet300_lottery.py``): dense training of ``STEPS`` steps, then
  ``ROUNDS`` rounds of magnitude pruning (the same fraction of the remaining weights
  each), each rewinding the survivors to step ``STEPS // 50`` and retraining ``STEPS``
  steps; the random re-init row is its ``rethink`` phase: the final masks on new random
  weights (``rethink.seed`` = 100 + ``train.seed``: with the seed of the ticket's own
  init the "re-init" would be the ticket at k = 0), trained ``STEPS`` steps from scratch.

Results go to ``benchmarks/results/sparse_training.json`` as they come (a rerun skips
the runs found there; ``--fresh`` starts over) and the table to
``benchmarks/results/sparse_training.md``.

Usage::

  python benchmarks/sparse_training.py                # every run, then the table
  python benchmarks/sparse_training.py --methods dense,rigl --sparsities 0.9
  python benchmarks/sparse_training.py --table-only   # the table from the JSON
  python benchmarks/sparse_training.py --steps 3000 --methods static,set,rigl
      # a longer variant: sparse_training_3000.json / .md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax

from jaxprune import fileio
from jaxprune.train import config as config_lib
from jaxprune.train import data, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = 1500
ROUNDS = 3
SEEDS = (0, 1, 2)
SPARSITIES = (0.9, 0.95, 0.98)
METHODS = ("dense", "static", "set", "rigl", "agp", "lottery")
LABELS = {
  "dense": "dense",
  "static": "static random mask",
  "set": "SET",
  "rigl": "RigL",
  "agp": "AGP from dense (reference)",
  "lottery": "lottery ticket, rewound",
  "lottery_random": "lottery mask, random re-init",
}
CONFIGS = {
  "dense": "dense.py",
  "static": "lenet300_static.py",
  "set": "lenet300_set.py",
  "rigl": "lenet300_rigl.py",
  "agp": "lenet300_agp.py",
  "lottery": "lenet300_lottery.py",
}


def make_config(method: str, sparsity: float, seed: int, steps: int = STEPS):
  """The config of one run (see the module docstring for the changes to the recipe)."""
  config = config_lib.load_config(ROOT / "configs" / CONFIGS[method])
  config.train.update(steps=steps, seed=seed, progress=False, log_every=100)
  if method != "dense":
    config.prune.update(sparsity=sparsity, distribution="erk")
  if method in ("set", "rigl"):
    config.prune.update(every=100, end=steps * 3 // 4)
  if method == "lottery":
    config.train.steps = steps * (ROUNDS + 1)
    config.prune.update(begin=steps, rounds=ROUNDS, rewind=steps // 50)
    config.rethink.update(steps=steps, seed=100 + seed)  # never the ticket's own init
  config.train.eval_every = config.train.steps
  return config


def key(method: str, sparsity: float, seed: int) -> str:
  return f"{method}/{sparsity:g}/{seed}"


def run_all(methods, sparsities, store: dict, path: pathlib.Path, steps: int) -> None:
  """Trains every missing run, one at a time, saving ``store`` to ``path`` after each."""
  dataset = data.load("mnist5k")
  for method in methods:
    for sparsity in (0.0,) if method == "dense" else sparsities:
      for seed in SEEDS:
        name = key(method, sparsity, seed)
        if name in store:
          continue
        wall, cpu = time.perf_counter(), time.process_time()
        result = loop.train(make_config(method, sparsity, seed, steps), dataset=dataset)
        store[name] = {
          "accuracy": result.final_accuracy,
          "sparsity": result.summary.sparsity,
          "seconds": time.perf_counter() - wall,
          "cpu_seconds": time.process_time() - cpu,
        }
        if result.rethink is not None:
          store[name]["random_reinit_accuracy"] = result.rethink.final_accuracy
          store[name]["random_reinit_sparsity"] = result.rethink.summary.sparsity
        print(name, json.dumps(store[name]), flush=True)
        fileio.write_json(path, store, indent=1, sort_keys=True)


def cells(store: dict) -> dict[tuple[str, float], list[float]]:
  """``(row, sparsity) -> accuracies over the seeds`` (the lottery run gives two rows)."""
  out: dict[tuple[str, float], list[float]] = {}
  for name, got in store.items():
    method, sparsity, _ = name.split("/")
    out.setdefault((method, float(sparsity)), []).append(got["accuracy"])
    if "random_reinit_accuracy" in got:
      out.setdefault(("lottery_random", float(sparsity)), []).append(got["random_reinit_accuracy"])
  return out


def mean_sd(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(table, better: str, worse: str, sparsity: float) -> str:
  """``A >= B`` verdict: holds / within noise / reversed (noise: the sum of the two SDs)."""
  if (better, sparsity) not in table or (worse, sparsity) not in table:
    return "not measured"
  (a, sa), (b, sb) = mean_sd(table[better, sparsity]), mean_sd(table[worse, sparsity])
  diff = 100 * (a - b)
  noise = 100 * (sa + sb)
  verdict = "within noise" if abs(diff) <= noise else "holds" if diff > 0 else "**reversed**"
  return f"{diff:+.1f} points (noise {noise:.1f}): {verdict}"


def table_markdown(store: dict, sparsities) -> str:
  table = cells(store)
  rows = [m for m in (*METHODS[:-1], "lottery", "lottery_random") if any(k[0] == m for k in table)]
  head = "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
  lines = [head, "|---|" + "---|" * len(sparsities)]
  for row in rows:
    out = []
    for s in sparsities:
      values = table.get((row, 0.0 if row == "dense" else s))
      if not values:
        out.append("—")
        continue
      m, sd = mean_sd(values)
      out.append(f"{100 * m:.1f} ± {100 * sd:.1f}")
    lines.append(f"| {LABELS[row]} | " + " | ".join(out) + " |")
  checks = [
    ("rigl", "set", "RigL >= SET"),
    ("set", "static", "SET >= static"),
    ("rigl", "static", "RigL >= static"),
    ("lottery", "lottery_random", "rewound ticket >= random re-init"),
  ]
  lines += ["", "| ordering | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"]
  lines.append("|---|" + "---|" * len(sparsities))
  for a, b, label in checks:
    lines.append(f"| {label} | " + " | ".join(compare(table, a, b, s) for s in sparsities) + " |")
  return "\n".join(lines)


def per_seed_markdown(store: dict) -> str:
  lines = ["| run (method/sparsity/seed) | accuracy | random re-init | kernel sparsity | CPU s |"]
  lines.append("|---|---|---|---|---|")
  for name in sorted(store):
    got = store[name]
    reinit = got.get("random_reinit_accuracy")
    lines.append(
      f"| {name} | {100 * got['accuracy']:.1f} | "
      + ("" if reinit is None else f"{100 * reinit:.1f}")
      + f" | {100 * got['sparsity']:.2f}% | {got['cpu_seconds']:.0f} |"
    )
  return "\n".join(lines)


def write_markdown(store: dict, sparsities, path: pathlib.Path, steps: int) -> str:
  lottery = f""" Lottery: dense {steps} steps, then {ROUNDS} rounds
of magnitude pruning (the same fraction of the remaining weights each), the survivors
rewound to step {steps // 50} and retrained {steps} steps each round; random re-init:
its final masks on new random weights (seed 100 + train seed), trained {steps} steps from
scratch."""
  cpu = sum(r["cpu_seconds"] for r in store.values())
  wall = sum(r["seconds"] for r in store.values())
  text = f"""# Sparse training: LeNet-300-100 on mnist5k

`python benchmarks/sparse_training.py{"" if steps == STEPS else f" --steps {steps}"}` ({len(store)} runs, {cpu / 60:.0f} min of CPU,
{wall / 60:.0f} min wall on a shared 2-core machine, {platform.processor() or "CPU"},
jax {jax.__version__}). Test accuracy (%) on the 1,000 test digits, **mean ± SD over
seeds {", ".join(map(str, SEEDS))}** (init, data order, random masks). {steps} Adam steps
(lr 1e-3, batch 128; {steps * 128 / 4000:.0f} epochs of the 4,000 training digits) per run;
ERK over the layers for every sparse row.{lottery if any("lottery/" in k for k in store) else ""}

{table_markdown(store, sparsities)}

An ordering "holds" when the difference of the means exceeds the sum of the two SDs,
and is "within noise" otherwise (the binomial SD of one accuracy near 90% on 1,000
digits is itself about 0.9 points).

## Every run

{per_seed_markdown(store)}
"""
  fileio.write_text(path, text)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
  parser.add_argument("--steps", type=int, default=STEPS, help="steps per run (per round)")
  parser.add_argument("--fresh", action="store_true", help="forget the stored runs")
  parser.add_argument("--table-only", action="store_true", help="write the table, run nothing")
  args = parser.parse_args()
  name = "sparse_training" if args.steps == STEPS else f"sparse_training_{args.steps}"
  store_path = RESULTS / f"{name}.json"
  store = {} if args.fresh or not store_path.exists() else json.loads(store_path.read_text())
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
  sparsities = tuple(float(s) for s in args.sparsities.split(","))
  if not args.table_only:
    run_all(methods, sparsities, store, store_path, args.steps)
  print(write_markdown(store, SPARSITIES, RESULTS / f"{name}.md", args.steps))


if __name__ == "__main__":
  main()
