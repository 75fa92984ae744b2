import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import surgery


class Chain(nnx.Module):
  """conv -> BN -> relu -> conv -> BN -> relu -> two consumers (a feature map used twice)."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(6, rngs=rngs)
    self.left = nnx.Conv(6, 3, (1, 1), rngs=rngs)
    self.right = nnx.Conv(6, 3, (1, 1), rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head((self.left(x) + self.right(x)).mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def chain():
  net = Chain(nnx.Rngs(0))
  net.bn1.scale.set_value(jnp.array([0.9, 0.05, 0.7, 0.01]))
  net.bn2.scale.set_value(jnp.array([0.03, 0.8, 0.02, 0.6, 0.5, 0.04]))
  return net, surgery.plan(net, example_input=jnp.ones((1, 6, 6, 1)))


def test_one_global_threshold_and_every_coupled_param_masked(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  m = surgery.slimming_masks(p, params, 0.5)  # 5 of the 10 smallest |gamma| go
  assert m["bn1"]["scale"].tolist() == [True, False, True, False]
  assert m["bn2"]["scale"].tolist() == [False, True, False, True, True, False]
  conv1, conv2 = np.asarray(m["conv1"]["kernel"]), np.asarray(m["conv2"]["kernel"])
  for j, kept in enumerate([True, False, True, False]):
    assert conv1[..., j].all() == kept and conv1[..., j].any() == kept
    assert bool(m["conv1"]["bias"][j]) == kept and bool(m["bn1"]["bias"][j]) == kept
    assert conv2[:, :, j, :].any() == kept  # the next conv's input channel
  gone = [0, 2, 5]
  for name in ("left", "right"):  # every consumer of the feature map
    k = np.asarray(m[name]["kernel"])
    assert not k[:, :, gone, :].any() and k[:, :, [1, 3, 4], :].all()
  assert m["head"]["kernel"].get_value() is None and m["left"]["bias"].get_value() is None


def test_slimming_masks_shrink_to_the_kept_channels(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  masks = surgery.slimming_masks(p, params, 0.5)
  small = surgery.shrink(net, masks=masks, example_input=jnp.ones((1, 6, 6, 1)))
  assert small.model.conv1.out_features == 2 and small.model.bn2.num_features == 3
  assert small.model.left.in_features == 3 and small.model.right.in_features == 3
  assert small.max_error < 1e-5


def test_keeps_one_channel_per_group_and_errors(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  m = surgery.slimming_masks(p, params, 0.9)
  assert int(m["bn1"]["scale"].sum()) >= 1 and int(m["bn2"]["scale"].sum()) >= 1
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    surgery.slimming_masks(p, params, 1.0)
  with pytest.raises(ValueError, match="No prunable group has a norm scale ending in 'gamma'"):
    surgery.slimming_masks(p, params, 0.5, scale="gamma")
  with pytest.raises(KeyError, match="No group 'nope'"):
    surgery.group_masks(p, params, {"nope": [0]})
  with pytest.raises(ValueError, match="blocked by the model output"):
    surgery.group_masks(p, params, {"head/kernel": [0]})


def test_group_masks_on_linen_params():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x)))
      return nn.Dense(2)(x)

  v = Net().init(jax.random.key(0), jnp.ones((1, 3)))
  p = surgery.plan(Net(), v, jnp.ones((1, 3)))
  m = surgery.group_masks(p, v["params"], {"params/Dense_0/kernel": [1]})
  assert m["Dense_0"]["kernel"][:, 1].tolist() == [False] * 3
  assert m["BatchNorm_0"]["scale"].tolist() == [True, False, True, True]
  assert m["Dense_1"]["kernel"][1].tolist() == [False, False]


def test_channel_masks_score_groups_by_all_their_producers(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  m = surgery.channel_masks(p, params, 0.5)
  l1 = np.abs(np.asarray(params["conv1"]["kernel"])).reshape(-1, 4).sum(0)
  expect = l1 >= np.sort(l1)[2]
  assert np.asarray(m["bn1"]["scale"]).tolist() == expect.tolist()
  assert int(np.asarray(m["bn2"]["scale"]).sum()) == 3
  with pytest.raises(ValueError, match="norm must be"):
    surgery.channel_masks(p, params, 0.5, norm="l0")


def test_channel_masks_refuse_a_nan_filter_or_score_naming_the_group(chain):
  # A NaN channel score sorted anywhere in Python's sort: channel 1 of conv1 (its filter
  # holds a NaN) was removed or kept depending on where it stood.
  _, p = chain
  net = Chain(nnx.Rngs(0))  # its own copy: the fixture's net is shared
  net.conv1.kernel.set_value(net.conv1.kernel[...].at[0, 0, 0, 1].set(jnp.nan))
  with pytest.raises(ValueError, match=r"'conv1/kernel' has NaN or infinite .* channels \[1\]"):
    surgery.channel_masks(p, nnx.state(net, nnx.Param), 0.5)
  scores = {"conv1/kernel": np.array([1.0, 2.0, np.inf, 3.0])}
  with pytest.raises(ValueError, match=r"channels \[2\] \(its scores are not finite\)"):
    surgery.pruned_channels(p, nnx.state(Chain(nnx.Rngs(0)), nnx.Param), 0.5, scores=scores)


def test_slimming_refuses_a_nan_gamma_naming_the_group(chain):
  # A NaN |gamma| was ranked silently (scale [1, nan, .5, .02] kept the NaN channel).
  _, p = chain
  params = nnx.state(Chain(nnx.Rngs(0)), nnx.Param)
  params["bn1"]["scale"] = jnp.array([1.0, jnp.nan, 0.5, 0.02])
  with pytest.raises(ValueError, match=r"'bn1/scale' is NaN or infinite at channels \[1\]"):
    surgery.slimming_masks(p, params, 0.5)
  params["bn1"]["scale"] = jnp.array([1.0, 0.3, 0.5, 0.02])
  assert surgery.slimming_masks(p, params, 0.5)["bn1"]["scale"].shape == (4,)


def test_ties_keep_the_lower_channel_everywhere(chain):
  """Equal scores: channel_masks, slimming_masks, the APoZ recipe's removal and the
  pruners all keep the lower index (channel_masks and the recipe removed it)."""
  import jaxprune
  from jaxprune.train import structured

  net, p = chain
  params = nnx.state(net, nnx.Param)
  ties = {"conv1/kernel": np.ones(4), "conv2/kernel": np.array([1.0, 1, 1, 1, 1, 1])}
  removed = surgery.pruned_channels(p, params, 0.5, scores=ties)
  assert removed["conv1/kernel"] == [2, 3] and removed["conv2/kernel"] == [3, 4, 5], removed
  equal = jax.tree.map(lambda x: x, params)
  equal["bn1"]["scale"] = jnp.ones(4)
  assert surgery.slimming_masks(p, equal, 0.5, scope="layer")["bn1"]["scale"].tolist() == [
    True, True, False, False
  ]  # fmt: skip
  apoz = structured._apoz_removal(p, {"conv1": np.full(4, 0.5), "conv2": np.zeros(6)}, 0.5)
  assert apoz == {"conv1/kernel": [2, 3], "conv2/kernel": [3, 4, 5]}, apoz
  mask = jaxprune.magnitude(0.5, structure="filters").masks({"w": jnp.ones((2, 4))})["w"]
  assert mask[0].tolist() == [True, True, False, False]


def test_slimming_layer_scope_prunes_each_group_by_its_own_gammas(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  m = surgery.slimming_masks(p, params, 0.5, scope="layer")
  assert np.asarray(m["bn1"]["scale"]).tolist() == [True, False, True, False]
  assert np.asarray(m["bn2"]["scale"]).tolist() == [False, True, False, True, True, False]
  # one global threshold would remove 0.05 (bn1) before 0.5 (bn2) whatever the layer
  scaled = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 100 if "bn2" in jax.tree_util.keystr(path) else x, params
  )
  g = surgery.slimming_masks(p, scaled, 0.5)
  assert int(np.asarray(g["bn1"]["scale"]).sum()) == 1  # bn1 loses all but one
  assert (
    int(np.asarray(surgery.slimming_masks(p, scaled, 0.5, scope="layer")["bn1"]["scale"]).sum())
    == 2
  )
  with pytest.raises(ValueError, match="scope must be 'global' or 'layer'"):
    surgery.slimming_masks(p, params, 0.5, scope="net")


def test_channel_masks_take_per_group_ratios(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  m = surgery.channel_masks(p, params, {"conv2/kernel": 0.5})
  assert m["bn1"]["scale"].get_value() is None and m["conv1"]["kernel"].get_value() is None
  assert int(np.asarray(m["bn2"]["scale"]).sum()) == 3
  removed = ~np.asarray(m["bn2"]["scale"])
  assert not np.asarray(m["left"]["kernel"])[:, :, removed].any()  # both consumers cut
  assert not np.asarray(m["right"]["kernel"])[:, :, removed].any()
  with pytest.raises(
    ValueError, match="No group or kind 'conv9/kernel'; kinds: .*groups: .*'conv2/kernel'"
  ):
    surgery.channel_masks(p, params, {"conv9/kernel": 0.5})
  with pytest.raises(ValueError, match=r"sparsity of 'conv2/kernel' must be in \[0, 1\)"):
    surgery.channel_masks(p, params, {"conv2/kernel": 1.5})
  with pytest.raises(ValueError, match="blocked by the model output"):
    surgery.channel_masks(p, params, {"head/kernel": 0.5})


def test_idle_channels_from_zero_filters_or_zero_consumer_slices(chain):
  net, p = chain
  params = nnx.state(net, nnx.Param)
  assert surgery.idle_channels(p, params) == {}
  k1 = np.asarray(params["conv1"]["kernel"]).copy()
  k1[..., 2] = 0  # conv1's filter 2 computes nothing
  left = np.asarray(params["left"]["kernel"]).copy()
  right = np.asarray(params["right"]["kernel"]).copy()
  left[:, :, 4], right[:, :, 4] = 0, 0  # nothing reads channel 4 of conv2 ...
  right[:, :, 1] = 0  # ... channel 1 is still read by `left`
  params["conv1"]["kernel"].set_value(jnp.asarray(k1))
  params["left"]["kernel"].set_value(jnp.asarray(left))
  params["right"]["kernel"].set_value(jnp.asarray(right))
  idle = surgery.idle_channels(p, params)
  assert idle == {"conv1/kernel": [2], "conv2/kernel": [4]}
  m = surgery.group_masks(p, params, idle)
  assert np.asarray(m["bn2"]["scale"]).tolist() == [True] * 4 + [False, True]
  assert not np.asarray(m["conv2"]["kernel"])[:, :, 2, :].any()  # conv1's channel 2 as input
