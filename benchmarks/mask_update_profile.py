"""Where one AGP mask update's time goes: its pieces jitted and timed apart.

Workload: the MLP 784-3000-1000-10 of ``masked_step.py`` (5.36M params, three kernels of
distinct shapes) and its AGP pruner (``magnitude(agp(0.9, begin=0, end=10**6,
every=10))``). The full update is ``jit(pruner.masks(params, step=10,
previous=init_masks))``, as ``masked_step.py`` times it; the pieces rebuild what it runs:

* scores: ``|w|`` with previously pruned weights set to ``-inf`` (one f32 array per kernel);
* the selection alone (``_by_shape.topk_by_shape`` on those scores), at the update's
  counts (a tail: 63, 81 and 0 weights removed) and at 90% (ties at the threshold in
  one kernel: two more passes over the positions);
* one histogram pass as the selection runs it (``_scan_blocks``, two partial
  histograms): the first (every key lands in a bin) and the second (only keys whose
  top 16 bits match: the rest are dropped);
* a compare + sum reduction over all keys (for comparison: what counting the keys
  above a threshold costs), the final compare that writes the bool masks, and
  ``Pruner._hold``'s ``where`` over the masks.

Each piece is timed in interleaved rounds (rotating order) by wall clock and by
process CPU time (both cores together: steadier than wall clock on a loaded machine).
The dense train step of ``masked_step.py`` is timed in the same rounds as the unit.

Usage::

  python benchmarks/mask_update_profile.py          # writes results/mask_update_profile.md
  python benchmarks/mask_update_profile.py --quick  # fewer rounds, writes nothing
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import masked_step
import optax
import timing

from jaxprune import select
from jaxprune._by_shape import topk_by_shape

KERNELS = ("Dense_0", "Dense_1", "Dense_2")


def _passes(first: bool):
  """One histogram pass over the keys of every kernel, as ``keep_topk_groups`` runs it."""
  bins = 1 << 16

  @jax.jit
  def run(scores):
    dropped = len(scores) * bins
    prefix = select.sortable_keys(jnp.float32(0.02)) >> 16
    counts = (jnp.zeros(dropped, jnp.int32),) * 2
    for g, x in enumerate(scores):

      def add(block, start, counts, g=g):
        u = select.sortable_keys(block)
        if first:
          idx = (u >> 16).astype(jnp.int32) + g * bins
        else:
          low = (u & jnp.uint32(0xFFFF)).astype(jnp.int32) + g * bins
          idx = jnp.where((u >> 16) == prefix, low, dropped)
        half = -(-idx.size // 2)
        return tuple(
          c.at[idx[i * half : (i + 1) * half]].add(1, mode="drop") for i, c in enumerate(counts)
        )

      counts = select._scan_blocks(jnp.ravel(x), add, counts)
    return counts

  return run


@jax.jit
def _count_above(scores):
  out = []
  for x in scores:
    out.append(jnp.sum(select.sortable_keys(x) > jnp.uint32(3 << 30), dtype=jnp.int32))
  return out


@jax.jit
def _write(scores):
  return [select.sortable_keys(x) > jnp.uint32(3 << 30) for x in scores]


@jax.jit
def _hold(masks, previous, valid):
  return [jnp.where(valid, m, p) for m, p in zip(masks, previous)]


@jax.jit
def _scores(kernels, kept):
  return [jnp.where(m, jnp.abs(k), -jnp.inf) for k, m in zip(kernels, kept)]


_select = jax.jit(topk_by_shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="3 rounds, writes nothing")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()
  rounds = args.rounds or (3 if args.quick else 15)

  params = masked_step.MLP().init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
  pruner = masked_step.agp_pruner()
  masks = pruner.init_masks(params)
  kernels = [jnp.asarray(params[k]["kernel"]) for k in KERNELS]
  kept = [masks[k]["kernel"] for k in KERNELS]
  update = jax.jit(lambda p, m, s: pruner.masks(p, step=s, previous=m))
  step = jnp.int32(masked_step.EVERY)
  flat_new = jax.tree.leaves(update(params, masks, step))
  removed_now = [int((~m).sum()) for m in flat_new if m.ndim == 2]
  scores = _scores(kernels, kept)
  tail = [jnp.int32(r) for r in removed_now]
  at_90 = [jnp.int32(round(0.9 * k.size)) for k in kernels]
  selected = _select(scores, tail)

  dense = masked_step.make_step(optax.adam(1e-3))
  opt_state = optax.adam(1e-3).init(params)
  x, y = (
    jax.random.normal(jax.random.key(1), (masked_step.BATCH, 784)),
    jnp.zeros(masked_step.BATCH, jnp.int32),
  )
  pieces = {
    "dense train step (the unit)": (dense, (params, opt_state, x, y)),
    "full update: jit(pruner.masks)": (update, (params, masks, step)),
    "scores: where(previous, abs(w), -inf)": (_scores, (kernels, kept)),
    f"selection alone, at the update's counts {removed_now}": (_select, (scores, tail)),
    "selection alone at 90% (ties: + 2 position passes)": (_select, (scores, at_90)),
    "histogram pass 1 (every key binned)": (_passes(True), (scores,)),
    "histogram pass 2 (keys outside the prefix dropped)": (_passes(False), (scores,)),
    "compare + sum over all keys (one count)": (_count_above, (scores,)),
    "final compare writing the bool masks": (_write, (scores,)),
    "_hold: where(valid, mask, previous)": (_hold, (selected, kept, jnp.bool_(True))),
  }
  for fn, fn_args in pieces.values():
    jax.block_until_ready(fn(*fn_args))
  names = list(pieces)
  wall = {n: [] for n in names}
  cpu = {n: [] for n in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      fn, fn_args = pieces[name]
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*fn_args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)

  unit = "dense train step (the unit)"
  whole = "full update: jit(pruner.masks)"
  rows = []
  for name in names:
    rows.append(
      [
        name,
        timing.ms(timing.median(wall[name])),
        timing.ms(timing.median(cpu[name])),
        f"{timing.paired_ratio(wall[name], wall[unit]):.3f}",
        f"{timing.paired_ratio(cpu[name], cpu[whole]):.2f}",
      ]
    )
  header = [
    "piece",
    "ms wall (median)",
    "ms CPU (median)",
    "dense steps (wall)",
    "of the update (CPU)",
  ]
  body = (
    f"One AGP mask update of the MLP 784-3000-1000-10 (5.36M params) of "
    f"`masked_step.py` and its pieces, each jitted and timed apart, {rounds} interleaved "
    f"rounds. 'dense steps': the median over rounds of the piece's wall time over the "
    f"dense train step's in the same round; 'of the update': its CPU time (process "
    f"time, both cores) over the full update's.\n\n" + timing.table(header, rows)
  )
  timing.report(
    "mask_update_profile",
    "Where one AGP mask update's time goes",
    body,
    write=not (args.quick or args.no_write),
  )


if __name__ == "__main__":
  main()
