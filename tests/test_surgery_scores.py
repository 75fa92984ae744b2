"""Structured scores from calibration data (FLAP) and gradients (Taylor), against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import surgery
from jaxprune.surgery import scores


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(5, 8, rngs=rngs)
    self.up = nnx.Linear(8, 12, rngs=rngs)
    self.down = nnx.Linear(12, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    h = h + self.down(nnx.gelu(self.up(h)))
    return self.head(h)


def batches(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32) for _ in range(n)]


def hidden(model, x):
  return np.asarray(nnx.gelu(model.up(model.embed(x))), np.float64).reshape(-1, 12)


def test_input_moments_and_flap_scores_match_numpy():
  model = MLP(nnx.Rngs(0))
  data = batches()
  stats = scores.input_moments(model, data)
  h = np.concatenate([hidden(model, x) for x in data])
  np.testing.assert_allclose(stats["down/kernel"].mean, h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["down/kernel"].var, h.var(0), rtol=1e-4, atol=1e-6)
  assert stats["down/kernel"].count == 24
  p = surgery.plan(model, example_input=data[0][:1])
  got = scores.flap_scores(p, nnx.state(model, nnx.Param), stats)["up/kernel"]
  w = np.asarray(model.down.kernel[...], np.float64)
  raw = h.var(0) * (w**2).sum(1)
  np.testing.assert_allclose(got, (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)


def test_flap_compensation_adds_the_removed_inputs_mean_to_the_bias():
  model = MLP(nnx.Rngs(0))
  data = batches()
  stats = scores.input_moments(model, data)
  p = surgery.plan(model, example_input=data[0][:1])
  params = nnx.state(model, nnx.Param)
  flap = scores.flap_scores(p, params, stats)
  remove = surgery.pruned_channels(p, params, {"up/kernel": 0.25}, scores=flap)
  assert remove == {"up/kernel": sorted(np.argsort(flap["up/kernel"])[:3].tolist())}
  fixed = scores.flap_compensate(p, params, stats, remove)
  h = np.concatenate([hidden(model, x) for x in data])
  w = np.asarray(model.down.kernel[...], np.float64)
  j = remove["up/kernel"]
  expected = np.asarray(model.down.bias[...]) + h.mean(0)[j] @ w[j]
  np.testing.assert_allclose(fixed["down"]["bias"], expected, rtol=1e-5, atol=1e-6)
  # the compensated, masked model shrinks to one that computes the same
  nnx.update(model, fixed)
  masks = surgery.group_masks(p, fixed, remove)
  small = surgery.shrink(model, masks=masks, example_input=data[0][:1])
  assert small.model.up.out_features == 9


def test_taylor_scores_sum_w_times_g_over_the_channel():
  model = MLP(nnx.Rngs(0))
  x = batches(1)[0]
  params = nnx.state(model, nnx.Param)
  graphdef, _ = nnx.split(model)

  def loss(params):
    return (nnx.merge(graphdef, params)(x) ** 2).sum()

  grads = jax.grad(loss)(params)
  p = surgery.plan(model, example_input=x[:1])
  got = scores.taylor_scores(p, params, grads)["up/kernel"]
  s = lambda a, b: np.abs(np.asarray(a) * np.asarray(b))  # noqa: E731
  expected = (
    s(params["up"]["kernel"], grads["up"]["kernel"]).sum(0)
    + s(params["up"]["bias"], grads["up"]["bias"])
    + s(params["down"]["kernel"], grads["down"]["kernel"]).sum(1)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_global_scope_ranks_groups_of_a_kind_together_and_keeps_one_each():
  model = MLP(nnx.Rngs(0))
  p = surgery.plan(model, example_input=batches(1)[0][:1])
  params = nnx.state(model, nnx.Param)
  stream = next(g.name for g in p.groups if ("embed/kernel", 1) in g.members)
  made_up = {"up/kernel": np.arange(12.0), stream: np.arange(8.0) + 9.5}
  got = surgery.pruned_channels(p, params, {"neurons": 0.5}, scores=made_up, scope="global")
  assert got == {"up/kernel": list(range(10)), stream: []}  # 10 of 20: 0..9 all in up
  by_group = surgery.pruned_channels(p, params, {"neurons": 0.5}, scores=made_up)
  assert by_group == {"up/kernel": list(range(6)), stream: [0, 1, 2, 3]}
  all_but = surgery.pruned_channels(p, params, {"up/kernel": 0.99}, scores=made_up)
  assert all_but["up/kernel"] == list(range(11))
