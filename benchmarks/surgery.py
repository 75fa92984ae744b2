"""Dense vs shrunk models: params, FLOPs (XLA cost analysis) and CPU inference latency.

A VGG-style conv-BN-ReLU net and ResNet-20 (CIFAR, 32x32x3 inputs) get 50% of the
channels of every prunable group removed (summed L1 norm of the group's producer
filters, `jaxprune.surgery.channel_masks`), then `jaxprune.surgery.shrink` cuts them
out. Both models are jitted and timed side by side, interleaved; the target is a
latency speed-up of at least 0.7x the FLOP reduction.

  python benchmarks/surgery.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse

import jax
import timing
from flax import nnx

from jaxprune import surgery
from jaxprune.train import models


def flops(fn, x) -> float:
  cost = jax.jit(fn).lower(x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  return run


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def measure(name, model, batch, rounds):
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  plan = surgery.plan(model, example_input=x[:1])
  masks = surgery.channel_masks(plan, nnx.state(model, nnx.Param), 0.5)
  small = surgery.shrink(model, masks=masks, example_input=x[:1])
  dense_fn, small_fn = forward(model), forward(small.model)
  f_dense, f_small = flops(dense_fn, x), flops(small_fn, x)
  jax.block_until_ready((dense_fn(x), small_fn(x)))
  times = timing.interleaved(
    {
      "dense": lambda: jax.block_until_ready(dense_fn(x)),
      "shrunk": lambda: jax.block_until_ready(small_fn(x)),
    },
    rounds,
  )
  speedup = timing.paired_ratio(times["dense"], times["shrunk"])
  flop_ratio = f_dense / f_small
  return [
    name,
    f"{n_params(model):,} -> {n_params(small.model):,}",
    f"{f_dense / 1e9:.3f} -> {f_small / 1e9:.3f}",
    f"{flop_ratio:.2f}x",
    f"{timing.ms(timing.median(times['dense']))} -> {timing.ms(timing.median(times['shrunk']))}",
    f"**{speedup:.2f}x**",
    f"{speedup / flop_ratio:.2f}",
    f"{small.max_error:.1e}",
  ], speedup / flop_ratio


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small batch, few rounds")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()
  batch, rounds = (8, 5) if args.quick else (64, 30)
  cases = [
    (
      "VGG-style (32,32,M,64,64,M,128,128)",
      models.VGG((32, 32, "M", 64, 64, "M", 128, 128), 3, 10, rngs=nnx.Rngs(0)),
    ),
    ("ResNet-20", models.create("resnet20", (32, 32, 3), 10)),
  ]
  rows, worst = [], float("inf")
  for name, model in cases:
    row, efficiency = measure(name, model, batch, rounds)
    rows.append(row)
    worst = min(worst, efficiency)
  header = [
    "model",
    "params",
    "GFLOPs (batch)",
    "FLOP reduction",
    "latency ms",
    "speed-up",
    "speed-up / FLOP reduction",
    "max |diff|",
  ]
  verdict = "met" if worst >= 0.7 else "missed"
  body = (
    f"50% of the channels of every prunable group removed, batch {batch} of 32x32x3, "
    f"jitted forward in eval mode, {rounds} interleaved rounds (median). max |diff| is "
    "the shrunk vs masked model's output difference found by `shrink`'s check.\n\n"
    + timing.table(header, rows)
    + f"\n\nTarget (latency speed-up >= 0.7x the FLOP reduction): {verdict} (worst {worst:.2f})."
  )
  timing.report("surgery", "Structural surgery: dense vs shrunk", body, write=not args.no_write)


if __name__ == "__main__":
  main()
