"""jaxpruner side by side with jaxprune inside a training step: time per step over dense.

Workload and timing are those of ``masked_step.py`` (MLP 784-3000-1000-10, 5.36M params,
batch 128, Adam(1e-3), CPU; windows of 100 steps interleaved round by round, the ratio
is the median over rounds of the window's time over the dense window's in the same
round). Variants, all at 90% sparsity of the three kernels:

* dense: ``optax.adam(1e-3)``;
* AGP every 10: jaxprune ``masked(adam, magnitude(agp(0.9, 0, 10**6, every=10)))``;
  jaxpruner ``MagnitudePruning`` with ``PolynomialSchedule(update_freq=10,
  update_start_step=0, update_end_step=10**6)`` (cubic, as AGP);
* SET / RigL every 100: jaxprune ``set_sparse`` / ``rigl(adam, 0.9, end=10**6,
  every=100)`` (drop fraction 0.3); jaxpruner ``SET`` / ``RigL`` with
  ``PeriodicSchedule(update_freq=100, update_start_step=0, update_end_step=10**6)``
  (drop fraction 0.3); their biases get sparsity 0 rather than ``None`` (masks of all
  ones): with ``None`` masks their mask update fails on this jax (``jax.tree.map`` no
  longer takes ``None`` as a prefix of an array).

Each library is used as its README shows: jaxprune's transform alone; jaxpruner's
``wrap_optax(adam)`` and ``post_gradient_update(params, state)`` after
``optax.apply_updates``.

jaxpruner runs from its own source (no package for this Python): pass ``--jaxpruner DIR``
or set ``JAXPRUNER_SRC`` to a checkout of ``github.com/google-research/jaxpruner``, and run
this script with a Python that also has chex (see ``compile_time.py``). Its code calls
``jax.tree_map``, removed in jax 0.6: with a newer jax the alias ``jax.tree_map =
jax.tree_util.tree_map`` is set before importing it (its files are not changed).

Usage::

  JAXPRUNER_SRC=/tmp/jaxpruner PYTHONPATH=. .venv-jaxpruner/bin/python \
    benchmarks/jaxpruner_step.py            # writes benchmarks/results/jaxpruner_step.md
  ... benchmarks/jaxpruner_step.py --quick  # one short round, writes nothing
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import jax
import optax
import timing
from masked_step import BATCH, EVERY, MLP, SPARSE_EVERY, Trainer, agp_pruner, loss_fn, make_step

import jaxprune
from jaxprune.sparse import rigl, set_sparse

END = 10**6


def load_jaxpruner(src: str | None):
  """The ``jaxpruner`` module from the source checkout ``src``, or ``None`` with a message."""
  if not src or not (Path(src) / "jaxpruner" / "__init__.py").exists():
    print(
      f"jaxpruner: skipped (no source at {src!r}). Clone github.com/google-research/jaxpruner "
      "and pass --jaxpruner DIR or set JAXPRUNER_SRC.",
      flush=True,
    )
    return None
  if not hasattr(jax, "tree_map"):  # removed in jax 0.6; jaxpruner calls it
    jax.tree_map = jax.tree_util.tree_map  # type: ignore[attr-defined]
  sys.path.insert(0, str(src))
  try:
    import jaxpruner  # noqa: PLC0415 (optional, from a path given at run time)
  except ImportError as e:
    print(f"jaxpruner: skipped ({e}; it needs chex, flax and ml_collections).", flush=True)
    return None
  return jaxpruner


class JaxprunerTrainer(Trainer):
  """A jaxpruner variant: ``post_gradient_update`` after the update, as its README does."""

  def __init__(self, updater, params, batches):
    tx = updater.wrap_optax(optax.adam(1e-3))

    @jax.jit
    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = updater.post_gradient_update(optax.apply_updates(params, updates), opt_state)
      return params, opt_state, loss

    self.step = step
    self.params = jax.tree.map(jax.numpy.copy, params)
    self.opt_state = tx.init(self.params)
    self.batches = batches
    self.i = 0


def variants(params, batches, jp) -> dict[str, Trainer]:
  ours = {
    "dense": optax.adam(1e-3),
    "jaxprune AGP every 10": jaxprune.masked(optax.adam(1e-3), agp_pruner()),
    "jaxprune SET every 100": set_sparse(optax.adam(1e-3), 0.9, end=END, every=SPARSE_EVERY),
    "jaxprune RigL every 100": rigl(optax.adam(1e-3), 0.9, end=END, every=SPARSE_EVERY),
  }
  out: dict[str, Trainer] = {n: _plain(tx, params, batches) for n, tx in ours.items()}
  if jp is None:
    return out
  uniform = functools.partial(jp.sparsity_distributions.uniform, sparsity=0.9)

  # SET/RigL map over (masks, scores) with the masks first: a None mask (jaxpruner's
  # default for 1-D params) is an error in jax.tree.map on this jax (deprecated since jax
  # 0.4.29: None is a prefix only of None), so the biases get sparsity 0 (an all-ones
  # mask) instead of None.
  def biases_at_0(params):
    return jax.tree.map(lambda p: 0.9 if p.ndim > 1 else 0.0, params)

  periodic = jp.PeriodicSchedule(update_freq=SPARSE_EVERY, update_start_step=0, update_end_step=END)
  theirs = {
    "jaxpruner AGP every 10": jp.MagnitudePruning(
      sparsity_distribution_fn=uniform,
      scheduler=jp.PolynomialSchedule(update_freq=EVERY, update_start_step=0, update_end_step=END),
    ),
    "jaxpruner SET every 100": jp.SET(sparsity_distribution_fn=biases_at_0, scheduler=periodic),
    "jaxpruner RigL every 100": jp.RigL(sparsity_distribution_fn=biases_at_0, scheduler=periodic),
  }
  out.update({n: JaxprunerTrainer(u, params, batches) for n, u in theirs.items()})
  return out


def _plain(tx, params, batches) -> Trainer:
  trainer = Trainer.__new__(Trainer)
  trainer.step = make_step(tx)
  trainer.params = jax.tree.map(jax.numpy.copy, params)
  trainer.opt_state = tx.init(trainer.params)
  trainer.batches, trainer.i = batches, 0
  return trainer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--jaxpruner", default=os.environ.get("JAXPRUNER_SRC"))
  parser.add_argument("--quick", action="store_true", help="smoke run: one short round")
  parser.add_argument("--rounds", type=int, default=None, help="timed windows per variant")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()
  window = SPARSE_EVERY
  rounds = args.rounds or (1 if args.quick else 6)
  jp = load_jaxpruner(args.jaxpruner)

  params = MLP().init(jax.random.key(0), jax.numpy.zeros((1, 784)))["params"]
  batches = []
  for k in jax.random.split(jax.random.key(1), 8):
    kx, ky = jax.random.split(k)
    batches.append((jax.random.normal(kx, (BATCH, 784)), jax.random.randint(ky, (BATCH,), 0, 10)))
  trainers = variants(params, batches, jp)
  for trainer in trainers.values():  # compile, warm up past the first mask update
    trainer.run(1 + window)
  times = timing.interleaved({n: (lambda t=t: t.run(window)) for n, t in trainers.items()}, rounds)
  per_step = {n: [s / window for s in ts] for n, ts in times.items()}

  sparsities = {}
  for name, trainer in trainers.items():
    kernels = [x for x in jax.tree.leaves(trainer.params) if x.ndim == 2]
    sparsities[name] = sum(int((x == 0).sum()) for x in kernels) / sum(x.size for x in kernels)
  rows = []
  for name, ts in per_step.items():
    rows.append(
      [
        name,
        timing.ms(timing.median(ts)),
        f"**{timing.paired_ratio(ts, per_step['dense']):.3f}x**",
        f"{min(ts) / min(per_step['dense']):.3f}x",
        f"{sparsities[name]:.3f}",
      ]
    )
  load = os.getloadavg()[0]
  body = (
    f"A jitted train step of an MLP 784-3000-1000-10 (5.36M params), batch {BATCH}, "
    f"Adam(1e-3), CPU, {rounds} interleaved rounds of {window}-step windows per variant "
    f"(each AGP window holds {window // EVERY} mask updates, each SET/RigL window one), "
    f"after {1 + window} warm-up steps. 'vs dense': median over rounds of the window's "
    "time over the dense window's in the same round; 'best': ratio of the fastest windows; "
    "'zeros': fraction of zero kernel weights after the run (AGP is still near 0 sparsity "
    f"at these steps of a 10**6-step schedule). Load average at the end: {load:.1f} on "
    f"{os.cpu_count()} cores."
    + ("" if jp else " jaxpruner was not found: its rows are missing.")
    + "\n\n"
    + timing.table(["variant", "ms / step (median)", "vs dense", "vs dense (best)", "zeros"], rows)
  )
  timing.report(
    "jaxpruner_step",
    "jaxpruner inside a training step",
    body,
    write=not (args.quick or args.no_write),
  )


if __name__ == "__main__":
  main()
