"""posttrain: Wanda and SparseGPT against closed forms and NumPy references; calibration
of NNX and Linen models (also block by block; over 8 simulated devices: test_posttrain_sharded.py)."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import posttrain
from jaxprune.posttrain.sparsegpt_solver import block_counts
from jaxprune.posttrain.stats import InputStats


def correlated_layer(seed=0, n_in=256, n_out=128, tokens=2048, rank=32, noise=0.3, sigma=1.0):
  """Inputs: a rank-32 mixture plus noise, channels scaled log-normally (sigma 1)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(tokens, rank)) @ rng.normal(size=(rank, n_in)) / np.sqrt(rank)
  x = (mix + noise * rng.normal(size=(tokens, n_in))) * np.exp(sigma * rng.normal(size=n_in))
  w = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
  return x.astype(np.float32), w.astype(np.float32)


def relative_error(x, w, w_new):
  """||XW - XW'|| / ||XW||, in float64 NumPy."""
  x = x.astype(np.float64)
  ref = x @ w.astype(np.float64)
  return np.linalg.norm(ref - x @ np.asarray(w_new, np.float64)) / np.linalg.norm(ref)


def numpy_topk_per_column(scores, n_removed):
  """Keeps the n_in - n_removed largest of each column (ties: lower row), by stable argsort."""
  keep = np.zeros(scores.shape, bool)
  for j in range(scores.shape[1]):
    order = np.argsort(-scores[:, j], kind="stable")
    keep[order[: scores.shape[0] - n_removed], j] = True
  return keep


def numpy_nm(scores, n, m):
  groups = scores.reshape(-1, m, scores.shape[1])
  keep = np.zeros(groups.shape, bool)
  for g in range(groups.shape[0]):
    keep[g] = numpy_topk_per_column(groups[g], m - n)
  return keep.reshape(scores.shape)


def hessian_of(x):
  x = x.astype(np.float64)
  return jnp.asarray(2 / len(x) * x.T @ x, jnp.float32)


# --- SparseGPT against the closed-form OBS update -----------------------------------


@pytest.mark.parametrize("p", [0, 5])
def test_sparsegpt_single_pruned_row_is_the_obs_update(p):
  """One block, one input feature pruned in every output: dW = -(w_p / [H^-1]_pp) H^-1[:, p].

  Rows are processed in order, so rows before p are final when p is reached: the update
  is OBS over the rows from p on, i.e. with H^-1 of H[p:, p:] (for p = 0, all of H).
  """
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 12)) @ (np.eye(12) + 0.3 * rng.normal(size=(12, 12)))  # correlated
  w = rng.normal(size=(12, 5)).astype(np.float32)
  h = hessian_of(x)
  mask = np.ones(w.shape, bool)
  mask[p] = False
  new, kept = posttrain.sparsegpt_layer(jnp.asarray(w), h, mask=mask, dampening=0.0, blocksize=12)
  h_inv = np.linalg.inv(np.asarray(h, np.float64)[p:, p:])
  expected = np.zeros(w.shape)
  expected[p:] = -(w[p][None, :] / h_inv[0, 0]) * h_inv[:, 0][:, None]
  np.testing.assert_allclose(np.asarray(new, np.float64) - w, expected, atol=1e-5)
  assert np.asarray(new)[p].tolist() == [0.0] * 5
  np.testing.assert_array_equal(kept, mask)


def numpy_sparsegpt(w, h, sparsity=0.5, nm=None, mask=None, blocksize=128, dampening=0.01):
  """The paper's algorithm in float64 NumPy, row by row, every later row updated at once."""
  w, h = w.astype(np.float64), h.astype(np.float64)
  n_in, n_out = w.shape
  dead = np.diagonal(h) == 0
  h[dead, dead] = 1
  w[dead] = 0
  h += dampening * np.mean(np.diagonal(h)) * np.eye(n_in)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
  keep = np.ones(w.shape, bool)
  counts = block_counts(n_in, n_out, sparsity, blocksize)
  for b, i1 in enumerate(range(0, n_in, blocksize)):
    i2 = min(i1 + blocksize, n_in)
    if mask is not None:
      keep[i1:i2] = mask[i1:i2]
    elif nm is None:  # the block's counts[b] smallest w^2 / U_ii^2
      score = (w[i1:i2] ** 2 / np.diagonal(u)[i1:i2, None] ** 2).ravel()
      flat = np.ones(score.size, bool)
      flat[np.argsort(score, kind="stable")[: counts[b]]] = False
      keep[i1:i2] = flat.reshape(i2 - i1, n_out)
    for i in range(i1, i2):
      if nm is not None and (i - i1) % nm[1] == 0:
        g = w[i : i + nm[1]] ** 2 / np.diagonal(u)[i : i + nm[1], None] ** 2
        keep[i : i + nm[1]] = numpy_topk_per_column(g, nm[1] - nm[0])
      q = np.where(keep[i], w[i], 0.0)
      err = (w[i] - q) / u[i, i]
      w[i:] -= u[i, i:, None] * err[None, :]
      w[i] = q
  return w, keep


@pytest.mark.parametrize("target", ["50%", "2:4"])
def test_sparsegpt_equals_the_float64_row_by_row_reference(target, monkeypatch):
  """72 inputs in blocks of 32 (the last one partial, padded), 16-row sub-blocks, earlier
  errors gathered in 32-row matmuls: the masks and weights of the plain algorithm."""
  from jaxprune.posttrain import sparsegpt_solver

  monkeypatch.setattr(sparsegpt_solver, "_CHUNK_ROWS", 32)
  sparsegpt_solver._solve.clear_cache()
  x, w = correlated_layer(seed=5, n_in=72, n_out=6, tokens=400, rank=16)
  h = hessian_of(x)
  nm = (2, 4) if target == "2:4" else None
  structure = jaxprune.n_m(*nm) if nm else None
  new, kept = posttrain.sparsegpt_layer(jnp.asarray(w), h, 0.5, structure=structure, blocksize=32)
  sparsegpt_solver._solve.clear_cache()  # compiled with the patched chunk size
  ref_w, ref_keep = numpy_sparsegpt(w, np.asarray(h), 0.5, nm, blocksize=32)
  np.testing.assert_array_equal(kept, ref_keep)
  np.testing.assert_allclose(new, ref_w, atol=2e-5 * np.abs(ref_w).max())


def test_inverse_cholesky_in_levels_equals_float64(monkeypatch):
  """U (upper, H'^-1 = U^T U) from the blocked triangular inverse: 30 inputs in leaves of
  8 (padded to 32, two levels of joins), a dead input, against NumPy in float64."""
  from jaxprune.posttrain import sparsegpt_solver

  monkeypatch.setattr(sparsegpt_solver, "_LEAF", 8)
  x = np.random.default_rng(6).normal(size=(90, 30)) * np.exp(np.linspace(-1, 1, 30))
  x[:, 4] = 0
  h = 2 / 90 * x.T @ x
  u, dead = sparsegpt_solver.inverse_cholesky(jnp.asarray(h, jnp.float32), 0.01)
  h[4, 4] = 1
  h += 0.01 * np.mean(np.diagonal(h)) * np.eye(30)
  ref = np.linalg.cholesky(np.linalg.inv(h)).T
  np.testing.assert_allclose(u, ref, atol=1e-5 * np.abs(ref).max())
  assert np.asarray(dead).tolist() == [i == 4 for i in range(30)]


def test_sparsegpt_compiles_one_block_loop():
  """One loop over the blocks, a partial last block included (it is padded): not a copy
  of the loop per segment of blocks (and one more for the partial block)."""
  from jaxprune.posttrain import sparsegpt_solver

  w, h = jnp.zeros((95, 7)), jnp.eye(95)
  removed = jnp.zeros(3, jnp.int32)
  for nm, group in ((None, 1), (jaxprune.n_m(1, 5), 5)):
    jaxpr = jax.make_jaxpr(
      lambda w, h, r, nm=nm, group=group: sparsegpt_solver._solve(
        w, h, r, None, jnp.float32(0.01), nm=nm, blocksize=40, group=group
      )
    )(w, h, removed)
    (solve,) = [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    loops = [e for e in solve.params["jaxpr"].eqns if e.primitive.name in ("while", "scan")]
    assert len(loops) == 1


# --- Reconstruction on a layer with correlated, log-normally scaled inputs ----------

ERRORS = {}


@pytest.mark.parametrize(
  "structure, expected",
  [(None, (0.040, 0.067, 0.272)), (jaxprune.n_m(2, 4), (0.057, 0.126, 0.372))],
  ids=["50%", "2:4"],
)
def test_reconstruction_orders_sparsegpt_wanda_magnitude(structure, expected):
  x, w = correlated_layer()
  norms = np.linalg.norm(x.astype(np.float64), axis=0)
  new, kept = posttrain.sparsegpt_layer(jnp.asarray(w), hessian_of(x), 0.5, structure=structure)
  wanda = posttrain.wanda_mask(
    jnp.asarray(w), jnp.asarray(norms, jnp.float32), 0.5, structure=structure
  )
  scores_w, scores_m = np.abs(w) * norms[:, None], np.abs(w)
  if structure is None:
    ref_wanda, magnitude = (
      numpy_topk_per_column(scores_w, 128),
      numpy_topk_per_column(scores_m, 128),
    )
  else:
    ref_wanda, magnitude = numpy_nm(scores_w, 2, 4), numpy_nm(scores_m, 2, 4)
  np.testing.assert_array_equal(wanda, ref_wanda)
  errors = (
    relative_error(x, w, new),
    relative_error(x, w, w * ref_wanda),
    relative_error(x, w, w * magnitude),
  )
  print("relative reconstruction error sparsegpt / wanda / magnitude:", np.round(errors, 4))
  assert errors[0] < errors[1] < errors[2]
  np.testing.assert_allclose(errors, expected, atol=0.004)
  assert np.all(np.asarray(new)[~np.asarray(kept)] == 0)


# --- Exact counts --------------------------------------------------------------------


def test_exact_counts_unstructured():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(95, 7)), jnp.float32)
  x = rng.normal(size=(300, 95))
  masks = posttrain.wanda_mask(w, jnp.ones(95), 0.3)
  # 0.3 * 95 = 28.499999999999996 in float64: 28 removed from every output
  assert np.asarray(masks).sum(axis=0).tolist() == [95 - 28] * 7
  # SparseGPT: round(s * size) per layer, with a partial last block (95 = 2 * 40 + 15)
  for s in (0.3, 0.37, 0.5):
    _, kept = posttrain.sparsegpt_layer(w, hessian_of(x), s, blocksize=40)
    assert np.asarray(kept).size - np.asarray(kept).sum() == round(s * 95 * 7)
  counts = block_counts(95, 7, 0.37, 40)
  assert counts.sum() == round(0.37 * 665) and len(counts) == 3


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_exact_n_of_m_along_inputs(n, m):
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  x = rng.normal(size=(100, 32))
  for kept in (
    posttrain.wanda_mask(
      w, jnp.asarray(np.linalg.norm(x, axis=0), jnp.float32), structure=jaxprune.n_m(n, m)
    ),
    posttrain.sparsegpt_layer(w, hessian_of(x), structure=jaxprune.n_m(n, m), blocksize=16)[1],
  ):
    assert (np.asarray(kept).reshape(32 // m, m, 6).sum(axis=1) == n).all()


# --- Dead inputs ----------------------------------------------------------------------


def test_dead_inputs_are_zeroed_without_nan():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(200, 16))
  x[:, [3, 7]] = 0.0  # no calibration token uses these inputs
  w = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  for structure in (None, jaxprune.n_m(2, 4)):
    new, kept = posttrain.sparsegpt_layer(w, hessian_of(x), 0.5, structure=structure, blocksize=8)
    assert np.isfinite(new).all()
    assert (np.asarray(new)[[3, 7]] == 0).all()  # W_j = 0 for H_jj = 0
    assert not np.asarray(kept)[[3, 7]].any()  # score 0: pruned first
    norms = jnp.asarray(np.linalg.norm(x, axis=0), jnp.float32)
    wanda = posttrain.wanda_mask(w, norms, 0.5, structure=structure)
    assert not np.asarray(wanda)[[3, 7]].any()


# --- Properties on small shapes -------------------------------------------------------


@settings(max_examples=25)  # four shapes: each compiles the solver once
@given(
  w=hnp.arrays(
    np.float32,
    st.tuples(st.sampled_from([4, 8]), st.sampled_from([1, 3])),
    elements=st.sampled_from([0.0, 1.0, -1.0, 2.0]),  # many ties, and all-zero kernels
  ),
  sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
  seed=st.integers(0, 3),
)
def test_properties_ties_single_column_zero_weights(w, sparsity, seed):
  n_in, n_out = w.shape
  x = np.random.default_rng(seed).normal(size=(3 * n_in, n_in))
  norms = np.ones(n_in, np.float32)
  kept = posttrain.wanda_mask(jnp.asarray(w), jnp.asarray(norms), sparsity)
  n_removed = round(sparsity * n_in)
  np.testing.assert_array_equal(kept, numpy_topk_per_column(np.abs(w), n_removed))
  new, kept = posttrain.sparsegpt_layer(jnp.asarray(w), hessian_of(x), sparsity, blocksize=4)
  new, kept = np.asarray(new), np.asarray(kept)
  assert np.isfinite(new).all()
  assert kept.size - kept.sum() == round(sparsity * w.size)
  assert (new[~kept] == 0).all()
  if not w.any():
    assert not new.any()  # nothing to reconstruct: all-zero weights stay zero
  nm = posttrain.wanda_mask(jnp.asarray(w), jnp.asarray(norms), structure=jaxprune.n_m(2, 4))
  np.testing.assert_array_equal(nm, numpy_nm(np.abs(w), 2, 4))


# --- Calibration of models -----------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    x = nn.relu(nn.Dense(8, name="fc2")(x))
    return nn.Dense(3, name="head")(x)


BATCHES = [np.random.default_rng(i).normal(size=(32, 8)).astype(np.float32) for i in range(3)]


def numpy_inputs(p, kernel1=None):
  """The inputs of fc1, fc2 and head over BATCHES, in float64 NumPy (p: kernels and biases)."""
  k1 = p["fc1/kernel"] if kernel1 is None else kernel1
  x = np.concatenate(BATCHES).astype(np.float64)
  h1 = np.maximum(x @ k1 + p["fc1/bias"], 0)
  h2 = np.maximum(h1 @ p["fc2/kernel"] + p["fc2/bias"], 0)
  return {"fc1": x, "fc2": h1, "head": h2}


def mask_paths(masks):
  return [
    p
    for p, m in jaxprune.tree.leaves_with_paths(masks, is_leaf=jaxprune.tree.is_none)
    if m is not None
  ]


def flat_params(params):
  return {
    jaxprune.tree.strip_collection(k): np.asarray(v, np.float64)
    for k, v in jaxprune.tree.leaves_with_paths(params)
  }


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_calibrate_matches_numpy(kind):
  if kind == "nnx":
    model, variables = MLP(nnx.Rngs(0)), None
    p = flat_params(nnx.state(model, nnx.Param))
  else:
    model = LinenMLP()
    variables = model.init(jax.random.key(0), BATCHES[0])
    p = flat_params(variables["params"])
  got = posttrain.calibrate(model, variables, BATCHES)
  prefix = "" if kind == "nnx" else "params/"
  assert list(got) == [f"{prefix}{n}/kernel" for n in ("fc1", "fc2", "head")]
  for name, x in numpy_inputs(p).items():
    s = got[f"{prefix}{name}/kernel"]
    assert int(s.count) == 96
    np.testing.assert_allclose(s.sq_norms, (x**2).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.xtx, x.T @ x, rtol=1e-5, atol=1e-4)
  only = posttrain.calibrate(model, variables, BATCHES, where="fc2", hessian=False)
  assert list(only) == [f"{prefix}fc2/kernel"] and only[f"{prefix}fc2/kernel"].xtx is None


class Projections(nnx.Module):
  """LinearGeneral [in, heads, head_dim] and an einsum weight [heads, head_dim, out]."""

  def __init__(self, rngs):
    self.qkv = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
    self.out = nnx.Param(jax.random.normal(rngs.params(), (2, 4, 6)))

  def __call__(self, x):
    return jnp.einsum("bthk,hkd->btd", self.qkv(x), self.out[...])


def test_linear_general_and_einsum_flatten_contracted_axes():
  model = Projections(nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  got = posttrain.calibrate(model, None, [x])
  assert got["qkv/kernel"].layer.in_axes == (0,) and got["out"].layer.in_axes == (0, 1)
  y = np.asarray(model.qkv(x)).reshape(10, 8)  # (head, head_dim) flattened: the input features
  np.testing.assert_allclose(got["out"].xtx, y.T @ y, rtol=1e-4, atol=1e-4)
  params = nnx.state(model, nnx.Param)
  masks = posttrain.wanda(params, got, structure=jaxprune.n_m(2, 4))
  kept = np.asarray(masks["out"]).reshape(8, 6)  # 2 of every 4 (head, head_dim) inputs
  assert (kept.reshape(2, 4, 6).sum(axis=1) == 2).all()
  new, masks = posttrain.sparsegpt(params, got, 0.5)
  assert np.asarray(masks["qkv"]["kernel"]).sum() == 32 and new["out"][...].shape == (2, 4, 6)


def test_sequential_blocks_see_pruned_inputs():
  """Block fc2 is calibrated on fc1's output after fc1 is pruned (and updated)."""
  model = MLP(nnx.Rngs(0))
  p = flat_params(nnx.state(model, nnx.Param))
  params, masks = posttrain.prune(model, None, BATCHES, method="sparsegpt", blocks=["fc1", "fc2"])
  assert mask_paths(masks) == ["fc1/kernel", "fc2/kernel"]  # the head is in no block
  k1 = np.asarray(params["fc1"]["kernel"][...], np.float64)
  x2 = numpy_inputs(p, kernel1=k1)["fc2"]
  expected, _ = posttrain.sparsegpt_layer(
    jnp.asarray(p["fc2/kernel"], jnp.float32), hessian_of(x2), 0.5
  )
  np.testing.assert_allclose(params["fc2"]["kernel"][...], expected, atol=1e-4)
  one_pass, _ = posttrain.prune(model, None, BATCHES, method="sparsegpt", where=["fc1", "fc2"])
  assert not np.allclose(one_pass["fc2"]["kernel"][...], expected, atol=1e-4)  # dense inputs
  assert np.asarray(masks["fc1"]["kernel"]).sum() == 64


def test_linen_prune_masks_keep_zeros_while_fine_tuning():
  model = LinenMLP()
  variables = model.init(jax.random.key(0), BATCHES[0])
  params, masks = posttrain.prune(
    model, variables, BATCHES, method="wanda", structure=jaxprune.n_m(2, 4), blocks=r"(fc\d)/"
  )
  assert mask_paths(masks) == ["fc1/kernel", "fc2/kernel"]
  assert (np.asarray(params["fc1"]["kernel"]) != 0).sum() == 64  # 2:4 of 8 x 16
  tx = jaxprune.masked(optax.adam(1e-2), masks)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert (np.asarray(new["fc1"]["kernel"])[~np.asarray(masks["fc1"]["kernel"])] == 0).all()


# --- Errors name the layer ------------------------------------------------------------


class Unused(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(6, 4, rngs=rngs)
    self.spare = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


def test_errors_name_the_layer():
  model = Unused(nnx.Rngs(0))
  x = np.ones((4, 6), np.float32)
  with pytest.raises(ValueError, match=r"'spare/kernel'.*does not reach it"):
    posttrain.calibrate(model, None, [x], where="spare/kernel")
  with pytest.raises(ValueError, match="no calibration batches"):
    posttrain.calibrate(model, None, [])
  got = posttrain.calibrate(model, None, [x])
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ValueError, match=r"'fc/kernel'.*6 input features.*divide by 4"):
    posttrain.wanda(params, got, structure=jaxprune.n_m(2, 4))
  with pytest.raises(ValueError, match=r"'fc/kernel'.*6 input features.*divide by 4"):
    posttrain.sparsegpt(params, got, structure=jaxprune.n_m(2, 4))
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
      posttrain.wanda(params, got, bad)
  empty = {"fc/kernel": InputStats(jnp.zeros(6), None, jnp.int32(0), got["fc/kernel"].layer)}
  with pytest.raises(ValueError, match=r"'fc/kernel' has no captured inputs"):
    posttrain.wanda(params, empty)
  with pytest.raises(ValueError, match=r"'fc/kernel'.*X\^T X was not collected"):
    posttrain.sparsegpt(params, posttrain.calibrate(model, None, [x], hessian=False))
  with pytest.raises(ValueError, match="matches none of the linear layers"):
    posttrain.prune(model, None, [x], blocks=["nope"])


def test_non_finite_calibration_inputs_name_the_layer_and_the_feature():
  """A NaN score would rank first (Wanda keeps the feature's weights); SparseGPT's
  Cholesky fails. Both: an error naming the layer and the input feature."""
  model = MLP(nnx.Rngs(0))
  bad = [BATCHES[0], BATCHES[1].copy()]
  bad[1][3, 5] = np.nan
  for method in ("wanda", "sparsegpt"):
    with pytest.raises(
      ValueError, match=r"layer 'fc1/kernel' contain NaN or inf, in input feature 5"
    ):
      posttrain.prune(model, None, bad, method=method)
  bad[1][3, 5] = np.inf
  with pytest.raises(ValueError, match=r"'fc1/kernel'.*input feature 5"):
    posttrain.calibrate(model, None, bad)
  params = nnx.state(model, nnx.Param)
  stats = posttrain.calibrate(model, None, BATCHES[:1], where="fc2")
  st = stats["fc2/kernel"]
  nan_stats = {"fc2/kernel": st.replace(sq_norms=st.sq_norms.at[7].set(jnp.nan))}
  with pytest.raises(ValueError, match=r"wanda: .*'fc2/kernel'.*input feature 7 \(axis 0"):
    posttrain.wanda(params, nan_stats)
  with pytest.raises(ValueError, match=r"input feature 2"):
    posttrain.wanda_mask(jnp.ones((4, 3)), jnp.array([1.0, 1.0, jnp.nan, 1.0]))
  x = np.ones((5, 4), np.float32)
  x[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"Layer 'kernel'.*NaN or inf at input feature 1 \(1 of 4\)"):
    posttrain.sparsegpt_layer(jnp.ones((4, 3)), jnp.asarray(x.T @ x))


def test_bad_batches_and_options_are_named():
  model = MLP(nnx.Rngs(0))
  x = BATCHES[0]
  with pytest.raises(
    ValueError, match=r"`batches`.*shape\(s\) \[\(32, 7\)\] \(an earlier batch had \[\(32, 8\)\]\)"
  ):
    posttrain.prune(model, None, [x, x[:, :7]], method="wanda")
  with pytest.raises(ValueError, match=r"if it is \(inputs, labels\), pass the inputs alone"):
    posttrain.prune(model, None, [(x, np.zeros(32, np.int32))])
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match=rf"blocksize must be a positive int.*got {bad!r}"):
      posttrain.prune(model, None, [x], blocksize=bad)
    with pytest.raises(ValueError, match=r"blocksize must be a positive int"):
      posttrain.sparsegpt_layer(jnp.ones((4, 3)), jnp.eye(4), blocksize=bad)
  with pytest.raises(ValueError, match=r"dampening must be a finite number >= 0"):
    posttrain.prune(model, None, [x], dampening=-0.1)
  with pytest.raises(TypeError, match=r"blocksize= and dampening=, got \['blocksiz'\]"):
    posttrain.prune(model, None, [x], blocksiz=4)


class Quantized(nnx.Module):
  """An int8 kernel (read through a cast) next to a float one."""

  def __init__(self, rngs):
    self.q = nnx.Param(jnp.ones((8, 8), jnp.int8))
    self.fc = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc(x @ self.q[...].astype(jnp.float32))


def test_non_float_kernels_are_skipped_and_named():
  model = Quantized(nnx.Rngs(0))
  x = BATCHES[0]
  with pytest.warns(UserWarning, match=r"Only float weights are pruned; skipped .*'q': 'int8'"):
    _, masks = posttrain.prune(model, None, [x], method="wanda")
  assert mask_paths(masks) == ["fc/kernel"]
  with pytest.raises(
    ValueError, match=r"No float linear layer selected by where='q'.*\[\'fc/kernel'\].*'q': 'int8'"
  ):
    posttrain.calibrate(model, None, [x], where="q")


def test_direct_layer_functions_refuse_bad_shapes_and_sparsity_scalars_are_taken():
  # A [n_in, 1] norms array broadcast into a [n_in, n_in, n_out] mask; an int kernel came
  # back "pruned" as ints; np.float32 / jnp sparsities failed with "not iterable".
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  with pytest.raises(ValueError, match=r"norms must be \[n_in\] = \[8\].*\(8, 1\)"):
    posttrain.wanda_mask(kernel, jnp.ones((8, 1)), 0.5)
  with pytest.raises(ValueError, match=r"wanda_mask: kernel must be a float \[n_in, n_out\]"):
    posttrain.wanda_mask(kernel[:, 0], jnp.ones(8), 0.5)
  with pytest.raises(ValueError, match=r"'w'.*float \[n_in, n_out\] matrix.*int32\[8, 3\]"):
    posttrain.sparsegpt_layer(kernel.astype(jnp.int32), jnp.eye(8), 0.5, name="w")
  model = MLP(nnx.Rngs(0))
  want = jax.tree.map(np.asarray, posttrain.prune(model, None, BATCHES[:1], method="wanda")[1])
  for s in (np.float32(0.5), jnp.float32(0.5)):
    got = posttrain.prune(model, None, BATCHES[:1], method="wanda", sparsity=s)[1]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == np.asarray(b)).all()), want, got))
  owl = [
    posttrain.prune(model, None, BATCHES[:1], method="wanda", sparsity=s, owl=True,
                    blocks=[r"^fc1/", r"^fc2/"])[1]
    for s in (0.5, np.float32(0.5))
  ]  # fmt: skip
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), *owl))
  with pytest.raises(TypeError, match=r"wanda: sparsity must be a number in \[0, 1\), got '0.5'"):
    posttrain.prune(model, None, BATCHES[:1], method="wanda", sparsity="0.5")


def test_linen_params_without_their_collection_are_named():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, use_bias=False)(nn.Dense(8, use_bias=False)(x))

  x = np.ones((2, 6), np.float32)
  variables = Two().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"Two is a Linen module.*\['Dense_0', 'Dense_1'\]"):
    posttrain.prune(Two(), variables["params"], [x], method="wanda")


def test_a_sparsity_that_rounds_to_a_whole_column_or_layer_is_refused():
  with pytest.raises(ValueError, match=r"wanda: each output's column \(3 inputs\) would keep none"):
    posttrain.wanda_mask(jnp.ones((3, 4)), jnp.ones(3), 0.9)
  with pytest.raises(ValueError, match=r"sparsegpt: layer 'kernel' \(4 weights\) would keep none"):
    posttrain.sparsegpt_layer(jnp.ones((2, 2)), jnp.eye(2), 0.9)


class _TiedLM(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(32, 16, rngs=rngs)
    self.up = nnx.Linear(16, 24, rngs=rngs)
    self.down = nnx.Linear(24, 16, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = h + self.down(jax.nn.relu(self.up(h)))
    return self.embed.attend(h)  # the token embedding is the output projection too


def test_a_tied_embedding_is_left_dense_with_a_warning_and_refused_when_chosen():
  model = _TiedLM(nnx.Rngs(0))
  before = np.asarray(model.embed.embedding[...])
  batches = [np.random.default_rng(i).integers(0, 32, (2, 5)).astype(np.int32) for i in range(2)]
  with pytest.warns(UserWarning, match=r"Not pruned: \['embed/embedding'\].*tied embeddings"):
    params, masks = posttrain.prune(model, None, batches, method="wanda", sparsity=0.5)
  flat = dict(jaxprune.tree.leaves_with_paths(params))
  np.testing.assert_array_equal(np.asarray(flat["embed/embedding"]), before)
  assert float((np.asarray(flat["up/kernel"]) == 0).mean()) == 0.5
  with pytest.raises(ValueError, match=r"'embed/embedding'.*also read by a gather, as a tied"):
    posttrain.prune(
      _TiedLM(nnx.Rngs(0)), None, batches, method="wanda", where=lambda p, _: "embed" in p
    )
