"""Sensitivity sweeps, Li et al.'s ratio choice, the CSV and the plot."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import tree as tree_lib
from jaxprune.analysis import Sensitivity, choose_ratios, plot_sensitivity, sensitivity

GRID = (0.0, 0.5, 0.75)


def tiny_model():
  """An NNX MLP and ``evaluate``: agreement with the dense model's predictions."""
  # every kernel is 8x8: the exact top-k selector compiles once per shape
  model = nnx.Sequential(
    nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 8, rngs=nnx.Rngs(1))
  )
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.key(2), (64, 8))

  @jax.jit
  def predict(params):
    return nnx.merge(graphdef, params)(x).argmax(-1)

  labels = predict(params)
  calls = []

  def evaluate(p):
    calls.append(1)
    return jnp.mean(predict(p) == labels)

  return params, evaluate, calls


def test_table_shape_and_dense_baseline():
  params, evaluate, calls = tiny_model()
  result = sensitivity(params, evaluate, GRID, progress=False)
  assert result.layers == ("layers/0/kernel", "layers/2/kernel")
  assert result.sparsities == GRID and result.dense == 1.0
  for layer in result.layers:
    assert len(result.accuracy[layer]) == 3
    assert result.accuracy[layer][0] == result.dense
    assert result.drop(layer)[0] == 0.0
  assert len(calls) == 1 + 2 * 2  # dense once, then every layer at 0.5 and 0.75
  assert "layers/0/kernel" in str(result) and "s=0.75" in str(result)


def test_prunes_only_one_exact_layer_with_the_structure():
  # "fc1/kernel" is also a suffix of "block/fc1/kernel": the regex must be anchored
  params = {
    "block": {"fc1": {"kernel": jnp.arange(1.0, 65.0).reshape(8, 8)}},
    "fc1": {"kernel": jnp.arange(1.0, 65.0).reshape(8, 8)},
  }
  seen = []

  def evaluate(p):
    seen.append(
      {path: int((np.asarray(v) == 0).all(0).sum()) for path, v in tree_lib.leaves_with_paths(p)}
    )
    return 1.0

  sensitivity(params, evaluate, (0.0, 0.5), structure="filters", progress=False)
  assert seen == [
    {"block/fc1/kernel": 0, "fc1/kernel": 0},
    {"block/fc1/kernel": 4, "fc1/kernel": 0},  # half of the filters (columns) removed
    {"block/fc1/kernel": 0, "fc1/kernel": 4},
  ]


def test_methods():
  params, evaluate, _ = tiny_model()
  r = sensitivity(params, evaluate, (0.5,), method="random", progress=False)
  assert r.sparsities == (0.5,)

  def factory(s, *, where, structure):
    return jaxprune.magnitude(s, where=where, structure=structure)

  a = sensitivity(params, evaluate, GRID, method=factory, structure="neurons", progress=False)
  b = sensitivity(params, evaluate, GRID, structure="neurons", progress=False)
  assert a == b and a.structure == "neurons"
  with pytest.raises(ValueError, match="Unknown method"):
    sensitivity(params, evaluate, GRID, method="saliency")
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    sensitivity(params, evaluate, (0.0, 1.0))
  with pytest.raises(ValueError, match="sensitivity: where='conv' selects none"):
    sensitivity(params, evaluate, GRID, where="conv")


def test_layers_the_sweep_cannot_prune_are_refused_before_any_evaluation():
  # Both failed at the layer's turn, after every layer before it had been evaluated.
  params = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 4)), "z": jnp.ones((3, 8))}
  calls = []

  def evaluate(p):
    calls.append(1)
    return 1.0

  with pytest.raises(ValueError, match=r"2x2 blocks .* 'z' has shape \(3, 8\)"):
    sensitivity(params, evaluate, (0.5,), structure=jaxprune.blocks((2, 2)), progress=False)
  with pytest.raises(ValueError, match=r"At sparsity 0.9, 'b' \(4 filters\) would keep none"):
    sensitivity(params, evaluate, (0.5, 0.9), structure="filters", progress=False)
  assert calls == []
  r = sensitivity(params, evaluate, (0.5, 0.8), structure="filters", progress=False)
  assert r.layers == ("a", "b", "z") and len(calls) == 1 + 3 * 2


def test_csv_and_plot(tmp_path):
  params, evaluate, _ = tiny_model()
  result = sensitivity(params, evaluate, GRID, progress=False)
  with result.to_csv(tmp_path / "sens.csv").open() as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["layer", "sparsity", "accuracy", "drop"]
  assert len(rows) == 1 + 2 * 3
  assert rows[1] == ["layers/0/kernel", "0.0", "1.0", "0.0"]
  assert [float(r[1]) for r in rows[1:4]] == list(GRID)
  png = plot_sensitivity(result, tmp_path / "plots" / "sens.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


HAND = Sensitivity(
  (0.0, 0.25, 0.5, 0.75, 0.9),
  {
    "conv1/kernel": (0.9, 0.85, 0.6, 0.3, 0.1),  # sensitive: even 25% drops 0.05
    "conv2/kernel": (0.9, 0.9, 0.89, 0.8, 0.5),  # 0.01 drop at 50%: exactly the tolerance
    "fc1/kernel": (0.9, 0.9, 0.9, 0.9, 0.895),  # robust to the end
    "fc2/kernel": (0.9, 0.9, 0.7, 0.9, 0.9),  # recovers after a dip: stops at the dip
  },
  0.9,
)


def test_choose_ratios():
  assert choose_ratios(HAND, 0.01, regex=False) == {
    "conv1/kernel": 0.0,
    "conv2/kernel": 0.5,
    "fc1/kernel": 0.9,
    "fc2/kernel": 0.25,
  }
  assert choose_ratios(HAND, 0.1, regex=False)["conv1/kernel"] == 0.25
  assert choose_ratios(HAND, 0.0, regex=False)["conv2/kernel"] == 0.25
  with pytest.raises(ValueError, match="max_drop"):
    choose_ratios(HAND, -0.1)


def test_ratios_are_pruner_overrides():
  params = {
    name: {"kernel": jnp.arange(1.0, 65.0).reshape(8, 8)}
    for name in ("conv1", "conv2", "fc1", "fc2")
  }
  ratios = choose_ratios(HAND, 0.01)
  assert list(ratios)[0] == r"^conv1/kernel$"
  masks = jaxprune.magnitude(0.0, overrides=ratios).masks(params)
  zeros = {r.path: r.zeros for r in jaxprune.summary(masks).rows}
  assert zeros == {"conv1/kernel": 0, "conv2/kernel": 32, "fc1/kernel": 58, "fc2/kernel": 16}


def test_channel_sensitivity_removes_whole_groups_one_at_a_time():
  from jaxprune import surgery
  from jaxprune.analysis import channel_sensitivity

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv1, self.bn1 = nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
      self.conv2, self.bn2 = nnx.Conv(4, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
      self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      return self.head(nnx.relu(self.bn2(self.conv2(x))).mean(axis=(1, 2)))

  net = Net(nnx.Rngs(0))
  plan = surgery.plan(net, example_input=jnp.ones((1, 5, 5, 1)))
  params = nnx.state(net, nnx.Param)

  def kept(p):  # channels left in each BatchNorm, as "bn1 kept * 100 + bn2 kept"
    return 100 * int((p["bn1"]["scale"][...] != 0).sum()) + int((p["bn2"]["scale"][...] != 0).sum())

  result = channel_sensitivity(plan, params, kept, (0.0, 0.5, 0.75), progress=False)
  assert result.structure == "channel groups, L1" and result.dense == 408
  assert result.accuracy == {"conv1/kernel": (408, 208, 108), "conv2/kernel": (408, 404, 402)}
  assert choose_ratios(result, 4) == {"conv1/kernel": 0.0, "conv2/kernel": 0.5}  # group names
  masks = surgery.channel_masks(plan, params, choose_ratios(result, 4))
  assert int(masks["bn2"]["scale"][...].sum()) == 4
  with pytest.raises(ValueError, match="sparsity must be in"):
    channel_sensitivity(plan, params, kept, (0.0, 1.0), progress=False)
