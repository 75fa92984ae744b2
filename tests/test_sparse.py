"""Sparse trainers (static, SET, RigL): exact counts, growth rules, moments, schedule, resume.

References are NumPy (stable argsort) computations independent of jaxprune.select.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_log import compiled

import jaxprune
from jaxprune.sparse import cosine_drop, erk, rigl, set_sparse, static_sparse
from jaxprune.sparse.dynamic import regrowth_scores

SHAPES = {"fc1": (20, 16), "fc2": (16, 8), "fc3": (8, 3)}
KERNELS = [f"{k}/kernel" for k in SHAPES]


def make_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    k: {
      "kernel": jnp.asarray(rng.normal(size=s) / math.sqrt(s[0]), jnp.float32),
      "bias": jnp.zeros(s[1]),
    }
    for k, s in SHAPES.items()
  }


def loss_fn(params, x, y):
  h = x
  for i, k in enumerate(SHAPES):
    h = h @ params[k]["kernel"] + params[k]["bias"]
    if i < len(SHAPES) - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def batch(step: int):
  rng = np.random.default_rng(1000 + step)
  return jnp.asarray(rng.normal(size=(8, 20)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))


def flat(tree) -> dict[str, np.ndarray]:
  return {p: np.asarray(x) for p, x in jaxprune.tree.leaves_with_paths(tree) if x is not None}


@functools.cache
def trainer(name: str, sparsity=0.8, every=2, end=40, drop=0.3):
  sparsity = erk(0.8) if sparsity == "erk" else sparsity
  inner = optax.adam(1e-2)
  if name == "static":
    tx = static_sparse(inner, sparsity, seed=3)
  elif name == "set":
    tx = set_sparse(inner, sparsity, end=end, every=every, drop_fraction=drop, seed=3)
  else:
    tx = rigl(inner, sparsity, end=end, every=every, drop_fraction=drop, seed=3)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  return tx, step


def expected_kept(sparsity) -> dict[str, int]:
  if sparsity == "erk":
    per = erk(0.8).sparsities({f"{k}/kernel": s for k, s in SHAPES.items()})
  else:
    per = {f"{k}/kernel": sparsity for k in SHAPES}
  return {
    p: math.prod(SHAPES[p.split("/")[0]]) - round(per[p] * math.prod(SHAPES[p.split("/")[0]]))
    for p in per
  }


@pytest.mark.parametrize("sparsity", [0.8, "erk"])
@pytest.mark.parametrize("name", ["static", "set", "rigl"])
def test_exact_sparsity_per_layer_after_every_step(name, sparsity):
  tx, step = trainer(name, sparsity)
  params = make_params()
  state = tx.init(params)
  want = expected_kept(sparsity)
  first = flat(jaxprune.masks_of(state))
  changed = 0
  for t in range(12):
    params, state, _ = step(params, state, *batch(t))
    masks, p = flat(jaxprune.masks_of(state)), flat(params)
    for k in KERNELS:
      assert masks[k].sum() == want[k], (t, k)
      assert (p[k][~masks[k]] == 0).all()  # apply_updates alone leaves the sparse weights
    assert all(np.any(p[f"{k}/bias"] != 0) for k in SHAPES)  # biases are dense
    changed += sum(int((masks[k] != first[k]).sum()) for k in KERNELS)
  assert (changed == 0) == (name == "static")


def test_grown_weights_and_adam_moments_are_zero_right_after_growth():
  tx, step = trainer("rigl", 0.8)
  params = make_params()
  state = tx.init(params)
  params, state, _ = step(params, state, *batch(0))  # step 0: no update
  params, state, _ = step(params, state, *batch(1))  # step 1: no update (every=2)
  before = flat(jaxprune.masks_of(state))
  params, state, _ = step(params, state, *batch(2))  # step 2: drop and grow
  after, p = flat(jaxprune.masks_of(state)), flat(params)
  adam = state.inner_state[0]
  mu, nu = flat(adam.mu), flat(adam.nu)
  grown_total = 0
  for k in KERNELS:
    grown = after[k] & ~before[k]
    grown_total += grown.sum()
    assert (p[k][grown] == 0).all()
    assert (mu[k][grown] == 0).all() and (nu[k][grown] == 0).all()
    assert (mu[k][~after[k]] == 0).all() and (nu[k][~after[k]] == 0).all()
    survived = after[k] & before[k]
    assert (p[k][survived] != 0).all() and (nu[k][survived] != 0).all()
  assert grown_total > 0
  params, state, _ = step(params, state, *batch(3))  # the grown weights train from there
  p = flat(params)
  assert sum(int((p[k][after[k] & ~before[k]] != 0).sum()) for k in KERNELS) > 0


def numpy_keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
  """The ``keep`` largest, ties to the lower flat index (a stable descending argsort)."""
  order = np.argsort(-scores.ravel(), kind="stable")
  out = np.zeros(scores.size, bool)
  out[order[:keep]] = True
  return out.reshape(scores.shape)


def regrow_reference(mask, w, grow_scores, fraction):
  """Drop the smallest |w| among active, grow the largest scores among the not kept."""
  active = int(mask.sum())
  d = round(float(np.float32(fraction) * np.float32(active)))
  survivors = numpy_keep_top(np.where(mask, np.abs(w), -np.inf), active - d)
  return survivors | numpy_keep_top(np.where(survivors, -np.inf, grow_scores), d)


def test_rigl_grows_the_largest_gradients_among_inactive_with_deterministic_ties():
  """One update step, against the NumPy rule, per layer; the gradients have many exact
  ties. Two layers share a shape (selected together, by one lax.map) and one does not."""
  rng = np.random.default_rng(0)
  shapes = {"a": (6, 10), "b": (5, 4), "c": (6, 10)}
  mask0 = {k: rng.random(s) < 0.5 for k, s in shapes.items()}
  params = {
    k: jnp.asarray(np.where(mask0[k], rng.normal(size=s), 0.0), jnp.float32)
    for k, s in shapes.items()
  }
  grads = {k: jnp.asarray(rng.integers(0, 3, size=s), jnp.float32) for k, s in shapes.items()}
  masks = jax.tree.map(jnp.asarray, mask0)
  tx = rigl(optax.sgd(0.0), masks, end=10, every=1, drop_fraction=lambda t: 0.5)
  state = tx.init(params)
  state = state._replace(count=jnp.int32(1))  # an update step
  _, state = jax.jit(tx.update)(grads, state, params)
  for k in shapes:
    want = regrow_reference(mask0[k], np.asarray(params[k]), np.abs(np.asarray(grads[k])), 0.5)
    np.testing.assert_array_equal(np.asarray(state.masks[k]), want, err_msg=k)
    assert want.sum() == mask0[k].sum()
    assert (want != mask0[k]).any(), k  # the layer's mask moved


def numpy_regrowth_scores(key, shape) -> np.ndarray:
  """The documented counter hash (lowbias32 of ``j * 0x9E3779B9 + bits(key)``), in numpy."""
  s = np.uint64(int(jax.random.bits(key, (), jnp.uint32)))
  m = np.uint64(0xFFFFFFFF)
  x = (np.arange(int(np.prod(shape)), dtype=np.uint64) * np.uint64(0x9E3779B9) + s) & m
  x ^= x >> np.uint64(16)
  x = (x * np.uint64(0x7FEB352D)) & m
  x ^= x >> np.uint64(15)
  x = (x * np.uint64(0x846CA68B)) & m
  x ^= x >> np.uint64(16)
  return ((x >> np.uint64(9)).astype(np.float64) / 2.0**23).reshape(shape)


def test_set_growth_scores_are_uniform_and_distinct_per_layer_and_step():
  key = jax.random.key(0)
  a = np.asarray(regrowth_scores(jax.random.fold_in(key, 0), (1000, 100)))
  b = np.asarray(regrowth_scores(jax.random.fold_in(key, 1), (1000, 100)))
  assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() < 1.0
  np.testing.assert_array_equal(a, numpy_regrowth_scores(jax.random.fold_in(key, 0), (1000, 100)))
  assert abs(a.mean() - 0.5) < 0.005 and abs((a < 0.1).mean() - 0.1) < 0.005
  assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01  # another layer: unrelated
  assert abs(np.corrcoef(a.ravel()[:-1], a.ravel()[1:])[0, 1]) < 0.01  # neighbours too


def test_set_growth_is_reproducible_from_its_key():
  """SET grows by ``regrowth_scores(fold_in(fold_in(key(seed), t), i))``: the documented
  hash, recomputed here in numpy."""
  rng = np.random.default_rng(0)
  # "a" and "c" share a shape (selected together): each still draws with its leaf index
  mask0 = {"a": rng.random((6, 10)) < 0.4, "b": rng.random((5, 4)) < 0.4}
  mask0["c"] = rng.random((6, 10)) < 0.4
  params = {
    k: jnp.where(m, jnp.asarray(rng.normal(size=m.shape), jnp.float32), 0.0)
    for k, m in mask0.items()
  }
  grads = jax.tree.map(jnp.ones_like, params)

  def run(seed):
    tx = set_sparse(
      optax.sgd(0.0),
      jax.tree.map(jnp.asarray, mask0),
      end=10,
      every=1,
      drop_fraction=0.5,
      seed=seed,
    )
    state = tx.init(params)._replace(count=jnp.int32(2))
    return flat(jax.jit(tx.update)(grads, state, params)[1].masks)

  first, again, other = run(7), run(7), run(8)
  fraction = float(cosine_drop(0.5, 10)(2))
  key = jax.random.fold_in(jax.random.key(7), 2)
  for i, k in enumerate(["a", "b", "c"]):
    scores = numpy_regrowth_scores(jax.random.fold_in(key, i), mask0[k].shape)
    want = regrow_reference(mask0[k], np.asarray(params[k]), scores, fraction)
    np.testing.assert_array_equal(first[k], want)
    np.testing.assert_array_equal(again[k], first[k])
  assert any((other[k] != first[k]).any() for k in first)


def test_drop_fraction_follows_the_cosine_schedule():
  """Gradients only on inactive weights: exactly round(f_t * active) weights move at t."""
  end, every, f0 = 12, 3, 0.5
  tx = rigl(optax.sgd(1e-3), 0.75, end=end, every=every, drop_fraction=f0, seed=1)
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  active = 64 - 48
  for t in range(end + 4):
    old = np.asarray(state.masks["w"])
    g = np.where(old, 0.0, 1.0 + np.random.default_rng(t).random((8, 8)))
    updates, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    moved = int((old & ~np.asarray(state.masks["w"])).sum())
    on = 0 < t < end and t % every == 0
    f = f0 / 2 * (1 + math.cos(math.pi * t / end))
    assert moved == (round(f * active) if on else 0), t
  assert [round(float(cosine_drop(f0, end)(t)), 6) for t in (0, 6, 12, 20)] == [0.5, 0.25, 0.0, 0.0]


def test_dense_first_and_last_and_initial_counts():
  params = make_params()
  tx = rigl(optax.sgd(0.1), erk(0.9), end=10, every=5, dense_first=True, dense_last=True)
  masks = tx.init(params).masks
  assert masks["fc1"]["kernel"] is None and masks["fc3"]["kernel"] is None
  assert int(masks["fc2"]["kernel"].sum()) == 128 - round(0.9 * 128)  # one layer: ERK = uniform


def test_checkpoint_resume_mid_run_is_bitwise_equal(tmp_path):
  tx, step = trainer("rigl", "erk")
  params = make_params()
  state = tx.init(params)
  straight = (params, state)
  for t in range(10):
    straight = step(*straight, *batch(t))[:2]
  resumed = (params, state)
  for t in range(5):
    resumed = step(*resumed, *batch(t))[:2]
  leaves, treedef = jax.tree.flatten(resumed)
  np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
  with np.load(tmp_path / "ckpt.npz") as f:
    restored = jax.tree.unflatten(treedef, [jnp.asarray(f[f"arr_{i}"]) for i in range(len(leaves))])
  for t in range(5, 10):
    restored = step(*restored, *batch(t))[:2]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_name_the_problem():
  with pytest.raises(TypeError, match="fixed for the whole run"):
    rigl(optax.sgd(0.1), jaxprune.agp(0.9, 0, 10, 1), end=10)
  with pytest.raises(ValueError, match="end must be"):
    set_sparse(optax.sgd(0.1), 0.9, end=0)
  with pytest.raises(TypeError, match="optax GradientTransformation"):
    rigl(0.9, 0.9, end=10)
  with pytest.raises(ValueError, match="drop_fraction"):
    rigl(optax.sgd(0.1), 0.9, end=10, every=5, drop_fraction=1.5)


@pytest.mark.parametrize("make", [rigl, set_sparse])
def test_a_drop_fraction_function_must_return_a_scalar(make):
  """A drop_fraction function returning shape (1,) crashed in the top-k with "indices and
  arr must have the same number of dimensions; 4 vs. 3" (or a broadcasting error)."""
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = make(optax.sgd(0.1), 0.5, end=10, every=1, drop_fraction=lambda t: jnp.array([0.5]))
  state = tx.init(params)
  with pytest.raises(
    ValueError, match=rf"^{make.__name__}: drop_fraction\(step\) must return a scalar.*\(1,\)"
  ):
    tx.update(params, state, params)


@pytest.mark.parametrize("make", [static_sparse, rigl, set_sparse])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_a_mask_tree_that_is_not_bool_is_refused_by_name(make, dtype):
  """An int or float 0/1 mask tree was read as a sparsity: "uniform(sparsity) must be a
  number in [0, 1), got {'w': Array(...)}", with no word of masks or dtypes."""
  masks = {"w": jnp.ones((4, 4), dtype), "b": None}
  kwargs = {} if make is static_sparse else {"end": 10, "every": 1}
  with pytest.raises(TypeError, match=rf"^{make.__name__}: .*must be bool arrays.*'w' has dtype"):
    make(optax.sgd(0.1), masks, **kwargs)
  tx = make(optax.sgd(0.1), jax.tree.map(lambda m: m.astype(bool), masks), **kwargs)
  assert int(jaxprune.masks_of(tx.init({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}))["w"].sum()) == 16


@pytest.mark.parametrize("make", [rigl, set_sparse])
@pytest.mark.parametrize("kwargs, error, message", [
  # masks move at every, 2 * every, ... below end: none of those when end <= every
  ({"end": 50, "every": 100}, ValueError, r"every \(100\) must be smaller than end \(50\)"),
  ({"end": 100, "every": 100}, ValueError, r"every \(100\) must be smaller than end \(100\)"),
  ({"end": 100, "every": 0}, ValueError, "every must be an integer >= 1"),
  ({"end": 100, "every": "10"}, TypeError, r"every must be an integer >= 1 .*got '10'"),
  ({"end": 100.0, "every": 10}, TypeError, "end must be an integer >= 1"),
  ({"end": 100, "every": 10, "drop_fraction": 0.0}, ValueError, "drop_fraction must be .* in \\(0, 1\\]"),
  ({"end": 100, "every": 10, "drop_fraction": float("nan")}, ValueError, "drop_fraction must be"),
  ({"end": 100, "every": 10, "drop_fraction": "0.3"}, TypeError, "drop_fraction must be"),
  ({"end": 100, "every": 10, "seed": "0"}, TypeError, "seed must be an integer"),
  ({"end": 100, "every": 10, "dense_last": "yes"}, TypeError, "dense_last must be True or False"),
])  # fmt: skip
def test_hyperparameters_are_checked_where_they_are_given(make, kwargs, error, message):
  """rigl(..., end=50, every=100) was accepted, and its masks could never move."""
  with pytest.raises(error, match=rf"^{make.__name__}: {message}"):
    make(optax.sgd(0.1), 0.9, **kwargs)


def test_static_sparse_and_cosine_drop_check_their_arguments():
  with pytest.raises(TypeError, match="static_sparse: dense_first must be True or False"):
    static_sparse(optax.sgd(0.1), 0.9, dense_first=1)
  with pytest.raises(ValueError, match=r"cosine_drop: initial must be a number in \(0, 1\]"):
    cosine_drop(float("nan"), 10)
  with pytest.raises(TypeError, match="cosine_drop: end must be an integer >= 1"):
    cosine_drop(0.3, "10")


@pytest.mark.parametrize("kwargs, error, message", [
  ({"warmup": "10", "phase": 5, "end": 30}, TypeError, "acdc: warmup must be an integer >= 0"),
  ({"warmup": 10, "phase": 0, "end": 30}, ValueError, "acdc: phase must be an integer >= 1"),
  ({"warmup": 10, "phase": 5, "end": 5}, ValueError, r"acdc: end \(5\) must not come before"),
])  # fmt: skip
def test_acdc_checks_its_steps(kwargs, error, message):
  with pytest.raises(error, match=message):
    jaxprune.sparse.acdc(0.9, **kwargs)
  with pytest.raises(ValueError, match=r"acdc: sparsity must be .*got nan"):
    jaxprune.sparse.acdc(float("nan"), warmup=0, phase=1, end=2)


def test_acdc_alternates_sparse_and_dense_phases_inside_masked():
  """Dense warm-up, sparse (fresh magnitude masks), dense (all weights train), final sparse."""
  schedule = jaxprune.sparse.acdc(0.75, warmup=2, phase=2, end=8)
  tx = jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(schedule))
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  zeros = []
  for t in range(11):
    g = jnp.asarray(np.random.default_rng(t).normal(size=(4, 4)), jnp.float32)
    before = np.asarray(params["w"])
    updates, state = update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
    zeros.append(int((np.asarray(params["w"]) == 0).sum()))
    if t in (2, 8):  # a sparse phase starts: the 12 smallest |w| before the step go
      np.testing.assert_array_equal(np.asarray(state.masks["w"]), numpy_keep_top(np.abs(before), 4))
  assert zeros == [0, 0, 12, 12, 0, 0, 12, 12, 12, 12, 12]


def test_eager_updates_compile_nothing_after_the_first_steps():
  # Outside jit, a lax.cond of branch closures made at each call compiled again at every
  # step (about 1 s each): the mask update of each transform is jitted once per transform.
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)}
  grads = {"w": jnp.ones((6, 5))}
  transforms = {
    "masked": jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(jaxprune.agp(0.5, 0, 4, 2))),
    "set": set_sparse(optax.sgd(0.1), 0.5, end=6, every=2),
    "rigl": rigl(optax.sgd(0.1), 0.5, end=6, every=2),
    "lottery": jaxprune.sparse.lottery(
      optax.sgd(0.1), jaxprune.magnitude(jaxprune.iterative([(2, 0.3), (4, 0.5)])), rewind=1
    ),
  }
  for name, tx in transforms.items():
    state, p = tx.init(params), params
    for step in range(5):  # updates at steps 2 and 4
      with compiled() as names:
        updates, state = tx.update(grads, state, p)
      assert step < 2 or names == [], (name, step, names)
      p = optax.apply_updates(p, updates)
    assert int(jaxprune.masks_of(state)["w"].sum()) == 15, name
