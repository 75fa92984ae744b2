"""Dense vs shrunk models: params, FLOPs (XLA cost analysis) and CPU inference latency.

A VGG-style conv-BN-ReLU net and ResNet-20 (CIFAR, 32x32x3 inputs) get 50% of the
channels of every prunable group removed (summed L1 norm of the group's producer
filters, `jaxprune.surgery.channel_masks`), then `jaxprune.surgery.shrink` cuts them
out. The target is a latency speed-up of at least 0.7x the FLOP reduction.

Each model runs in 8 variants: dense / shrunk, BatchNorm as trained / folded into the
convs (`jaxprune.surgery.fold_batchnorm`, the same treatment for both), weights passed
as arguments of the compiled function (as in serving and `jaxprune eval`) / closed over
and compiled in as constants (as this benchmark did before). All are compiled once and
timed on the same input batch, interleaved round by round in a rotating order; the
table gives medians and the median of per-round ratios (and the ratio of the best
rounds, the estimate least disturbed by other load).

Two measurements explain the result: every convolution of the model compiled and timed
alone, at its shape in the model ("convolutions alone": the ceiling the conv kernels
set), and one 3x3 convolution by channel count. "convs in YNNPACK" counts the
convolutions XLA:CPU runs through YNNPACK (fused with their elementwise neighbours),
which it does only above 16 input or output channels.

  python benchmarks/surgery.py [--quick] [--no-write] [--batch 64,1] [--rounds 30]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import timing
from flax import nnx

from jaxprune import surgery
from jaxprune.train import models

LATENCY_HEADER = [
  "model", "batch", "weights", "BatchNorm", "dense ms", "shrunk ms", "FLOP reduction", "speed-up",
  "speed-up / FLOP reduction",
]  # fmt: skip
WHY = """\
Why the speed-up falls short of the FLOP reduction (XLA:CPU, jax 0.10, an AVX2 CPU):

* The convolution kernels lose efficiency at small channel counts: a 3x3 conv with 8
  channels (one AVX2 vector) runs at a fraction of the GFLOP/s of one with 24 or more
  (last table). Halving the channels quarters a conv's FLOPs but, at 16 -> 8 channels,
  not its time. ResNet-20's first stage (16 channels, 7 of its 19 3x3 convs) becomes 8
  channels wide, its second 16. The "convolutions alone" rows time every conv of the
  model on its own, at its shape: their speed-up / FLOP reduction is the ceiling the
  kernels set, around the target at batch 64 and far below it at batch 1; the whole
  models land below that ceiling for the next two reasons.
* XLA:CPU fuses a convolution with its BatchNorm, ReLU and residual add inside YNNPACK
  only above 16 channels; smaller ones run XLA's own convolution followed by separate
  elementwise passes over memory. The shrunk ResNet-20 has 14 of its 21 convs on that
  path (the dense one 7); the shrunk VGG 2 of 6 (the dense one none).
* Elementwise work (BatchNorm, ReLU, residual adds) scales with the activations, which
  halve, not with the FLOPs, which quarter.
* Weights compiled in as constants let XLA reduce an eval-mode BatchNorm to one
  multiply-add per channel at compile time. Passed as arguments, the BatchNorm's
  subtract, rsqrt, multiply and add stay in the program, inside the YNNPACK fusions,
  and cost the wide dense models much more than the shrunk ones (compare their dense
  ms): the shrunk/dense ratios with weights as arguments then flatter the shrunk
  model. Compiled-in weights are the like-for-like comparison.
* Folding BatchNorm into the convs (same treatment for dense and shrunk) gives an
  equivalent model: with compiled-in weights XLA already did the equivalent arithmetic
  and folding saves little; with weights as arguments it removes the BatchNorm
  arithmetic, which helps the dense models most (the folding table). Either way it
  does not close the gap the convolutions leave.
"""
MODELS = ("dense", "shrunk")
BN = ("as trained", "folded")
WEIGHTS = ("arguments", "constants")


def compile_forward(model, x, weights):
  """The jitted eval-mode forward pass compiled for ``x``: ``(lowered, call)``.

  ``weights="arguments"``: the params are arguments of the compiled function (as in
  serving, and in ``jaxprune eval``); ``"constants"``: they are closed over, and XLA
  compiles them in as constants.
  """
  graphdef, state = nnx.split(model)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  if weights == "arguments":
    lowered = jax.jit(forward).lower(state, x)
    exe = lowered.compile()
    return lowered, lambda: exe(state, x)
  lowered = jax.jit(lambda x: forward(state, x)).lower(x)
  exe = lowered.compile()
  return lowered, lambda: exe(x)


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def ynn_convs(lowered, compiled) -> str:
  """``"k/n"``: convolutions XLA:CPU runs inside YNNPACK fusions, of all of them."""
  total = lowered.as_text().count("stablehlo.convolution")
  entry = compiled.as_text().split("ENTRY", 1)[-1]
  fallback = len(re.findall(r"= \S+ convolution\(", entry))
  return f"{total - fallback}/{total}"


def conv_calls(model, x) -> list:
  """``(equation, input, kernel)`` of every convolution in the model's forward pass."""
  graphdef, state = nnx.split(model)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        found.append((eqn, jnp.ones(lhs.shape, lhs.dtype), jnp.ones(rhs.shape, rhs.dtype)))
      for sub in (eqn.params.get("jaxpr"), eqn.params.get("call_jaxpr")):
        if sub is not None:
          walk(getattr(sub, "jaxpr", sub))

  walk(jax.make_jaxpr(forward)(state, x).jaxpr)
  return found


def convs_alone(calls, rounds) -> tuple[float, float]:
  """Seconds and FLOPs of the model's convolutions, each compiled and timed alone."""
  seconds = flop = 0.0
  for eqn, lhs, rhs in calls:
    exe = jax.jit(lambda a, b, eqn=eqn: eqn.primitive.bind(a, b, **eqn.params))
    exe = exe.lower(lhs, rhs).compile()
    flop += flops(exe)
    jax.block_until_ready(exe(lhs, rhs))
    run = {"conv": lambda exe=exe, a=lhs, b=rhs: jax.block_until_ready(exe(a, b))}
    seconds += timing.median(timing.interleaved(run, rounds)["conv"])
  return seconds, flop


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def variants(model):
  """The dense and shrunk model, each as trained and with BatchNorm folded."""
  x = jnp.zeros((1, 32, 32, 3))
  plan = surgery.plan(model, example_input=x)
  masks = surgery.channel_masks(plan, nnx.state(model, nnx.Param), 0.5)
  shrunk = surgery.shrink(model, masks=masks, example_input=x)
  nets = {("dense", "as trained"): model, ("shrunk", "as trained"): shrunk.model}
  for kind in MODELS:
    nets[kind, "folded"] = surgery.fold_batchnorm(nets[kind, "as trained"], x)
  return nets, shrunk.max_error


def architecture(name, nets):
  """Rows of the architecture table: params, MFLOPs per image, convs in YNNPACK."""
  x = jnp.zeros((1, 32, 32, 3))
  rows, mflops = [], {}
  for (kind, bn), net in nets.items():
    lowered, _ = compile_forward(net, x, "arguments")
    compiled = lowered.compile()
    mflops[kind, bn] = flops(compiled) / 1e6
    rows.append([
      name, f"{kind}, BN {bn}", f"{n_params(net):,}", f"{mflops[kind, bn]:.1f}",
      ynn_convs(lowered, compiled),
    ])  # fmt: skip
  return rows, mflops


def measure(name, nets, mflops, batch, rounds):
  """Latency rows for one model and batch size, the efficiencies, the folding error and
  the speed-ups that folding gives."""
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  runs, outs = {}, {}
  for (kind, bn), net in nets.items():
    for weights in WEIGHTS:
      _, call = compile_forward(net, x, weights)
      runs[kind, bn, weights] = lambda call=call: jax.block_until_ready(call())
      outs[kind, bn, weights] = call()
  scale = max(1.0, float(jnp.abs(outs["dense", "as trained", "arguments"]).max()))
  fold_error = max(
    float(jnp.abs(outs[k, "as trained", w] - outs[k, "folded", w]).max()) / scale
    for k in MODELS
    for w in WEIGHTS
  )
  times = timing.interleaved(runs, rounds)
  rows, efficiency = [], {}
  for weights in WEIGHTS:
    for bn in BN:
      dense, small = times["dense", bn, weights], times["shrunk", bn, weights]
      reduction = mflops["dense", bn] / mflops["shrunk", bn]
      speedup = timing.paired_ratio(dense, small)
      best = min(dense) / min(small)
      efficiency[weights, bn] = (speedup / reduction, best / reduction)
      rows.append([
        name, batch, weights, bn, timing.ms(timing.median(dense)),
        timing.ms(timing.median(small)), f"{reduction:.2f}x",
        f"**{speedup:.2f}x** ({best:.2f}x)",
        f"**{speedup / reduction:.2f}** ({best / reduction:.2f})",
      ])  # fmt: skip
  alone = {k: convs_alone(conv_calls(nets[k, "as trained"], x), rounds) for k in MODELS}
  (t_dense, f_dense), (t_small, f_small) = alone["dense"], alone["shrunk"]
  rows.append([
    name, batch, "(convolutions alone)", "", timing.ms(t_dense), timing.ms(t_small),
    f"{f_dense / f_small:.2f}x", f"{t_dense / t_small:.2f}x",
    f"{t_dense / t_small / (f_dense / f_small):.2f}",
  ])  # fmt: skip
  gains = {
    (kind, w): timing.paired_ratio(times[kind, "as trained", w], times[kind, "folded", w])
    for kind in MODELS
    for w in WEIGHTS
  }
  return rows, efficiency, fold_error, gains


def conv_efficiency(batch, rounds):
  """GFLOP/s of one 3x3 SAME conv, C -> C channels, by channel count and size."""
  rows = []
  for size in (32, 16):
    row = [f"{size}x{size}"]
    for c in (8, 16, 24, 32, 64):
      x, k = jnp.ones((batch, size, size, c)), jnp.ones((3, 3, c, c))
      conv = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(
          x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
      )
      exe = conv.lower(x, k).compile()
      jax.block_until_ready(exe(x, k))
      t = timing.median(
        timing.interleaved(
          {"conv": lambda exe=exe, x=x, k=k: jax.block_until_ready(exe(x, k))}, rounds
        )["conv"]
      )
      row.append(f"{2 * batch * size * size * 9 * c * c / t / 1e9:.0f}")
    rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small batch, few rounds")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  parser.add_argument(
    "--batch", default=None, help="images per call, comma-separated (default 64,1)"
  )
  parser.add_argument(
    "--rounds", type=int, default=None, help="timing rounds at batch 64 (default 30)"
  )
  args = parser.parse_args()
  batches, rounds = ("8", 5) if args.quick else ("64,1", 30)
  batches = [int(b) for b in (args.batch or batches).split(",")]
  rounds = args.rounds or rounds
  cases = [
    (
      "VGG-style (32,32,M,64,64,M,128,128)",
      models.VGG((32, 32, "M", 64, 64, "M", 128, 128), 3, 10, rngs=nnx.Rngs(0)),
    ),
    ("ResNet-20", models.create("resnet20", (32, 32, 3), 10)),
  ]
  arch_rows, latency_rows, notes, fold_rows = [], [], [], []
  worst: dict[tuple, tuple[float, float]] = {}
  for name, model in cases:
    nets, max_error = variants(model)
    arch, mflops = architecture(name, nets)
    arch_rows += arch
    fold_error = 0.0
    for batch in batches:
      # small batches are fast and noisy: more rounds, about the same time
      n = min(10 * rounds, max(rounds, rounds * 64 // (8 * batch)))
      rows, efficiency, error, gains = measure(name, nets, mflops, batch, n)
      latency_rows += rows
      fold_rows.append([name, batch, n] + [f"{gains[k, w]:.2f}x" for w in WEIGHTS for k in MODELS])
      fold_error = max(fold_error, error)
      for (w, bn), (median, best) in efficiency.items():
        old = worst.get((batch, w, bn), (float("inf"), float("inf")))
        worst[batch, w, bn] = (min(old[0], median), min(old[1], best))
    notes.append(
      f"{name}: shrink's check max |diff| {max_error:.1e}; folded vs as trained, max "
      f"|diff| / max |output| {fold_error:.1e}"
    )
  verdicts = "\n".join(
    f"* batch {b}, weights as {w}, BatchNorm {bn}: "
    + timing.verdict(median >= 0.7, best >= 0.7)
    + f" (worst {median:.2f}, best rounds {best:.2f})"
    for (b, w, bn), (median, best) in worst.items()
  )
  conv_rows = conv_efficiency(batches[0], max(5, rounds // 3))
  body = (
    "50% of the channels of every prunable group removed; 32x32x3 inputs; jitted "
    "forward in eval mode; the 8 variants of a model (dense / shrunk, BatchNorm as "
    "trained / folded into the convs, weights passed as arguments / compiled in as "
    "constants) timed on the same input, interleaved round by round (more rounds for "
    "smaller batches). Latencies are medians; speed-ups the median of per-round ratios, "
    "in brackets the ratio of the best rounds.\n\n"
    + timing.table(["model", "variant", "params", "MFLOPs / image", "convs in YNNPACK"], arch_rows)
    + "\n\n"
    + timing.table(LATENCY_HEADER, latency_rows)
    + "\n\nSpeed-up from folding BatchNorm (as trained / folded, median of per-round ratios), "
    "and the timing rounds:\n\n"
    + timing.table(
      ["model", "batch", "rounds"] + [f"{k}, weights as {w}" for w in WEIGHTS for k in MODELS],
      fold_rows,
    )
    + "\n\nTarget (latency speed-up >= 0.7x the FLOP reduction):\n\n"
    + verdicts
    + "\n\n"
    + "; ".join(notes)
    + ".\n\nOne 3x3 conv, C -> C channels, alone (GFLOP/s, batch "
    + f"{batches[0]}; XLA:CPU uses YNNPACK only above 16 channels):\n\n"
    + timing.table(["input", "C=8", "C=16", "C=24", "C=32", "C=64"], conv_rows)
    + "\n\n"
    + WHY
  )
  timing.report("surgery", "Structural surgery: dense vs shrunk", body, write=not args.no_write)


if __name__ == "__main__":
  main()
