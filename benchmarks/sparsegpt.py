"""SparseGPT on one layer: jaxprune against a straightforward PyTorch implementation.

Both sides get the same kernel and the same Hessian ``H = 2/n X^T X`` of 128 x 512
synthetic calibration tokens (a rank-64 mixture plus noise, channels scaled
log-normally; built once with NumPy in float32 and cached in ``--cache``), and run the
paper's algorithm (block size 128, 1% dampening, dead inputs, the adaptive per-block
mask with exactly ``round(s * size)`` weights removed per layer, each block its share,
or 2:4 chosen group by group). The PyTorch side is written here from the paper: a
Python loop over blocks and over the columns of a block, lazy updates of later blocks.
Each implementation runs in its own subprocess (so ``ru_maxrss``, the peak resident
memory, is its own; tracemalloc cannot see XLA's buffers): first call (JAX: compile +
run), then ``--rounds`` timed calls; the implementations alternate round by round, one
subprocess each per round, so load on the machine drifts over both alike. The masks
must agree (ties aside) and the weights to float32 rounding.

Setup (torch is not a jaxprune dependency; its CPU wheel, ~190 MB, in its own venv)::

  python3 -m venv .venv-bench && echo '*' > .venv-bench/.gitignore
  .venv-bench/bin/pip install 'torch==2.13.0+cpu' numpy   # a CPU build of torch by name

Usage::

  python benchmarks/sparsegpt.py                 # 4096x4096 (50%, 2:4), 4096x11008 (50%)
  python benchmarks/sparsegpt.py --quick         # 1024x1024, writes nothing
  python benchmarks/sparsegpt.py --torch-python .venv-bench/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENS = 128 * 512
BLOCKSIZE = 128
DAMPENING = 0.01


def make_inputs(
  cache: Path, n_in: int, n_out: int, tokens: int, seed: int = 0
) -> tuple[Path, Path]:
  """``(kernel.npy, hessian.npy)``: a ``[n_in, n_out]`` kernel and ``2/n X^T X`` (float32)."""
  cache.mkdir(parents=True, exist_ok=True)
  h_path = cache / f"hessian_{n_in}_{tokens}.npy"
  w_path = cache / f"kernel_{n_in}_{n_out}.npy"
  from jaxprune import fileio

  rng = np.random.default_rng(seed)
  if not h_path.exists():
    start = time.perf_counter()
    rank, chunk = 64, 8192
    mix = rng.normal(size=(rank, n_in)).astype(np.float32) / np.sqrt(rank)
    scales = np.exp(rng.normal(size=n_in)).astype(np.float32)
    xtx = np.zeros((n_in, n_in), np.float32)
    for lo in range(0, tokens, chunk):
      n = min(chunk, tokens - lo)
      x = rng.normal(size=(n, rank)).astype(np.float32) @ mix
      x += 0.3 * rng.normal(size=(n, n_in)).astype(np.float32)
      x *= scales
      xtx += x.T @ x
    with fileio.atomic_write(h_path) as f:  # a killed run leaves no half-written cache
      np.save(f, xtx * (2.0 / tokens))
    print(f"built H ({n_in}x{n_in}, {tokens} tokens) in {time.perf_counter() - start:.1f} s")
  if not w_path.exists():
    with fileio.atomic_write(w_path) as f:
      np.save(f, (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
  return w_path, h_path


def block_counts(n_in: int, n_out: int, sparsity: float, blocksize: int) -> list[int]:
  """Weights removed per block of input rows, exactly ``round(s * n_in * n_out)`` in all."""
  edges = sorted({min(i, n_in) for i in range(0, n_in + blocksize, blocksize)})
  cum = [round(sparsity * e * n_out) for e in edges]
  return [b - a for a, b in zip(cum, cum[1:])]


def torch_sparsegpt(kernel, hessian, sparsity, nm, blocksize=BLOCKSIZE, percdamp=DAMPENING):
  """The paper's algorithm in PyTorch, on W = kernel^T ([out, in]: columns are inputs)."""
  import torch

  w = torch.from_numpy(kernel).T.contiguous().float()
  h = torch.from_numpy(hessian).clone().float()
  rows, cols = w.shape
  dead = torch.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols)
  h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
  u = torch.linalg.cholesky(h_inv, upper=True)
  keep = torch.zeros_like(w, dtype=torch.bool)
  counts = block_counts(cols, rows, sparsity, blocksize)
  for b, i1 in enumerate(range(0, cols, blocksize)):
    i2 = min(i1 + blocksize, cols)
    w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    d = torch.diag(u1)
    prune1 = torch.zeros_like(w1, dtype=torch.bool)
    if nm is None:
      score = (w1**2 / d[None, :] ** 2).flatten()
      prune1.view(-1)[torch.topk(score, counts[b], largest=False).indices] = True
    for i in range(i2 - i1):
      col = w1[:, i]
      if nm is not None and i % nm[1] == 0:
        score = w1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]][None, :] ** 2
        prune1.scatter_(1, i + torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices, True)
      q = col.clone()
      q[prune1[:, i]] = 0
      q1[:, i] = q
      err = (col - q) / d[i]
      w1[:, i:] -= err[:, None] @ u1[i, i:][None, :]
      err1[:, i] = err
    w[:, i1:i2] = q1
    keep[:, i1:i2] = ~prune1
    w[:, i2:] -= err1 @ u[i1:i2, i2:]
  return w.T.contiguous().numpy(), keep.T.contiguous().numpy()


def jax_sparsegpt(kernel, hessian, sparsity, nm):
  import jax
  import jax.numpy as jnp

  import jaxprune
  from jaxprune.posttrain import sparsegpt_layer

  structure = None if nm is None else jaxprune.n_m(*nm)
  w, m = sparsegpt_layer(
    jnp.asarray(kernel), jnp.asarray(hessian), None if nm else sparsity, structure=structure,
    blocksize=BLOCKSIZE, dampening=DAMPENING,
  )  # fmt: skip
  jax.block_until_ready((w, m))
  return np.asarray(w), np.asarray(m)


def worker(args) -> None:
  """One implementation: first call, then ``args.calls`` timed calls; prints JSON."""
  kernel, hessian = np.load(args.kernel), np.load(args.hessian)
  nm = None if args.nm is None else tuple(int(v) for v in args.nm.split(":"))
  run = jax_sparsegpt if args.impl == "jax" else torch_sparsegpt
  start = time.perf_counter()
  w, m = run(kernel, hessian, args.sparsity, nm)
  first = time.perf_counter() - start
  times = []
  for _ in range(args.calls):
    start = time.perf_counter()
    run(kernel, hessian, args.sparsity, nm)
    times.append(time.perf_counter() - start)
  if args.out:
    np.save(args.out + "_w.npy", w)
    np.save(args.out + "_m.npy", m)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
  print(json.dumps({"first": first, "times": times, "maxrss_mib": rss}))


def spawn(python: str, impl: str, w_path, h_path, sparsity, nm, calls, out) -> dict:
  cmd = [python, __file__, "--worker", impl, "--kernel", str(w_path), "--hessian", str(h_path)]
  cmd += ["--sparsity", str(sparsity), "--calls", str(calls), "--out", out]
  if nm:
    cmd += ["--nm", nm]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode:
    raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument("--rounds", type=int, default=2, help="subprocess pairs per case")
  parser.add_argument("--calls", type=int, default=1, help="timed calls per subprocess")
  parser.add_argument("--torch-python", default=str(ROOT / ".venv-bench/bin/python"))
  parser.add_argument("--cache", default="/tmp/jaxprune_sparsegpt_bench")
  parser.add_argument("--cases", default=None, help="e.g. 4096x4096:0.5,4096x4096:2:4")
  parser.add_argument("--worker", choices=("jax", "torch"))
  parser.add_argument("--kernel")
  parser.add_argument("--hessian")
  parser.add_argument("--sparsity", type=float, default=0.5)
  parser.add_argument("--nm", default=None)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.worker:
    args.impl = args.worker
    return worker(args)

  if args.cases:
    cases = [c.split(":", 1) for c in args.cases.split(",")]
  elif args.quick:
    cases = [["1024x1024", "0.5"], ["1024x1024", "2:4"]]
  else:
    cases = [["4096x4096", "0.5"], ["4096x4096", "2:4"], ["4096x11008", "0.5"]]
  tokens = 8192 if args.quick else TOKENS
  rows = []
  for shape, target in cases:
    n_in, n_out = (int(v) for v in shape.split("x"))
    w_path, h_path = make_inputs(Path(args.cache), n_in, n_out, tokens)
    nm = target if ":" in target else None
    sparsity = 0.5 if nm else float(target)
    results: dict[str, list] = {"jax": [], "torch": []}
    for r in range(args.rounds):
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
      for impl in order:
        out = f"{args.cache}/{impl}_{shape}_{target.replace(':', '-')}"
        python = sys.executable if impl == "jax" else args.torch_python
        results[impl].append(spawn(python, impl, w_path, h_path, sparsity, nm, args.calls, out))
        print(impl, shape, target, results[impl][-1], flush=True)
    tag = f"{args.cache}/{{}}_{shape}_{target.replace(':', '-')}"
    w_j, m_j = np.load(tag.format("jax") + "_w.npy"), np.load(tag.format("jax") + "_m.npy")
    w_t, m_t = np.load(tag.format("torch") + "_w.npy"), np.load(tag.format("torch") + "_m.npy")
    steady = {k: [t for res in v for t in res["times"]] for k, v in results.items()}
    rows.append({
      "case": f"{shape} {'2:4' if nm else f'{sparsity:.0%}'}",
      "jax": float(np.median(steady["jax"])),
      "jax_first": float(np.median([res["first"] for res in results["jax"]])),
      "torch": float(np.median(steady["torch"])),
      "jax_best": min(steady["jax"]),
      "torch_best": min(steady["torch"]),
      "jax_rss": max(res["maxrss_mib"] for res in results["jax"]),
      "torch_rss": max(res["maxrss_mib"] for res in results["torch"]),
      "mask_agree": float((m_j == m_t).mean()),
      "removed": (int(m_j.size - m_j.sum()), int(m_t.size - m_t.sum())),
      "w_diff": float(np.abs(w_j - w_t).max() / np.abs(w_t).max()),
    })  # fmt: skip
  report = render(rows, args)
  print(report)
  if not (args.quick or args.no_write):
    (HERE / "results").mkdir(exist_ok=True)
    from jaxprune import fileio

    fileio.write_text(HERE / "results" / "sparsegpt.md", report)


def render(rows: list[dict], args) -> str:
  lines = [
    "# SparseGPT on one layer: jaxprune vs PyTorch (CPU)",
    "",
    f"`python benchmarks/sparsegpt.py --rounds {args.rounds} --calls {args.calls}` on "
    f"{os.cpu_count()} CPU cores shared with other work. H from {TOKENS:,} synthetic tokens "
    f"(128 x 512); block size {BLOCKSIZE}, dampening {DAMPENING}. Times are seconds per "
    "layer solve (median over calls; best in brackets); jaxprune's first call includes "
    "compilation. Peak memory: ru_maxrss of each implementation's own process (the "
    "interpreter, the library and the layer's arrays).",
    "",
    "| layer [in x out] | jaxprune s | PyTorch s | jaxprune / PyTorch | jaxprune 1st call s "
    "| peak RSS jaxprune / PyTorch MiB | masks equal | removed | max weight diff (rel) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['case']} | {r['jax']:.2f} ({r['jax_best']:.2f}) | {r['torch']:.2f} "
      f"({r['torch_best']:.2f}) | {r['jax'] / r['torch']:.2f}x | {r['jax_first']:.2f} | "
      f"{r['jax_rss']:.0f} / {r['torch_rss']:.0f} | {r['mask_agree']:.6f} | "
      f"{r['removed'][0]:,} / {r['removed'][1]:,} | {r['w_diff']:.1e} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
