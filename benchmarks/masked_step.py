"""The cost of pruning inside training: a jitted Adam step, dense vs ``jaxprune.masked``.

Workload: an MLP 784-3000-1000-10 (Flax Linen, 5.36M params), batch 128,
cross-entropy, Adam(1e-3), on the CPU. Each variant is one jitted train step (grad,
``tx.update``, ``optax.apply_updates``):

* dense: ``optax.adam(1e-3)``;
* fixed masks: ``jaxprune.masked(adam, jaxprune.magnitude(0.9))``: masks computed at
  step 0, then fixed (the timed steps all come after the first);
* fixed mask pytree: ``jaxprune.masked(adam, masks)`` with the same masks given as a
  pytree (``magnitude(0.9).masks(params)``): no mask-update branch at all, the cost the
  row above should match;
* AGP every 10: ``jaxprune.masked(adam, jaxprune.magnitude(jaxprune.agp(0.9, begin=0,
  end=10**6, every=10)))``: masks recomputed every 10th step;
* SET / RigL every 100: ``jaxprune.sparse.set_sparse`` / ``rigl(adam, 0.9, end=10**6,
  every=100)``: 90% sparse from the start, drop and regrow every 100th step (dT = 100).

Steps are timed in windows of consecutive steps (a multiple of 100, so every window
holds the same number of mask updates, amortised as in training); the variants' windows
are interleaved round by round in a rotating order. The table gives the median time
per step and its ratio to dense.

Usage::

  python benchmarks/masked_step.py          # writes benchmarks/results/masked_step.md
  python benchmarks/masked_step.py --quick  # short windows, few rounds, writes nothing
  python benchmarks/masked_step.py --no-write
"""

from __future__ import annotations

import argparse
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing

import jaxprune
from jaxprune.sparse import rigl, set_sparse

BATCH = 128
EVERY = 10  # AGP: steps between mask updates
SPARSE_EVERY = 100  # SET / RigL: dT
TARGETS = {
  "fixed masks": 1.03,
  "fixed mask pytree": 1.03,
  "AGP every 10": 1.03,
  "SET every 100": 1.05,
  "RigL every 100": 1.05,
}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(3000)(x))
    x = nn.relu(nn.Dense(1000)(x))
    return nn.Dense(10)(x)


def agp_pruner() -> jaxprune.Pruner:
  return jaxprune.magnitude(jaxprune.agp(0.9, begin=0, end=10**6, every=EVERY))


def optimizers(params) -> dict[str, optax.GradientTransformation]:
  return {
    "dense": optax.adam(1e-3),
    "fixed masks": jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(0.9)),
    "fixed mask pytree": jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(0.9).masks(params)),
    "AGP every 10": jaxprune.masked(optax.adam(1e-3), agp_pruner()),
    "SET every 100": set_sparse(optax.adam(1e-3), 0.9, end=10**6, every=SPARSE_EVERY),
    "RigL every 100": rigl(optax.adam(1e-3), 0.9, end=10**6, every=SPARSE_EVERY),
  }


def loss_fn(params, x, y):
  logits = MLP().apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx: optax.GradientTransformation):
  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


_COPY = re.compile(r"= (f32|s32|u32|pred)\[([\d,]*)\]\S* copy\(")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1}
_CALLS = re.compile(r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _computations(compiled_text: str) -> dict[str, list[str]]:
  """The compiled module's computations by name (``ENTRY`` for the entry), as lines."""
  out, name = {}, None
  for line in compiled_text.splitlines():
    if line and not line.startswith(" ") and ("{" in line):
      name = "ENTRY" if line.startswith("ENTRY") else line.split(" ")[0]
      out[name] = []
    elif name is not None:
      out[name].append(line)
  return out


def copied_mb(compiled_text: str, min_elements: int = 100_000) -> tuple[float, float]:
  """MB moved by the large ``copy`` ops XLA inserted: on every step, and on update steps only.

  A step's mask update sits in a ``conditional`` whose branch 0 (no update) runs on
  every other step; copies reached only through the other branches (the update) are
  counted apart.
  """
  comps = _computations(compiled_text)

  def reach(start: str, every_step: bool) -> set[str]:
    seen, todo = set(), [start]
    while todo:
      name = todo.pop()
      if name in seen or name not in comps:
        continue
      seen.add(name)
      for line in comps[name]:
        todo += _CALLS.findall(line)
        for group in _BRANCHES.findall(line):
          branches = [b.strip() for b in group.split(",")]
          todo += branches[:1] if every_step else branches
    return seen

  def mb(names: set[str]) -> float:
    total = 0
    for name in names:
      for line in comps[name]:
        for dtype, dims in _COPY.findall(line):
          size = int(np.prod([int(d) for d in dims.split(",") if d]))
          if size >= min_elements:
            total += size * _BYTES[dtype]
    return total / 1e6

  every, anywhere = reach("ENTRY", True), reach("ENTRY", False)
  return mb(every), mb(anywhere - every)


class Trainer:
  """One variant's jitted step, params, optimizer state and position in the batches."""

  def __init__(self, tx, params, batches):
    self.step = make_step(tx)
    self.params = jax.tree.map(jnp.copy, params)
    self.opt_state = tx.init(self.params)
    self.batches = batches
    self.i = 0
    x, y = batches[0]
    self.copied_mb, self.copied_mb_update = copied_mb(
      self.step.lower(self.params, self.opt_state, x, y).compile().as_text()
    )

  def run(self, steps: int) -> None:
    for _ in range(steps):
      x, y = self.batches[self.i % len(self.batches)]
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, x, y)
      self.i += 1
    jax.block_until_ready((self.params, self.opt_state, loss))


def mask_refresh(params):
  """One AGP mask update alone (scores + selection on all kernels), jitted and warm."""
  pruner = agp_pruner()
  refresh = jax.jit(lambda p, m, step: pruner.masks(p, step=step, previous=m))
  masks = pruner.init_masks(params)
  step = jnp.int32(EVERY)

  def run():
    jax.block_until_ready(refresh(params, masks, step))

  run()
  return run


def rigl_update_at(params, batches, step: int):
  """``tx.update`` of RigL alone at ``step`` (100: drop and regrow; 101: a plain step), warm."""
  tx = rigl(optax.adam(1e-3), 0.9, end=10**6, every=SPARSE_EVERY)
  state = tx.init(params)._replace(count=jnp.int32(step))
  grads = jax.grad(loss_fn)(params, *batches[0])
  update = jax.jit(tx.update)

  def run():
    jax.block_until_ready(update(grads, state, params))

  run()
  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke run: short windows")
  parser.add_argument("--window", type=int, default=None, help="steps per timed window")
  parser.add_argument("--rounds", type=int, default=None, help="timed windows per variant")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()
  window = args.window or SPARSE_EVERY
  rounds = args.rounds or (1 if args.quick else 8)
  if window % SPARSE_EVERY:
    parser.error(f"--window must be a multiple of {SPARSE_EVERY} (equal mask updates per window).")

  key = jax.random.key(0)
  params = MLP().init(key, jnp.zeros((1, 784)))["params"]
  batches = []
  for k in jax.random.split(jax.random.key(1), 8):
    kx, ky = jax.random.split(k)
    batches.append((jax.random.normal(kx, (BATCH, 784)), jax.random.randint(ky, (BATCH,), 0, 10)))

  trainers = {name: Trainer(tx, params, batches) for name, tx in optimizers(params).items()}
  for trainer in trainers.values():  # compile, step 0 (the fixed masks), warm up
    trainer.run(1 + window)
  runs = {n: (lambda t=t: t.run(window)) for n, t in trainers.items()}
  extra = {
    "mask update": mask_refresh(params),
    "rigl update step": rigl_update_at(params, batches, SPARSE_EVERY),
    "rigl plain step": rigl_update_at(params, batches, SPARSE_EVERY + 1),
  }
  times = timing.interleaved({**runs, **extra}, rounds)
  refresh = times.pop("mask update")
  rigl_on, rigl_off = times.pop("rigl update step"), times.pop("rigl plain step")
  per_step = {n: [s / window for s in ts] for n, ts in times.items()}
  refresh_in_steps = timing.paired_ratio(refresh, per_step["dense"])
  regrow = [a - b for a, b in zip(rigl_on, rigl_off)]
  regrow_in_steps = timing.median([r / d for r, d in zip(regrow, per_step["dense"])])

  kernels = [x for x in jax.tree.leaves(trainers["fixed masks"].params) if x.ndim == 2]
  sparsity = sum(int((x == 0).sum()) for x in kernels) / sum(x.size for x in kernels)
  assert abs(sparsity - 0.9) < 1e-3, sparsity
  for name in ("SET every 100", "RigL every 100"):
    kernels = [x for x in jax.tree.leaves(trainers[name].params) if x.ndim == 2]
    zeros = sum(int((x == 0).sum()) for x in kernels) / sum(x.size for x in kernels)
    assert zeros >= 0.9 - 1e-6, (name, zeros)

  dense_min = min(per_step["dense"])
  rows, verdicts = [], []
  for name, ts in per_step.items():
    ratio = timing.paired_ratio(ts, per_step["dense"])
    target = TARGETS.get(name)
    rows.append(
      [
        name,
        timing.ms(timing.median(ts)),
        timing.ms(min(ts)),
        f"**{ratio:.3f}x**",
        f"{min(ts) / dense_min:.3f}x",
        f"<= {target:.2f}x" if target else "",
        f"{trainers[name].copied_mb:.0f}",
        f"{trainers[name].copied_mb_update:.0f}",
      ]
    )
    if target:
      best = min(ts) / dense_min
      verdict = timing.verdict(ratio <= target, best <= target)
      verdicts.append(f"{name} {ratio:.3f}x (best {best:.3f}x) vs <= {target:.2f}x: {verdict}")
  header = [
    "variant",
    "ms / step (median)",
    "ms / step (min)",
    "vs dense",
    "vs dense (best)",
    "target",
    "MB copied / step",
    "+ MB on update steps",
  ]
  body = (
    f"A jitted train step (grad + `tx.update` + `optax.apply_updates`) of an MLP "
    f"784-3000-1000-10 (5.36M params), batch {BATCH}, Adam(1e-3), CPU. {rounds} "
    f"interleaved rounds of {window}-step windows per variant (each AGP window holds "
    f"{window // EVERY} AGP and {window // SPARSE_EVERY} SET/RigL mask update(s)); fixed "
    f"masks, SET and RigL are 90% sparse (checked: "
    f"{sparsity:.4f}). 'vs dense': the median over rounds of the window's time over "
    f"the dense window's time in the same round; 'best': ratio of the fastest "
    f"windows. 'MB copied / step': bytes moved by the large `copy` ops XLA "
    f"inserted into the compiled step that run on every step (outside the mask "
    f"update's branch); '+ MB on update steps': those inside it only.\n\n"
    + timing.table(header, rows)
    + f"\n\nOne AGP mask update alone (`jit(pruner.masks)`: scores and selection on "
    f"the 5.36M params, timed in the same rounds): {timing.ms(timing.median(refresh))} ms "
    f"= {refresh_in_steps:.2f} dense steps, i.e. +{refresh_in_steps / EVERY:.1%} per step "
    f"when amortised over {EVERY} steps (target: <= 0.2 dense steps: "
    f"{'met' if refresh_in_steps <= 0.2 else 'MISSED'}). One RigL mask update (drop by |w|, regrow by "
    f"|g| on every kernel: `tx.update` at step 100 minus `tx.update` at step 101, "
    f"median over rounds): {timing.ms(timing.median(regrow))} ms = "
    f"{regrow_in_steps:.2f} dense steps, i.e. +{regrow_in_steps / SPARSE_EVERY:.2%} per "
    f"step amortised over dT = {SPARSE_EVERY}.\n\nTargets: " + "; ".join(verdicts) + "."
  )
  timing.report(
    "masked_step", "Pruning inside a training step", body, write=not (args.quick or args.no_write)
  )


if __name__ == "__main__":
  main()
