"""APoZ statistics on hand-built networks (exact values) and the masks they give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxprune
from jaxprune import tree as tree_lib
from jaxprune.analysis import apoz, apoz_masks

# fc1 units: 0 always off (bias -100), 1 always on (bias +100), 2 off for x <= 0
# (half of the inputs), 3 exactly zero (kernel 0, bias 0).
KERNEL = jnp.array([[1.0, 1.0, 1.0, 0.0]])
BIAS = jnp.array([-100.0, 100.0, 0.0, 0.0])
EXPECTED = [1.0, 0.0, 0.5, 1.0]
BATCHES = [jnp.array([[-2.0], [1.0]]), jnp.array([[-1.0], [2.0]])]


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(1, 4, rngs=rngs)
    self.fc2 = nnx.Linear(4, 3, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x))
    return self.head(nnx.relu(self.fc2(x)))


def mlp() -> MLP:
  model = MLP(nnx.Rngs(0))
  model.fc1.kernel[...] = KERNEL
  model.fc1.bias[...] = BIAS
  return model


def test_nnx_exact_values():
  values = apoz(mlp(), BATCHES, "fc1")
  assert list(values) == ["fc1"]
  np.testing.assert_array_equal(values["fc1"], EXPECTED)


def test_pooled_over_all_examples_with_unequal_batches():
  # 1 of 1 zero, then 1 of 3 zero: 2 of 4 examples -> 0.5 (not the mean of 1.0 and 1/3)
  batches = [jnp.array([[-2.0]]), jnp.array([[-1.0], [1.0], [2.0]])]
  np.testing.assert_array_equal(apoz(mlp(), batches, "fc1")["fc1"], EXPECTED)


def test_regexes_select_several_layers_in_natural_order():
  values = apoz(mlp(), BATCHES, ["fc2", "^fc1$"])
  assert list(values) == ["fc1", "fc2"]
  assert values["fc2"].shape == (3,)
  assert ((values["fc2"] >= 0) & (values["fc2"] <= 1)).all()


def test_linen_exact_values():
  class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      assert not train
      x = nn.relu(nn.Dense(4)(x))
      return nn.Dense(2)(x)

  module = LinenMLP()
  variables = module.init(jax.random.key(0), BATCHES[0], train=False)
  variables["params"]["Dense_0"] = {"kernel": KERNEL, "bias": BIAS}
  values = apoz(module, BATCHES, "Dense_0", variables=variables, train=False)
  assert list(values) == ["Dense_0"]
  np.testing.assert_array_equal(values["Dense_0"], EXPECTED)


class ConvNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 3, (1, 1), rngs=rngs)
    self.fc = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


def test_conv_feature_map_per_channel_over_n_h_w():
  model = ConvNet(nnx.Rngs(0))
  model.conv.kernel[...] = jnp.array([1.0, -1.0, 0.0]).reshape(1, 1, 1, 3)
  model.conv.bias[...] = jnp.array([0.0, 0.0, -1.0])
  # 2 images x 2 x 2 positions: 3 of the 8 values are <= 0, 6 are >= 0
  x = jnp.array([-1.0, 2.0, 3.0, 4.0, 5.0, -6.0, 0.0, 8.0]).reshape(2, 2, 2, 1)
  np.testing.assert_array_equal(apoz(model, [x], "conv")["conv"], [3 / 8, 6 / 8, 1.0])


def test_subclass_calling_super_counts_once_and_classes_are_restored():
  class Wrapped(nnx.Linear):
    def __call__(self, x):
      return super().__call__(x)

  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = Wrapped(1, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc1(x) + self.fc1(-x)  # called twice: both calls count

  model = Shared(nnx.Rngs(0))
  model.fc1.kernel[...] = KERNEL
  model.fc1.bias[...] = BIAS
  call, linear_call = Wrapped.__call__, nnx.Linear.__call__
  values = apoz(model, BATCHES, "fc1")
  np.testing.assert_array_equal(values["fc1"], [1.0, 0.0, 0.5, 1.0])
  assert Wrapped.__call__ is call and nnx.Linear.__call__ is linear_call


def test_errors_name_the_layers():
  with pytest.raises(ValueError, match="fc1"):
    apoz(mlp(), BATCHES, "conv")
  with pytest.raises(ValueError, match="empty"):
    apoz(mlp(), [], "fc1")
  with pytest.raises(ValueError, match="variables"):
    apoz(nn.Dense(2), BATCHES, "Dense_0")
  with pytest.raises(TypeError, match="NNX or a Linen"):
    apoz(lambda x: x, BATCHES, "fc1")


def test_masks_prune_highest_apoz_units_of_the_producer():
  model = mlp()
  params = nnx.state(model, nnx.Param)
  masks = apoz_masks(params, apoz(model, BATCHES, "fc1"), 0.5)
  by_path = dict(tree_lib.leaves_with_paths(masks, is_leaf=tree_lib.is_none))
  assert [p for p, m in by_path.items() if m is not None] == ["fc1/bias", "fc1/kernel"]
  keep = [False, True, True, False]  # the two units with APoZ 1.0
  np.testing.assert_array_equal(by_path["fc1/bias"], keep)
  np.testing.assert_array_equal(by_path["fc1/kernel"], np.broadcast_to(keep, (1, 4)))
  # masked units now output exactly zero: their APoZ is 1.0
  nnx.update(model, jaxprune.apply_mask(params, masks))
  np.testing.assert_array_equal(apoz(model, BATCHES, "fc1")["fc1"], [1.0, 0.0, 0.5, 1.0])


@pytest.mark.parametrize(
  ("sparsity", "keep"),
  [
    (0.0, [1, 1, 1, 1]),
    (0.25, [1, 1, 1, 0]),  # tie at 1.0: the higher index goes first
    (0.5, [0, 1, 1, 0]),
    (0.75, [0, 1, 0, 0]),
  ],
)
def test_masks_exact_counts_and_ties(sparsity, keep):
  params = {"fc1": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)}}
  masks = apoz_masks(params, {"fc1": np.array(EXPECTED)}, sparsity)
  np.testing.assert_array_equal(masks["fc1"]["bias"], np.array(keep, bool))
  assert int(masks["fc1"]["kernel"].sum()) == 2 * sum(keep)


def test_masks_overrides_and_batchnorm_producers():
  params = {
    "Conv_0": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
    "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
    "Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
  }
  values = {
    "BatchNorm_0": np.array([0.9, 0.1, 0.8, 0.2]),
    "Dense_0": np.array([0.0, 0.5, 1.0, 0.7]),
  }
  masks = apoz_masks(
    params,
    values,
    0.5,
    overrides={"Dense": 0.25},
    producers={"BatchNorm_0": ("Conv_0", "BatchNorm_0")},
  )
  bn_keep = [False, True, False, True]
  np.testing.assert_array_equal(masks["Conv_0"]["kernel"][0, 0, 0], bn_keep)
  assert int(masks["Conv_0"]["kernel"].sum()) == 3 * 3 * 2 * 2
  for leaf in ("scale", "bias"):
    np.testing.assert_array_equal(masks["BatchNorm_0"][leaf], bn_keep)
  np.testing.assert_array_equal(masks["Dense_0"]["bias"], [True, True, False, True])
  assert masks["Dense_0"]["kernel"].sum() == 12


@pytest.mark.parametrize("sparsity, overrides", [(0.9, None), (0.5, {"fc1": 0.875})])
def test_masks_that_would_remove_every_unit_are_refused(sparsity, overrides):
  # round(0.9 * 4) = round(0.875 * 4) = 4: every unit of fc1 would go (a dead layer);
  # the pruners refuse the same count.
  params = {"fc1": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"'fc1' \(4 units\) would keep none"):
    apoz_masks(params, {"fc1": np.array(EXPECTED)}, sparsity, overrides=overrides)
  keep = apoz_masks(params, {"fc1": np.array(EXPECTED)}, 0.8)["fc1"]["bias"]  # round(3.2)
  np.testing.assert_array_equal(keep, [False, True, False, False])


def test_masks_errors():
  params = {"fc1": {"kernel": jnp.ones((2, 4))}}
  with pytest.raises(ValueError, match="No param of layer 'fc2'"):
    apoz_masks(params, {"fc2": np.zeros(4)}, 0.5)
  with pytest.raises(ValueError, match="No param of layer 'fc1' has 3"):
    apoz_masks(params, {"fc1": np.zeros(3)}, 0.5)
  with pytest.raises(ValueError, match="matches no layer"):
    apoz_masks(params, {"fc1": np.zeros(4)}, 0.5, overrides={"conv": 0.1})
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    apoz_masks(params, {"fc1": np.zeros(4)}, 1.0)
