"""``benchmarks/accelerator.py --quick`` runs every part at tiny sizes, so it cannot rot."""

import os
import pathlib
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_accelerator_benchmark_quick_runs_every_part(tmp_path):
  script = ROOT / "benchmarks" / "accelerator.py"
  # Less LLVM optimisation: tiny sizes are dominated by XLA compiles (as in test_notebooks).
  xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  result = subprocess.run(
    [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
    env=dict(os.environ, XLA_FLAGS=xla_flags),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  text = (tmp_path / f"accelerator-{jax.default_backend()}.md").read_text()
  for title in (
    "Masked-step overhead",
    "Global exact top-k",
    "Surgery: latency vs FLOPs",
    "SparseGPT, one layer",
    "2:4 sparse matmul",
    "Sparse export: dense vs BCOO vs shrunk",
    "A 1B decoder pruned end to end",
  ):
    assert f"### {title}" in text
  assert "quick (tiny sizes: a smoke run, not a measurement)" in text
  assert text.count("| fixed masks |") == 2 and text.count("| AGP every 10 |") == 2
  assert "| wanda | 0.00B | 1 |" in text  # the 1B part's code path on one tiny block
