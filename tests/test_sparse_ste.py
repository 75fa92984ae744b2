"""STE and SR-STE: forward with the current top-k, dense updates, SR-STE's decay, N:M."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune.sparse import sr_ste, ste, ste_masks, ste_params


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
  keep = w.size - round(sparsity * w.size)
  order = np.argsort(-np.abs(w).ravel(), kind="stable")
  mask = np.zeros(w.size, bool)
  mask[order[:keep]] = True
  return mask.reshape(w.shape)


def test_forward_is_masked_and_the_gradient_passes_straight_through():
  params = {"w": jnp.array([[1.0, -4.0], [2.0, 3.0]]), "b": jnp.array([5.0])}
  tx = ste(optax.sgd(1.0), jaxprune.magnitude(0.5))
  state = tx.init(params)
  fwd = ste_params(params, state)
  assert fwd["w"].tolist() == [[0.0, -4.0], [0.0, 3.0]] and fwd["b"].tolist() == [5.0]
  grads = jax.grad(
    lambda p: (ste_params(p, state)["w"] * jnp.array([[1.0, 2.0], [3.0, 4.0]])).sum()
  )(params)
  assert grads["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_masks_follow_the_current_weights_and_decay_hits_the_pruned(decay):
  """SGD steps against NumPy: w <- w - lr (g + decay (1 - m) w); m = top-k |w| each step."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  params = {"w": jnp.asarray(w)}
  lr, s = 0.5, 0.6
  tx = ste(optax.sgd(lr), jaxprune.magnitude(s), decay=decay)
  state = tx.init(params)
  update = jax.jit(tx.update)
  m = magnitude_mask(w, s)
  flips = 0
  for _ in range(6):
    np.testing.assert_array_equal(np.asarray(ste_masks(state)["w"]), m)
    g = rng.normal(size=w.shape).astype(np.float32)
    updates, state = update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    w = w - lr * (g + decay * np.where(m, 0, w))
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-6, atol=1e-6)
    new = magnitude_mask(np.asarray(params["w"]), s)
    flips += int((new != m).sum())
    m = new
  np.testing.assert_array_equal(np.asarray(ste_masks(state)["w"]), m)
  assert flips > 0  # pruned weights come back under STE
  assert (np.asarray(params["w"]) != 0).all()  # the dense weights are kept


def test_sr_ste_n_m_masks_are_two_of_four_along_the_inputs_every_step():
  rng = np.random.default_rng(1)
  params = {"k": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
  tx = sr_ste(optax.adam(0.1), jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(4):
    m = np.asarray(ste_masks(state)["k"])
    np.testing.assert_array_equal(m.reshape(2, 4, 3).sum(axis=1), 2)
    w = np.abs(np.asarray(params["k"])).reshape(2, 4, 3)
    kept_min = np.where(m.reshape(2, 4, 3), w, np.inf).min(axis=1)
    pruned_max = np.where(m.reshape(2, 4, 3), -np.inf, w).max(axis=1)
    assert (kept_min >= pruned_max).all()
    updates, state = update({"k": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)


def test_sr_ste_default_decay_and_schedule():
  params = {"w": jnp.ones((4, 4))}
  tx = sr_ste(optax.sgd(1.0), jaxprune.magnitude(jaxprune.agp(0.5, begin=1, end=3, every=1)))
  state = tx.init(params)
  assert int(ste_masks(state)["w"].sum()) == 16  # s_0 = 0
  counts = []
  for _ in range(4):
    updates, state = tx.update({"w": jnp.zeros((4, 4))}, state, params)
    params = optax.apply_updates(params, updates)
    counts.append(int(ste_masks(state)["w"].sum()))
  assert counts == [
    16 - round(float(jaxprune.agp(0.5, 1, 3, 1).sparsity(t)) * 16) for t in (1, 2, 3, 4)
  ]
  pruned = ~np.asarray(ste_masks(state)["w"])
  updates, _ = tx.update({"w": jnp.zeros((4, 4))}, state, params)
  np.testing.assert_allclose(
    np.asarray(updates["w"])[pruned], -2e-4 * np.asarray(params["w"])[pruned]
  )


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def test_the_documented_training_step_trains():
  model = Mlp()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  y = jnp.asarray((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0))
  params = model.init(jax.random.key(0), x)["params"]
  tx = sr_ste(optax.adam(1e-2), jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, x, y):
    def loss_fn(params):
      logits = model.apply({"params": ste_params(params, state)}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(60):
    params, state, loss = train_step(params, state, x, y)
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0]
  sparse = ste_params(params, state)
  stats = jaxprune.summary(sparse)
  assert stats["Dense_0/kernel"].zeros == 24 and stats["Dense_1/kernel"].zeros == 64


def test_errors():
  with pytest.raises(TypeError, match="jaxprune.Pruner"):
    ste(optax.sgd(0.1), 0.5)
  with pytest.raises(ValueError, match="one jaxprune.sparse.ste state"):
    ste_params({"w": jnp.ones(2)}, optax.sgd(0.1).init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("decay, error", [
  (float("nan"), ValueError), (float("inf"), ValueError), (-1e-4, ValueError),
  ("0.1", TypeError), (True, TypeError), (jnp.ones(2), ValueError),
])  # fmt: skip
@pytest.mark.parametrize("make", [ste, sr_ste])
def test_decay_is_checked_where_it_is_given(make, decay, error):
  """decay=nan made every weight NaN after two steps; "0.1" was a TypeError from inside JAX."""
  with pytest.raises(error, match=rf"{make.__name__}: decay must be a number >= 0"):
    make(optax.sgd(0.1), jaxprune.magnitude(0.5), decay=decay)


def test_ste_params_takes_an_nnx_optimizer_state_as_documented():
  # opt.opt_state wraps the masks in OptVariable nodes and nnx params are Param nodes:
  # ste_params raised a pytree structure error on them
  from flax import nnx

  class Linear(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 3, rngs=rngs)

  model = Linear(nnx.Rngs(0))
  w0 = np.asarray(model.l1.kernel[...])
  opt = nnx.Optimizer(
    model, sr_ste(optax.sgd(0.1), jaxprune.magnitude(0.5), decay=0.5), wrt=nnx.Param
  )
  x = np.arange(8.0, dtype=np.float32).reshape(2, 4) / 8

  def loss(m):
    kernel = ste_params(nnx.state(m, nnx.Param), opt.opt_state)["l1"]["kernel"][...]
    return ((x @ kernel) ** 2).sum()

  grads = nnx.grad(loss)(model)
  mask = magnitude_mask(w0, 0.5)
  ref_grad = 2 * x.T @ (x @ (w0 * mask))  # the gradient of the masked weights, on every weight
  np.testing.assert_allclose(np.asarray(grads["l1"]["kernel"][...]), ref_grad, rtol=1e-5)
  opt.update(model, grads)
  w1 = w0 - 0.1 * (ref_grad + 0.5 * np.where(mask, 0, w0))
  np.testing.assert_allclose(np.asarray(model.l1.kernel[...]), w1, rtol=1e-5, atol=1e-7)
  sparse = ste_params(nnx.state(model, nnx.Param), opt.opt_state)
  np.testing.assert_allclose(
    np.asarray(sparse["l1"]["kernel"][...]), w1 * magnitude_mask(w1, 0.5), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_array_equal(np.asarray(sparse["l1"]["bias"][...]), 0.0)
