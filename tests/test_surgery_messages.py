"""Surgery's errors and reports: they name the argument, the group, the real reason and
the line of the model's code."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune import tree as tree_lib
from jaxprune.surgery import api


def build(make, seed=0):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    scale = 1 / np.sqrt(np.prod(x.shape[:-1])) if name == "kernel" else 0.5
    return jnp.asarray(rng.normal(size=x.shape) * scale + (0.3 if name == "bias" else 0), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 6, rngs=rngs)
    self.fc3 = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


# 16. Errors name the argument and what was expected.


def test_example_input_of_the_wrong_size_names_the_users_shape():
  for call in (
    lambda: surgery.shrink(build(MLP), example_input=jnp.ones((2, 5))),
    lambda: surgery.plan(build(MLP), example_input=jnp.ones((2, 5))),
  ):
    shape = r"example_input of shape \(2, 5\) float32 \(at test_surgery_messages.py:\d+\): dot_gen"
    with pytest.raises(ValueError, match=shape):
      call()
  with pytest.raises(TypeError, match="example_input must be an array"):
    surgery.plan(build(MLP), example_input=[[1.0, 2.0]])


def test_example_input_without_the_batch_axis_says_the_shape_needed():
  model = build(MLP)
  masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), nnx.state(model, nnx.Param))
  with pytest.raises(
    ValueError,
    match=r"example_input of shape \(4,\) must have a batch axis first.*runs on shape "
    r"\(1, 4\) \(its first layer, 'fc1/kernel', reads inputs of shape \(1, 4\)\)",
  ):
    surgery.shrink(model, masks=masks, example_input=jnp.ones((4,)))


def test_remove_out_of_range_and_unknown_names_list_what_exists():
  model = build(MLP)
  x = jnp.ones((1, 4))
  with pytest.raises(
    ValueError, match=r"remove=: group 'fc1/kernel' has channels 0..7; got \[99\]"
  ):
    surgery.shrink(model, remove={"fc1/kernel": [99]}, example_input=x)
  with pytest.raises(KeyError, match=r"No group 'fc9/kernel'.*fc1/kernel: 8, fc2/kernel: 6"):
    surgery.shrink(model, remove={"fc9/kernel": [0]}, example_input=x)
  p = surgery.plan(model, example_input=x)
  with pytest.raises(ValueError, match="group 'fc2/kernel' has channels 0..5"):
    surgery.group_masks(p, nnx.state(model, nnx.Param), {"fc2/kernel": [6]})
  with pytest.raises(ValueError, match=r"the params lack \['fc1/kernel'\], whose channels"):
    surgery.group_masks(p, {"other": jnp.ones(3)}, {"fc1/kernel": [0]})


def test_a_mask_with_the_wrong_shape_names_the_path():
  model = build(MLP)
  masks = {"fc1": {"kernel": jnp.ones((4, 7), bool)}}
  with pytest.raises(ValueError, match=r"masks: the mask for 'fc1/kernel' has shape \(4, 7\)"):
    surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 4)))


# 17. Messages: groups, real reasons, the model's own line, library limits.


def test_a_failed_check_names_the_group(monkeypatch):
  real = api.plan_removal

  def wrong_fold(the_plan, leaves, batches, candidates):
    removal = real(the_plan, leaves, batches, candidates)
    if "fc2/kernel" in candidates:  # a folding bug in one group
      removal.bias_delta["fc3/bias"] = removal.bias_delta.get("fc3/bias", 0) + 1.0
    return removal

  monkeypatch.setattr(api, "plan_removal", wrong_fold)
  with pytest.raises(ValueError, match=r"Surgery check failed.*Groups involved: fc2/kernel\.$"):
    surgery.shrink(
      build(MLP), remove={"fc1/kernel": [0], "fc2/kernel": [1]}, example_input=jnp.ones((1, 4))
    )


def test_a_library_failure_is_not_blamed_on_the_model(monkeypatch):
  real = api.take

  def wrong_take(x, kept):  # a slicing bug: kernels lose one more column than biases
    return real(x, {a: i[1:] if np.ndim(x) == 2 else i for a, i in kept.items()})

  monkeypatch.setattr(api, "take", wrong_take)
  with pytest.raises(ValueError, match="limit of jaxprune's surgery") as e:
    surgery.shrink(build(MLP), remove={"fc2/kernel": [0]}, example_input=jnp.ones((1, 4)))
  assert "hard-code" not in str(e.value)


class Padded(nnx.Module):
  """stem's dead channels pass a zero-padded depthwise conv before the 1x1 consumer."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (1, 1), rngs=rngs)
    self.dw = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
    self.point = nnx.Conv(4, 3, (1, 1), rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.point(self.dw(nnx.relu(self.stem(x)))).mean(axis=(1, 2)))


def test_the_reason_for_a_kept_channel_is_the_real_one():
  model = build(Padded)
  model.stem.bias.set_value(jnp.array([0.5, 0.6, 0.7, 0.8]))
  small = surgery.shrink(model, remove={"stem/kernel": [0]}, example_input=jnp.ones((1, 5, 5, 2)))
  assert small.kept_constant == {"stem/kernel": [0]}
  why = small.why_kept["stem/kernel"]
  assert "not constant over positions where point/kernel reads it" in why
  assert "padding at its borders" not in why


def test_a_blocked_op_points_at_the_models_line():
  class Grouped(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Conv(2, 4, (1, 1), rngs=rngs)
      self.g = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)

    def __call__(self, x):
      return self.g(self.a(x)).mean(axis=(1, 2, 3))

  p = surgery.plan(build(Grouped), example_input=jnp.ones((1, 4, 4, 2)))
  blocked = p.groups[0].blocked
  assert re.search(r"`conv_general_dilated` of g/kernel at test_surgery_messages\.py:\d+", blocked)
  assert "linear.py" not in blocked


# 22. Why pruned channels stay.


class Residual(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Linear(3, 4, rngs=rngs)
    self.branch = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    return self.head(nnx.relu(h + self.branch(h)))


def test_masks_that_disagree_across_a_residual_add_are_reported():
  model = build(Residual)
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  masks["stem"]["kernel"] = jnp.ones((3, 4), bool).at[:, :2].set(False)  # 50% of the stream
  masks["branch"]["kernel"] = jnp.ones((4, 4), bool).at[:, 1:3].set(False)
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 3)))
  assert small.removed == {"branch/kernel": [1]}  # 25%: closed on both sides
  line = next(x for x in small.report().splitlines() if x.startswith("branch/kernel"))
  assert "4 -> 3 channels" in line
  assert "kept 1 pruned channel [0]: pruned in stem/kernel but not in branch/kernel" in line
  assert "kept 1 pruned channel [2]: pruned in branch/kernel but not in stem/kernel" in line


def test_a_layer_whose_channels_are_all_pruned_keeps_one_and_says_so():
  model = build(MLP)
  masks = {"fc2": {"kernel": jnp.zeros((8, 6), bool)}}
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 4)))
  assert small.model.fc2.out_features == 1
  assert "kept 1 pruned channel [5]: all 6 channels are pruned; one stays" in small.report()
