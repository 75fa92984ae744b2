"""Surgery on layers a new user brings that the other surgery tests do not: ``nnx.Dropout``
(PRNG keys in the model state), ``nnx.GroupNorm`` (its group count follows the removed
groups).

Reference: the masks applied with ``jnp.where`` to the original params and the original
model run, at two input sizes and batch sizes; weights filled with numpy (non-zero biases,
so removed channels emit constants).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from jaxprune import surgery
from jaxprune import tree as tree_lib


def build(make, seed=0):
  """``make(rngs)`` with numpy random weights, biases and norm scales."""
  model = make(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x  # PRNG keys and counts
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if name == "kernel":
      value = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif name == "scale":
      value = rng.uniform(0.5, 2.0, size=x.shape)
    else:
      value = 0.5 * rng.normal(size=x.shape) + 0.3
    return jnp.asarray(value, x.dtype)

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
  model.eval()
  return model


def masked_output(model, masks, x):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  masked = jax.tree.map(
    lambda m, w: w if m is None else jnp.where(m, w, 0), masks, params, is_leaf=lambda m: m is None
  )
  return nnx.merge(graphdef, masked, rest)(x)


def inputs(*shapes):
  rng = np.random.default_rng(1)
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


class WithDropout(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(5, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)  # its key is in the state
    self.b = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(self.drop(nnx.relu(self.a(x))))


def test_a_model_with_dropout_shrinks_in_eval_mode():
  model = build(WithDropout)
  x1, x2 = inputs((1, 5), (4, 5))
  p = surgery.plan(model, example_input=x1)
  masks = surgery.group_masks(p, nnx.state(model, nnx.Param), {"a/kernel": [0, 3, 5]})
  small = surgery.shrink(model, masks=masks, example_input=x1)
  assert small.model.a.kernel.shape == (5, 5) and small.model.b.kernel.shape == (5, 3)
  small.model.eval()
  for x in (x1, x2):
    np.testing.assert_allclose(small.model(x), masked_output(model, masks, x), atol=1e-5)
  # A mask tree over all variables (the Dropout's key included, all True) works the same.
  every = jax.tree.map(lambda v: jnp.ones(v.shape, bool), nnx.state(model))
  every["a"]["kernel"] = masks["a"]["kernel"]
  again = surgery.shrink(model, masks=every, example_input=x1, verify=False)
  assert again.removed == small.removed


class WithGroupNorm(nnx.Module):
  def __init__(self, rngs, **norm):
    self.a = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(8, rngs=rngs, **norm)
    self.b = nnx.Conv(8, 4, (1, 1), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.gn(self.a(x)))
    return self.head(nnx.relu(self.b(x)).max(axis=(1, 2)))


def test_group_norm_loses_whole_groups_and_its_group_count_follows():
  model = build(lambda rngs: WithGroupNorm(rngs, num_groups=2))
  size = model.gn.group_size
  x1, x2 = inputs((1, 6, 6, 3), (2, 7, 5, 3))
  p = surgery.plan(model, example_input=x1)
  # The channels within a group are tied by the group's statistic: only whole groups go.
  (within,) = [g for g in p.groups if g.blocked and "reduce_sum" in g.blocked]
  (groups,) = [g for g in p.groups if g.name.startswith("a/kernel") and not g.blocked]
  assert groups.size == 8 // size
  masks = surgery.group_masks(p, nnx.state(model, nnx.Param), {groups.name: [0]})
  small = surgery.shrink(model, masks=masks, example_input=x1)
  assert small.model.a.kernel.shape[-1] == small.model.gn.num_features == 8 - size
  assert (small.model.gn.num_groups, small.model.gn.group_size) == (8 // size - 1, size)
  assert small.widths["gn"] == {"num_features": 8 - size, "num_groups": 8 // size - 1}
  for x in (x1, x2):
    np.testing.assert_allclose(small.model(x), masked_output(model, masks, x), atol=1e-5)
  assert within.size == 1


class TwoAxes(nnx.Module):
  """Features as (heads, dim): the second layer reads two groups, on two input axes."""

  def __init__(self, rngs):
    self.a = nnx.LinearGeneral(5, (3, 4), rngs=rngs)
    self.b = nnx.LinearGeneral((3, 4), 6, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.b(nnx.relu(self.a(x)))))


def test_constants_of_a_removed_head_and_a_removed_dim_are_folded_once():
  model = build(TwoAxes)
  x1, x2 = inputs((1, 5), (4, 5))
  p = surgery.plan(model, example_input=x1)
  assert {g.name: g.size for g in p.groups if not g.blocked} == {
    "a/kernel:1": 3,
    "a/kernel:2": 4,
    "b/kernel": 6,
  }
  # Only the producer's weights are zero: entry (h, d) of a removed head or dim then
  # emits relu(bias[h, d]), which b must absorb once (head 1 and dim 2 share (1, 2)).
  kernel = np.ones((5, 3, 4), bool)
  kernel[:, 1, :] = kernel[:, :, [0, 2]] = False
  masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), nnx.state(model, nnx.Param))
  masks["a"]["kernel"] = jnp.asarray(kernel)
  small = surgery.shrink(model, masks=masks, example_input=x1)
  assert small.removed == {"a/kernel:1": [1], "a/kernel:2": [0, 2]}
  assert small.model.b.kernel.shape == (2, 2, 6)
  for x in (x1, x2):
    np.testing.assert_allclose(small.model(x), masked_output(model, masks, x), atol=1e-5)


class SizeScaled(nnx.Module):
  """Hidden units scaled by the sequence length: a dead unit's constant differs by size."""

  def __init__(self, rngs):
    self.a = nnx.Linear(5, 4, rngs=rngs)
    self.b = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)) * x.shape[1]).sum(1)


def test_a_constant_that_depends_on_the_input_size_is_kept_with_the_real_reason():
  model = build(SizeScaled)
  x1, x2 = inputs((1, 3, 5), (2, 6, 5))
  masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), nnx.state(model, nnx.Param))
  masks["a"]["kernel"] = jnp.asarray(np.arange(4) != 1)[None, :].repeat(5, 0)
  small = surgery.shrink(model, masks=masks, example_input=x1)
  assert small.kept_constant == {"a/kernel": [1]}
  why = small.why_kept["a/kernel"]
  assert "differs between the input sizes tried" in why and "strided" not in why
  for x in (x1, x2):
    np.testing.assert_allclose(small.model(x), masked_output(model, masks, x), atol=1e-5)


class WeightNormed(nnx.Module):
  """A hand-written weight-normalised layer: w / ||w|| over its inputs."""

  def __init__(self, rngs):
    self.a = nnx.Linear(5, 4, rngs=rngs)
    self.w = nnx.Param(jnp.ones((4, 3)))
    self.b = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    w = self.w[...] / jnp.linalg.norm(self.w[...], axis=0, keepdims=True)
    return self.b(nnx.relu(nnx.relu(self.a(x)) @ w))


def test_masks_that_make_the_masked_model_nan_are_named_not_a_mismatch():
  model = build(WeightNormed)
  masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), nnx.state(model, nnx.Param))
  masks["w"] = jnp.asarray(np.arange(3) != 1)[None, :].repeat(4, 0)  # column 1: 0 / 0
  with pytest.raises(ValueError, match=r"masked model itself outputs NaN or inf at input sha"):
    surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 5)))


class LinenGroupNorm(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = linen.relu(linen.GroupNorm(num_groups=2, name="gn")(linen.Conv(8, (3, 3), name="a")(x)))
    return linen.Dense(2)(linen.relu(linen.Conv(4, (1, 1))(x)).max(axis=(1, 2)))


def test_linen_group_norm_loses_whole_groups_and_its_group_count_follows():
  model = LinenGroupNorm()
  x1, x2 = inputs((1, 4, 4, 3), (2, 5, 3, 3))
  variables = model.init(jax.random.key(0), x1)
  p = surgery.plan(model, variables, example_input=x1)
  (groups,) = [g for g in p.groups if g.name.startswith("params/a/kernel") and not g.blocked]
  assert groups.size == 2  # was blocked: the rebuilt GroupNorm kept num_groups=2
  masks = surgery.group_masks(p, variables["params"], {groups.name: [1]})
  small = surgery.shrink(model, variables, masks=masks, example_input=x1)
  assert small.widths["gn"] == {"num_groups": 1}
  assert small.variables["params"]["a"]["kernel"].shape == (3, 3, 3, 4)
  masked = {
    "params": jax.tree.map(
      lambda m, w: w if m is None else jnp.where(m, w, 0),
      masks,
      variables["params"],
      is_leaf=lambda m: m is None,
    )
  }
  for x in (x1, x2):
    np.testing.assert_allclose(
      small.model.apply(small.variables, x), model.apply(masked, x), atol=1e-5
    )


class BareGroupNorm(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(8, num_groups=2, use_scale=False, use_bias=False, rngs=rngs)
    self.b = nnx.Conv(8, 4, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.gn(self.a(x)))).max(axis=(1, 2))


def test_a_group_norm_without_params_is_named_when_its_groups_go():
  model = BareGroupNorm(nnx.Rngs(0))
  x = jnp.ones((1, 4, 4, 3))
  p = surgery.plan(model, example_input=x)
  (groups,) = [g for g in p.groups if g.name.startswith("a/kernel") and not g.blocked]
  with pytest.raises(ValueError, match=r"nnx.GroupNorm at 'gn' has no scale or bias.*keep="):
    surgery.shrink(model, remove={groups.name: [1]}, example_input=x)


def test_filters_pruned_inside_group_norm_groups_stay_and_the_report_says_why():
  model = build(lambda rngs: WithGroupNorm(rngs, num_groups=2))
  x = inputs((1, 5, 5, 3))[0]
  masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), nnx.state(model, nnx.Param))
  masks["a"]["kernel"] = jnp.asarray(~np.isin(np.arange(8), [0, 4, 5, 6]))[None, None, None]
  masks["a"]["kernel"] = jnp.broadcast_to(masks["a"]["kernel"], (3, 3, 3, 8))
  small = surgery.shrink(model, masks=masks, example_input=x, verify=False)
  (name,) = [n for n in small.stayed if n.startswith("a/kernel")]
  assert small.removed.get(name) is None
  ((chans, why),) = small.stayed[name]
  assert chans == [0, 1] and "block of 4 entries" in why and "only whole blocks go" in why
  assert "kept 2 pruned channels [0, 1]: each is a block of 4" in small.report()


class HeadsAsH(nnx.Module):
  """Attention whose head count is ``self.h``: not a name surgery updates."""

  def __init__(self, rngs, h=4, d=2):
    self.h = h
    self.q, self.k, self.v = (nnx.Linear(5, h * d, rngs=rngs) for _ in range(3))
    self.o = nnx.Linear(h * d, 3, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (f(x).reshape(b, t, self.h, -1) for f in (self.q, self.k, self.v))
    w = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), -1)
    return self.o(jnp.einsum("bhts,bshd->bthd", w, v).reshape(b, t, -1))


def test_a_head_count_under_another_name_is_named_when_the_check_fails():
  model = build(HeadsAsH)
  with pytest.raises(ValueError, match=r"Groups involved: heads\. The heads of HeadsAsH .*num_he"):
    surgery.shrink(model, remove={"heads": [0, 1]}, example_input=jnp.ones((1, 3, 5)))
