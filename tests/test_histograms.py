"""Weight histograms across prune / fine-tune stages and APoZ histograms (PNG files)."""

import numpy as np
import pytest

from jaxprune.analysis import plot_apoz_histogram, plot_weight_histograms

PNG = b"\x89PNG\r\n\x1a\n"


def stages():
  """Numpy params (no JAX compiles): trained, magnitude-pruned, "fine-tuned"."""
  rng = np.random.default_rng(0)
  trained = {
    "conv1": {"kernel": rng.normal(size=(3, 3, 1, 8)), "bias": np.zeros(8)},
    "fc": {"kernel": rng.normal(size=(32, 10)), "bias": np.zeros(10)},
  }
  pruned = {
    k: {n: np.where(np.abs(p) > 1.0, p, 0.0) for n, p in v.items()} for k, v in trained.items()
  }
  tuned = {k: {n: p * 1.1 for n, p in v.items()} for k, v in pruned.items()}
  return {"trained": trained, "pruned": pruned, "fine-tuned": tuned}


@pytest.mark.parametrize("per_layer", [False, True])
def test_weight_histograms_png(tmp_path, per_layer):
  out = plot_weight_histograms(stages(), tmp_path / "sub" / "w.png", per_layer=per_layer)
  data = out.read_bytes()
  assert data[:8] == PNG and len(data) > 10_000


def test_weight_histograms_errors(tmp_path):
  s = stages()
  with pytest.raises(ValueError, match="empty"):
    plot_weight_histograms({}, tmp_path / "w.png")
  with pytest.raises(ValueError, match="plot_weight_histograms: where='nothing' selects none"):
    plot_weight_histograms(s, tmp_path / "w.png", where="nothing")
  with pytest.raises(ValueError, match="'other'"):
    plot_weight_histograms({**s, "other": {"fc": s["trained"]["fc"]}}, tmp_path / "w.png")


def test_apoz_histogram_png(tmp_path):
  rng = np.random.default_rng(0)
  values = {f"layer{i}": rng.uniform(size=16) for i in range(4)}  # 2 x 3 grid, 2 panels hidden
  out = plot_apoz_histogram(values, tmp_path / "apoz.png")
  data = out.read_bytes()
  assert data[:8] == PNG and len(data) > 10_000
  with pytest.raises(ValueError, match="empty"):
    plot_apoz_histogram({}, tmp_path / "none.png")
