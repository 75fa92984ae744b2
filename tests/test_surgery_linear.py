"""A weight's input axes come from the traced dot_general, in the weight's own order.

One model reads five weights of five layouts, each a layer with 8 inputs and 6 outputs:
an attention-output einsum ``btnh,nhd->btd`` (the dot contracts ``(h, n)``), the same in
Gemma's capitals, a MaxText-style query ``[embed, heads, head_dim]``, a PyTorch-layout
``[out, in]`` weight (``einsum("btf,df->btd")``) and a plain Dense. Wanda and SparseGPT
masks are checked on the STORED arrays against NumPy written from the formulas; FLAP
scores and compensation against ``Var(X_j) * ||W_j||^2`` and ``E[X_j] W_j``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import posttrain, surgery
from jaxprune.surgery import scores

B, T = 4, 8  # 32 tokens


class Layouts(nnx.Module):
  def __init__(self, rngs):
    normal = lambda *s: nnx.Param(jax.random.normal(rngs.params(), s))  # noqa: E731
    self.attn_out = normal(4, 2, 6)  # [heads, head_dim, d]: inputs (0, 1)
    self.gemma_out = normal(2, 4, 6)  # [N, H, D]: inputs (0, 1)
    self.query = normal(8, 2, 3)  # [embed, heads, head_dim]: input 0
    self.torch = normal(6, 8)  # [out, in]: input 1
    self.dense = nnx.Linear(8, 6, rngs=rngs)

  def inputs(self, x):
    """Each layer's input as [tokens, its 8 input features in the weight's own order]."""
    return {
      "attn_out": np.sin(x),
      "gemma_out": np.cos(x),
      "query": x,
      "torch": x**2,
      "dense/kernel": np.tanh(x),
    }

  def __call__(self, x):
    b, t, _ = x.shape
    o = jnp.einsum("btnh,nhd->btd", jnp.sin(x).reshape(b, t, 4, 2), self.attn_out[...])
    g = jnp.einsum("BTNH,NHD->BTD", jnp.cos(x).reshape(b, t, 2, 4), self.gemma_out[...])
    q = jnp.einsum("btd,dnh->btnh", x, self.query[...]).reshape(b, t, 6)
    p = jnp.einsum("btf,df->btd", x**2, self.torch[...])
    return o + g + q + p + self.dense(jnp.tanh(x))


# The stored weight as [inputs, outputs], written out per layout (not via the code).
AS_MATRIX = {
  "attn_out": lambda w: w.reshape(8, 6),
  "gemma_out": lambda w: w.reshape(8, 6),
  "query": lambda w: w.reshape(8, 6),
  "torch": lambda w: w.T,
  "dense/kernel": lambda w: w,
}
IN_AXES = {"attn_out": (0, 1), "gemma_out": (0, 1), "query": (0,), "torch": (1,)}


@pytest.fixture(scope="module")
def setup():
  model = Layouts(nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(B, T, 8)).astype(np.float32)
  stats = posttrain.calibrate(model, None, [x])
  params = nnx.state(model, nnx.Param)
  weights = {p: np.asarray(v, np.float64) for p, v in jaxprune.tree.leaves_with_paths(params)}
  xs = {k: np.asarray(v, np.float64).reshape(-1, 8) for k, v in model.inputs(x).items()}
  return model, x, stats, params, weights, xs


def stored(tree):
  return {p: np.asarray(v) for p, v in jaxprune.tree.leaves_with_paths(tree) if v is not None}


def groups_of_4_per_output(path, mask):
  """Kept counts of every 4 consecutive inputs, in the stored array's own memory order."""
  if path == "torch":  # [out, in]: the inputs are the last axis
    return mask.reshape(6, 2, 4).sum(-1)
  return mask.reshape(2, 4, 6).sum(1)  # inputs lead: (n, h) / embed flattened C order


def test_input_axes_and_statistics_follow_the_weight(setup):
  _, _, stats, _, _, xs = setup
  for path, axes in IN_AXES.items():
    assert stats[path].layer.in_axes == axes
  for path, x in xs.items():
    np.testing.assert_allclose(stats[path].sq_norms, (x**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(stats[path].xtx, x.T @ x, rtol=1e-4, atol=1e-4)


def test_wanda_masks_equal_numpy_and_n_m_groups_are_stored_consecutively(setup):
  _, _, stats, params, weights, xs = setup
  got = stored(posttrain.wanda(params, stats, 0.5))
  for path, x in xs.items():
    score = np.abs(AS_MATRIX[path](weights[path])) * np.linalg.norm(x, axis=0)[:, None]
    keep = np.zeros(score.shape, bool)
    for j in range(6):
      keep[np.argsort(-score[:, j], kind="stable")[:4], j] = True
    np.testing.assert_array_equal(AS_MATRIX[path](got[path]), keep, err_msg=path)
  nm = stored(posttrain.wanda(params, stats, structure=jaxprune.n_m(2, 4)))
  for path, x in xs.items():
    assert (groups_of_4_per_output(path, nm[path]) == 2).all(), path
    score = np.abs(AS_MATRIX[path](weights[path])) * np.linalg.norm(x, axis=0)[:, None]
    for g in range(2):  # the 2 best of each group of 4 consecutive inputs
      block = score[4 * g : 4 * g + 4]
      best = np.sort(block, axis=0)[2:]
      kept = AS_MATRIX[path](nm[path])[4 * g : 4 * g + 4]
      np.testing.assert_allclose(np.sort(np.where(kept, block, -1), axis=0)[2:], best)


def test_sparsegpt_n_m_groups_are_stored_consecutively(setup):
  _, _, stats, params, _, _ = setup
  new, masks = posttrain.sparsegpt(params, stats, structure=jaxprune.n_m(2, 4), blocksize=4)
  new, masks = stored(new), stored(masks)
  for path in AS_MATRIX:
    assert (groups_of_4_per_output(path, masks[path]) == 2).all(), path
    assert ((new[path] != 0) == masks[path]).all(), path


def test_prune_wanda_n_m_on_the_model(setup):
  model, x, _, _, _, _ = setup
  params, masks = posttrain.prune(model, None, [x], method="wanda", structure=jaxprune.n_m(2, 4))
  for path, m in stored(masks).items():
    assert (groups_of_4_per_output(path, m) == 2).all(), path


def test_flap_scores_read_the_input_axis_of_in_out_and_out_in_weights():
  """``Var(X_j) * ||W_j||^2`` with W_j the row of an [in, out] kernel, the column of an
  [out, in] one (FLAP's formula in PyTorch's layout)."""
  model = TorchMLP(nnx.Rngs(0))
  data = mlp_batches()
  stats = scores.input_moments(model, data)
  assert stats["down/kernel"].axes == (1,) and stats["up/kernel"].axes == (0,)
  h = np.concatenate([model.hidden(x) for x in data])
  np.testing.assert_allclose(stats["down/kernel"].var, h.var(0), rtol=1e-4, atol=1e-6)
  p = surgery.plan(model, example_input=data[0][:1])
  got = scores.flap_scores(p, nnx.state(model, nnx.Param), stats)["up/kernel"]
  w = np.asarray(model.down.kernel[...], np.float64)  # [out, in]
  raw = h.var(0) * (w**2).sum(0)
  np.testing.assert_allclose(got, (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)


class TorchLinear(nnx.Module):
  """A Linear whose kernel is stored [out, in], as converted PyTorch checkpoints keep it."""

  def __init__(self, n_in, n_out, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n_out, n_in)) / n_in**0.5)
    self.bias = nnx.Param(jax.random.normal(rngs.params(), (n_out,)))

  def __call__(self, x):
    return jnp.einsum("btf,df->btd", x, self.kernel[...]) + self.bias[...]


class TorchMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(5, 12, rngs=rngs)
    self.down = TorchLinear(12, 5, rngs)

  def hidden(self, x):
    return np.asarray(nnx.gelu(self.up(x)), np.float64).reshape(-1, 12)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(x)))


def mlp_batches():
  rng = np.random.default_rng(1)
  return [jnp.asarray(rng.normal(size=(2, 4, 5)) + 0.5, jnp.float32) for _ in range(2)]


def test_flap_compensation_keeps_the_mean_output_of_an_out_in_layer():
  model = TorchMLP(nnx.Rngs(0))
  data = mlp_batches()
  dense_mean = np.concatenate([np.asarray(model(x)).reshape(-1, 5) for x in data]).mean(0)
  stats = scores.input_moments(model, data)
  p = surgery.plan(model, example_input=data[0][:1])
  params = nnx.state(model, nnx.Param)
  remove = {"up/kernel": [1, 4, 7]}
  fixed = scores.flap_compensate(p, params, stats, remove)
  h = np.concatenate([model.hidden(x) for x in data])
  w = np.asarray(model.down.kernel[...], np.float64)
  expected = np.asarray(model.down.bias[...]) + w[:, [1, 4, 7]] @ h.mean(0)[[1, 4, 7]]
  np.testing.assert_allclose(fixed["down"]["bias"], expected, rtol=1e-5, atol=1e-6)
  nnx.update(model, fixed)
  small = surgery.shrink(model, masks=surgery.group_masks(p, fixed, remove), example_input=data[0])
  assert small.model.up.out_features == 9 and small.model.down.kernel.shape == (5, 9)
  small_mean = np.concatenate([np.asarray(small.model(x)).reshape(-1, 5) for x in data]).mean(0)
  np.testing.assert_allclose(small_mean, dense_mean, rtol=1e-5, atol=1e-5)


def test_flap_compensate_with_a_group_of_no_removed_channels_is_a_no_op():
  model = TorchMLP(nnx.Rngs(0))
  data = mlp_batches()
  stats = scores.input_moments(model, data)
  p = surgery.plan(model, example_input=data[0][:1])
  params = nnx.state(model, nnx.Param)
  fixed = scores.flap_compensate(p, params, stats, {"up/kernel": []})
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fixed)):
    np.testing.assert_array_equal(a, b)


def test_taylor_scores_sum_the_out_in_weights_of_each_input():
  model = TorchMLP(nnx.Rngs(0))
  x = mlp_batches()[0]
  params = nnx.state(model, nnx.Param)
  graphdef, _ = nnx.split(model)
  grads = jax.grad(lambda p: (nnx.merge(graphdef, p)(x) ** 2).sum())(params)
  p = surgery.plan(model, example_input=x[:1])
  got = scores.taylor_scores(p, params, grads)["up/kernel"]
  s = lambda a, b: np.abs(np.asarray(a) * np.asarray(b))  # noqa: E731
  expected = (
    s(params["up"]["kernel"], grads["up"]["kernel"]).sum(0)
    + s(params["up"]["bias"], grads["up"]["bias"])
    + s(params["down"]["kernel"], grads["down"]["kernel"]).sum(0)  # [out, in]: columns
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_input_moments_with_nan_inputs_name_the_layer_and_the_feature():
  x = np.array(mlp_batches()[0])
  x[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match=r"layer 'up/kernel' contain NaN or inf, in input feature 3"):
    scores.input_moments(TorchMLP(nnx.Rngs(0)), [x])
