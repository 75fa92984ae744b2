"""Block-by-block pruning: one pass per block (cached states) against the traced path.

``posttrain.prune(..., stack=True)`` caches the calibration hidden states at block 0's
input and evaluates each block twice per batch (capture, then the pruned block's
output): ``2 L - 1`` block evaluations; ``posttrain.prune(..., blocks=regex)`` runs the
traced model up to block ``i`` for every block: ``L (L + 1) / 2``, and compiles one
program per block. Both prune the same layers to the same masks (asserted here). A
random ``charlm`` decoder (width ``--dim``) at 4, 8 and 16 blocks, ``--batches``
calibration batches of ``--batch`` x ``--seq`` tokens; wall time of one call (compile
included, after a warm-up call on a 1-block model: the one-pass path compiles its two
block programs once, shared by blocks of one shape), both paths in one process, the depths interleaved, ``--rounds`` rounds.

  python benchmarks/blockwise.py [--method wanda] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

from jaxprune import posttrain  # noqa: E402
from jaxprune.models.decoder import CharLM  # noqa: E402
from jaxprune.posttrain import blockwise, calibration  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt"))
  parser.add_argument("--depths", default="4,8,16")
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--quick", action="store_true", help="depths 2,4, writes nothing")
  args = parser.parse_args()
  depths = [2, 4] if args.quick else [int(d) for d in args.depths.split(",")]
  rng = np.random.default_rng(0)
  batches = [
    rng.integers(0, 64, (args.batch, args.seq)).astype(np.int32) for _ in range(args.batches)
  ]
  warm = CharLM(64, dim=args.dim, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=3 * args.dim,
                rngs=nnx.Rngs(0))  # fmt: skip
  for kind in ({"stack": True}, {"blocks": r"^blocks/(\d+)/"}):  # compile the shared parts
    jax.block_until_ready(posttrain.prune(warm, None, batches, method=args.method, **kind))
  times: dict[tuple[int, str], list[float]] = {}
  for r in range(args.rounds):
    for depth in depths if r % 2 == 0 else depths[::-1]:
      model = CharLM(64, dim=args.dim, depth=depth, num_heads=4, num_kv_heads=2,
                     mlp_dim=3 * args.dim, rngs=nnx.Rngs(depth))  # fmt: skip
      got = {}
      order = ("one pass", "traced") if (r + depth) % 2 == 0 else ("traced", "one pass")
      for path in order:
        kind = {"stack": True} if path == "one pass" else {"blocks": r"^blocks/(\d+)/"}
        # every call compiles its programs, as a first call does (posttrain keeps them
        # across calls, and the depths share their block programs)
        blockwise._RUNS.clear()
        calibration._STATS.clear()
        start = time.perf_counter()
        params, masks = posttrain.prune(model, None, batches, method=args.method, **kind)
        jax.block_until_ready((params, masks))
        times.setdefault((depth, path), []).append(time.perf_counter() - start)
        got[path] = masks
        print(f"{depth} blocks, {path}: {times[depth, path][-1]:.1f} s", flush=True)
      for a, b in zip(jax.tree.leaves(got["one pass"]), jax.tree.leaves(got["traced"])):
        assert np.array_equal(a, b), "the two paths disagree"
  rows = []
  base = {p: timing.median(times[depths[0], p]) for p in ("one pass", "traced")}
  for depth in depths:
    one, traced = (timing.median(times[depth, p]) for p in ("one pass", "traced"))
    rows.append(
      [
        depth,
        f"{2 * depth - 1} / {depth * (depth + 1) // 2}",
        f"{one:.1f}",
        f"{traced:.1f}",
        f"{traced / one:.2f}x",
        f"{one / base['one pass']:.2f} / {traced / base['traced']:.2f}",
      ]
    )
  header = [
    "blocks L",
    "block evaluations per batch (one pass / traced)",
    "one pass (s)",
    "traced (s)",
    "traced / one pass",
    f"time vs {depths[0]} blocks (one pass / traced)",
  ]
  body = (
    f"`posttrain.prune(method={args.method!r})` of a random `charlm` (dim {args.dim}, MLP "
    f"{3 * args.dim}, 4 query / 2 KV heads), {args.batches} calibration batches of "
    f"{args.batch} x {args.seq} tokens; wall time of one call including compilation, "
    f"median of {args.rounds} round(s); masks of both paths asserted identical.\n\n"
    + timing.table(header, rows)
  )
  timing.report("blockwise", "One pass per block vs the traced path", body, not args.quick)


if __name__ == "__main__":
  main()
