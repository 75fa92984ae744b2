"""Exact top-k masks: jaxprune's radix select against an argsort, at 100K to 10M scores.

The argsort baseline is what jaxpruner does for an unstructured top-k mask: a stable
descending ``jnp.argsort`` of the flat scores, the k-th entry's value as threshold, and
ties at the threshold kept by position (the lower flat index first). For the global
scope it sorts the concatenation of all leaves. Both sides are jitted; the masks must
be identical, also on scores with many ties.

Usage::

  python benchmarks/topk.py          # 100K, 1M and 10M; writes benchmarks/results/topk.md
  python benchmarks/topk.py --quick  # 100K and 1M, fewer rounds, writes nothing
  python benchmarks/topk.py --no-write
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import timing

import jaxprune
from jaxprune.select import n_keep

SPARSITY = 0.9
TARGET = 100  # speed-up over argsort at 10M random normal scores, both scopes
# Leaf sizes as fractions of the total, like the layers of a real model (at 10M scores:
# 2.35M, 3M and 4.65M).
GLOBAL_FRACTIONS = (0.235, 0.3, 0.465)


def leaf_shapes(n: int, scope: str) -> list[tuple[int, int]]:
  cols = 1000 if n >= 1_000_000 else 100
  if scope == "layer":
    return [(n // cols, cols)]
  return [(round(f * n) // cols, cols) for f in GLOBAL_FRACTIONS]


@functools.partial(jax.jit, static_argnums=1)
def argsort_masks(leaves: list[jax.Array], sparsity: float) -> list[jax.Array]:
  """Exact top-k masks from one stable argsort over all leaves (jaxpruner's method)."""
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
  k = n_keep(flat.size, sparsity)
  order = jnp.argsort(-flat, stable=True)
  last = order[k - 1]  # flat position of the k-th largest score
  threshold = flat[last]
  keep = (flat > threshold) | ((flat == threshold) & (jnp.arange(flat.size) <= last))
  splits = np.cumsum([x.size for x in leaves])[:-1]
  return [m.reshape(x.shape) for m, x in zip(jnp.split(keep, splits), leaves)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def jaxprune_masks(leaves: list[jax.Array], sparsity: float, scope: str) -> list[jax.Array]:
  return jaxprune.topk_mask(leaves, sparsity, scope=scope)


def scores(n: int, scope: str, ties: bool, seed: int = 0) -> list[jax.Array]:
  """Random normal scores; with ``ties`` magnitudes rounded to a few distinct values."""
  keys = jax.random.split(jax.random.key(seed), 3)
  out = []
  for key, shape in zip(keys, leaf_shapes(n, scope)):
    x = jax.random.normal(key, shape, jnp.float32)
    out.append(jnp.round(jnp.abs(x) * 4) / 4 if ties else x)
  return out


def run_case(n: int, scope: str, ties: bool, rounds: int) -> dict:
  """Times both methods on one set of scores and asserts their masks are identical."""
  leaves = scores(n, scope, ties)
  expected = [np.asarray(m) for m in argsort_masks(leaves, SPARSITY)]  # also compiles
  got = [np.asarray(m) for m in jaxprune_masks(leaves, SPARSITY, scope)]
  for e, g in zip(expected, got, strict=True):
    np.testing.assert_array_equal(g, e)
  assert sum(int(g.sum()) for g in got) == int(n_keep(n, SPARSITY))
  runs = {
    "argsort": lambda: jax.block_until_ready(argsort_masks(leaves, SPARSITY)),
    "jaxprune": lambda: jax.block_until_ready(jaxprune_masks(leaves, SPARSITY, scope)),
  }
  t = timing.interleaved(runs, rounds)
  if ties:
    distinct = len(np.unique(np.concatenate([np.asarray(x).ravel() for x in leaves])))
    kind = f"ties ({distinct} values)"
  else:
    kind = "normal"
  return {
    "n": n,
    "scope": scope,
    "kind": kind,
    "ties": ties,
    "leaves": " + ".join(f"{a * b:,}" for a, b in leaf_shapes(n, scope)),
    "argsort": timing.median(t["argsort"]),
    "jaxprune": timing.median(t["jaxprune"]),
    "speedup": timing.paired_ratio(t["argsort"], t["jaxprune"]),
    "speedup_min": min(t["argsort"]) / min(t["jaxprune"]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke run: 100K and 1M only")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
  parser.add_argument("--no-write", action="store_true", help="do not write results/")
  args = parser.parse_args()

  sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
  results = []
  for ties in (False, True):
    for n in sizes:
      rounds = args.rounds or (3 if args.quick else (5 if n >= 10_000_000 else 9))
      for scope in ("layer", "global"):
        r = run_case(n, scope, ties, rounds)
        print(
          f"{r['kind']:17s} n={n:>10,} {scope:6s} argsort {timing.ms(r['argsort'])} ms, "
          f"jaxprune {timing.ms(r['jaxprune'])} ms, x{r['speedup']:.1f}",
          flush=True,
        )
        results.append(r)

  header = [
    "scores",
    "n",
    "scope",
    "leaves",
    "argsort (ms)",
    "jaxprune (ms)",
    "speed-up",
    "speed-up (best)",
  ]
  rows = [
    [
      r["kind"],
      f"{r['n']:,}",
      r["scope"],
      r["leaves"],
      timing.ms(r["argsort"]),
      timing.ms(r["jaxprune"]),
      f"**{r['speedup']:.1f}x**",
      f"{r['speedup_min']:.1f}x",
    ]
    for r in results
  ]
  body = (
    f"Exact top-k masks at sparsity {SPARSITY} (keep {1 - SPARSITY:.0%}) of float32 "
    "scores: random normal, and their magnitudes rounded to multiples of 0.25 (a few "
    "distinct values, so many ties at the threshold). Argsort: a stable descending "
    "`jnp.argsort` of the flat scores (for the global scope, of their concatenation), "
    "as jaxpruner computes masks. jaxprune: `jaxprune.topk_mask` (radix select). Both "
    "jitted, timed in interleaved rounds; times are medians; speed-up = argsort / "
    "jaxprune, the median of the per-round ratios (and the ratio of the best rounds). In every row the two masks were asserted "
    "identical, with exactly k kept.\n\n" + timing.table(header, rows)
  )
  if not args.quick:
    big = [r for r in results if r["n"] >= 10_000_000 and not r["ties"]]
    worst = min(r["speedup"] for r in big)
    worst_best = min(r["speedup_min"] for r in big)
    verdict = timing.verdict(worst >= TARGET, worst_best >= TARGET)
    body += (
      f"\n\nTarget (identical masks, >= {TARGET}x faster than argsort at 10M random normal "
      f"scores, global included): {verdict} (worst {worst:.1f}x; of the best rounds "
      f"{worst_best:.1f}x)."
    )
  timing.report("topk", "Exact top-k masks", body, write=not (args.quick or args.no_write))


if __name__ == "__main__":
  main()
