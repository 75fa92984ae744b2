"""SparseGPT on one layer: jaxprune against the original code (IST-DASLab/sparsegpt).

The original is the authors' ``SparseGPT.fasterprune`` from their repository's
``sparsegpt.py``, run unmodified on CPU PyTorch in its own process. It is not part of
jaxprune: clone it and give its folder::

  git clone https://github.com/IST-DASLab/sparsegpt /tmp/sparsegpt   # sparsegpt.py, quant.py
  python3 -m venv .venv-bench && echo '*' > .venv-bench/.gitignore
  .venv-bench/bin/pip install 'torch==2.13.0+cpu' transformers numpy  # CPU torch by name

  python benchmarks/sparsegpt.py --original /tmp/sparsegpt            # or SPARSEGPT_ORIGINAL=
  python benchmarks/sparsegpt.py --original /tmp/sparsegpt --quick    # 4096x4096 only

Without the clone (or the venv) the benchmark says so and stops. Its module imports
``transformers`` (for ``Conv1D``) and ``quant``; ``fasterprune`` ends with
``torch.cuda.synchronize()``, which CPU-only torch refuses, so the worker makes that call a
no-op before the module is imported (nothing else is changed; its two printed lines are
swallowed).

Layers as the original sees them: ``nn.Linear(in, out)``, ``W`` is ``[out, in]``;
``4096x11008`` is 4096 rows (outputs) by 11008 columns (inputs), LLaMA-7B's down_proj;
jaxprune gets ``W^T`` (a ``[in, out]`` kernel). Both sides get the same weights and the
same Hessian ``H = 2/n X^T X`` of synthetic calibration tokens (a rank-64 mixture plus
noise, channels scaled log-normally; NumPy, float32, cached in ``--cache``): the
original's ``H`` attribute is set to it (what ``add_batch`` accumulates), and run
``fasterprune(0.5)`` or ``fasterprune(0.5, prunen=2, prunem=4)``, block size 128, 1%
dampening. The relative reconstruction error ``||W X - W' X|| / ||W X||`` (from ``H``,
float64) of each side shows the work is the same.

Each measurement is a fresh process: the first call (jaxprune: tracing and XLA
compilation included; the original: torch's first use), then the warm call (same shape
again). The original runs at ``torch.set_num_threads(1)`` and at torch's default, and the
faster of the two counts; jaxprune at XLA's default. The processes alternate round by
round so the machine's load drifts over all alike; ``uptime``'s load average is printed
with each round. Ratios are jaxprune / original of the medians over rounds (below 1:
jaxprune faster).
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
TOKENS = 16384
BLOCKSIZE = 128
DAMPENING = 0.01
CASES = ["4096x4096:0.5", "4096x4096:2:4", "4096x11008:0.5", "4096x11008:2:4"]
QUICK = ["4096x4096:0.5", "4096x4096:2:4"]


def make_inputs(cache: Path, rows: int, cols: int, seed: int = 0) -> tuple[Path, Path]:
  """``(kernel.npy, hessian.npy)``: a ``[cols, rows]`` kernel (``W^T``) and ``2/n X^T X``."""
  cache.mkdir(parents=True, exist_ok=True)
  h_path = cache / f"hessian_{cols}_{TOKENS}.npy"
  w_path = cache / f"kernel_{cols}_{rows}.npy"
  from jaxprune import fileio

  rng = np.random.default_rng(seed)
  if not h_path.exists():
    start = time.perf_counter()
    rank, chunk = 64, 4096
    mix = rng.normal(size=(rank, cols)).astype(np.float32) / np.sqrt(rank)
    scales = np.exp(rng.normal(size=cols)).astype(np.float32)
    xtx = np.zeros((cols, cols), np.float32)
    for _ in range(TOKENS // chunk):
      x = rng.normal(size=(chunk, rank)).astype(np.float32) @ mix
      x += 0.3 * rng.normal(size=(chunk, cols)).astype(np.float32)
      x *= scales
      xtx += x.T @ x
    with fileio.atomic_write(h_path) as f:  # a killed run leaves no half-written cache
      np.save(f, xtx * (2.0 / TOKENS))
    print(f"built H ({cols}x{cols}, {TOKENS} tokens) in {time.perf_counter() - start:.1f} s")
  if not w_path.exists():
    with fileio.atomic_write(w_path) as f:
      np.save(f, (rng.normal(size=(cols, rows)) / np.sqrt(cols)).astype(np.float32))
  return w_path, h_path


def theirs(args, kernel: np.ndarray, hessian: np.ndarray):
  """The original ``fasterprune`` on ``nn.Linear(in, out)``: ``(run, result)``."""
  import torch

  torch.cuda.synchronize = lambda *a, **k: None  # CPU torch: fasterprune's last call
  if args.threads:
    torch.set_num_threads(args.threads)
  sys.path.insert(0, str(Path(args.original).resolve()))
  from sparsegpt import SparseGPT  # pyright: ignore[reportMissingImports]  # the clone's

  n_in, n_out = kernel.shape
  layer = torch.nn.Linear(n_in, n_out, bias=False)
  weight = torch.from_numpy(np.ascontiguousarray(kernel.T))
  n, m = (int(v) for v in args.nm.split(":")) if args.nm else (0, 0)

  def run():
    layer.weight.data = weight.clone()
    gpt = SparseGPT(layer)
    gpt.H = torch.from_numpy(hessian.copy())
    with contextlib.redirect_stdout(io.StringIO()):  # its "time" and "error" lines
      gpt.fasterprune(0.5, prunen=n, prunem=m, blocksize=BLOCKSIZE, percdamp=DAMPENING)
    return layer.weight.data

  def result():
    w = layer.weight.data.numpy().T
    return w, w != 0

  return run, result


def ours(args, kernel: np.ndarray, hessian: np.ndarray):
  import jax
  import jax.numpy as jnp

  import jaxprune
  from jaxprune.posttrain import sparsegpt_layer

  structure = jaxprune.n_m(*(int(v) for v in args.nm.split(":"))) if args.nm else None
  k, h = jnp.asarray(kernel), jnp.asarray(hessian)
  out = {}

  def run():
    out["w"], out["m"] = jax.block_until_ready(
      sparsegpt_layer(k, h, 0.5, structure=structure, blocksize=BLOCKSIZE, dampening=DAMPENING)
    )

  def result():
    return np.asarray(out["w"]), np.asarray(out["m"])

  return run, result


def worker(args) -> None:
  """One implementation in a fresh process: first call, warm call; prints JSON."""
  kernel, hessian = np.load(args.kernel), np.load(args.hessian)
  run, result = (ours if args.worker == "ours" else theirs)(args, kernel, hessian)
  times = []
  for _ in range(2):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  if args.out:
    w, m = result()
    np.save(args.out + "_w.npy", w)
    np.save(args.out + "_m.npy", m)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
  info = {"first": times[0], "warm": times[1], "maxrss_mib": rss}
  if args.worker == "theirs":
    import torch

    info["threads"] = torch.get_num_threads()
  print(json.dumps(info))


def load() -> str:
  return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def spawn(args, who: str, threads: int, w_path, h_path, nm, out) -> dict:
  python = sys.executable if who == "ours" else args.torch_python
  cmd = [python, __file__, "--worker", who, "--kernel", str(w_path), "--hessian", str(h_path)]
  cmd += ["--threads", str(threads), "--out", out, "--original", args.original or ""]
  if nm:
    cmd += ["--nm", nm]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode:
    raise RuntimeError(f"{who} worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def relative_error(w: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
  """``||X W - X W'|| / ||X W||`` from ``H = 2/n X^T X`` (float64)."""
  h = h.astype(np.float64)
  d = w.astype(np.float64) - w_new
  ref = w.astype(np.float64)
  return float(np.sqrt(np.sum(d * (h @ d)) / np.sum(ref * (h @ ref))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--original", default=os.environ.get("SPARSEGPT_ORIGINAL"))
  parser.add_argument("--quick", action="store_true", help="4096x4096 only, one round")
  parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
  parser.add_argument("--cases", default=None, help="e.g. 4096x4096:0.5,4096x11008:2:4")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument(
    "--original-threads", default="1,0", help="torch threads for the original (0: default)"
  )
  parser.add_argument("--torch-python", default=str(ROOT / ".venv-bench/bin/python"))
  parser.add_argument("--cache", default="/tmp/jaxprune_sparsegpt_bench")
  parser.add_argument("--worker", choices=("ours", "theirs"))
  parser.add_argument("--kernel")
  parser.add_argument("--hessian")
  parser.add_argument("--threads", type=int, default=0)
  parser.add_argument("--nm", default=None)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  if not args.original or not (Path(args.original) / "sparsegpt.py").exists():
    print(
      "skipped: the original code is needed; clone https://github.com/IST-DASLab/sparsegpt "
      "and pass its folder as --original DIR (or SPARSEGPT_ORIGINAL=DIR)."
    )
    return
  if not Path(args.torch_python).exists():
    print(f"skipped: no torch venv at {args.torch_python} (see this file's docstring).")
    return
  rounds = args.rounds or (1 if args.quick else 2)
  specs = args.cases.split(",") if args.cases else QUICK if args.quick else CASES
  cases = [(s.split(":")[0], s.split(":", 1)[1]) for s in specs]
  threads = [int(t) for t in args.original_threads.split(",")]
  runs = [("ours", 0, "ours")] + [("theirs", t, "theirs1" if t == 1 else "theirs") for t in threads]
  results: dict = {c: {key: [] for _, _, key in runs} for c in cases}
  loads = []
  for r in range(rounds):
    for shape, target in cases:
      rows, cols = (int(v) for v in shape.split("x"))
      w_path, h_path = make_inputs(Path(args.cache), rows, cols)
      nm = target if ":" in target else None
      for who, threads, key in runs if r % 2 == 0 else runs[::-1]:
        out = f"{args.cache}/{key}_{shape}_{target.replace(':', '-')}"
        res = spawn(args, who, threads, w_path, h_path, nm, out)
        res["load"] = load()
        results[(shape, target)][key].append(res)
        loads.append(os.getloadavg()[0])
        print(f"round {r} {shape} {target} {key}: {json.dumps(res)}", flush=True)
  rows_out = []
  for (shape, target), res in results.items():
    rows, cols = (int(v) for v in shape.split("x"))
    w_path, h_path = make_inputs(Path(args.cache), rows, cols)
    kernel, hessian = np.load(w_path), np.load(h_path)
    tag = f"{args.cache}/{{}}_{shape}_{target.replace(':', '-')}"
    w_o, m_o = np.load(tag.format("ours") + "_w.npy"), np.load(tag.format("ours") + "_m.npy")
    w_t = np.load(tag.format(runs[1][2]) + "_w.npy")
    med = {
      k: {f: float(np.median([x[f] for x in v])) for f in ("first", "warm")} for k, v in res.items()
    }
    nan = {"first": float("nan"), "warm": float("nan")}
    med.setdefault("theirs1", nan)
    med.setdefault("theirs", nan)
    best = {f: np.nanmin([med["theirs1"][f], med["theirs"][f]]) for f in ("first", "warm")}
    rows_out.append({
      "case": f"{shape} {'2:4' if ':' in target else '50%'}",
      "ours": med["ours"], "t1": med["theirs1"], "tn": med["theirs"],
      "warm": med["ours"]["warm"] / best["warm"], "first": med["ours"]["first"] / best["first"],
      "err_ours": relative_error(kernel, w_o, hessian),
      "err_theirs": relative_error(kernel, w_t, hessian),
      "mask_agree": float((m_o == (w_t != 0)).mean()),
      "rss": (max(x["maxrss_mib"] for x in res["ours"]), max(x["maxrss_mib"] for x in res[runs[1][2]])),
    })  # fmt: skip
  report = render(rows_out, rounds, loads, specs, args.original_threads)
  print(report)
  if not args.no_write:
    from jaxprune import fileio

    fileio.write_text(HERE / "results" / "sparsegpt.md", report)


def render(rows: list[dict], rounds: int, loads: list[float], specs: list[str], threads) -> str:
  lines = [
    "# SparseGPT on one layer: jaxprune vs the original (IST-DASLab/sparsegpt), CPU",
    "",
    f"`python benchmarks/sparsegpt.py --original DIR --rounds {rounds} --cases "
    f"{','.join(specs)} --original-threads {threads}` on {os.cpu_count()} CPU cores; load average (1 min) during the run "
    f"{min(loads):.1f}-{max(loads):.1f}. H from {TOKENS:,} synthetic tokens; block size "
    f"{BLOCKSIZE}, dampening {DAMPENING}. Seconds per layer, median over {rounds} fresh "
    "process(es) each: *first* is a process's first call (jaxprune: tracing and XLA "
    "compilation included), *warm* its second. The original at 1 thread and at torch's "
    "default threads; the ratio is jaxprune / the faster of the two (below 1: jaxprune "
    "faster). Error: ||WX - W'X|| / ||WX|| from H.",
    "",
    "| layer (rows x cols) | jaxprune warm / first s | original 1 thread warm / first s "
    "| original default threads warm / first s | ratio warm | ratio first | error jaxprune "
    "/ original | masks equal | peak RSS jaxprune / original MiB |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    o, t1, tn = r["ours"], r["t1"], r["tn"]
    lines.append(
      f"| {r['case']} | {o['warm']:.2f} / {o['first']:.2f} | {t1['warm']:.2f} / "
      f"{t1['first']:.2f} | {tn['warm']:.2f} / {tn['first']:.2f} | **{r['warm']:.2f}x** | "
      f"**{r['first']:.2f}x** | {r['err_ours']:.4f} / {r['err_theirs']:.4f} | "
      f"{r['mask_agree']:.5f} | {r['rss'][0]:.0f} / {r['rss'][1]:.0f} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
