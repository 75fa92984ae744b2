import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from xla_cache import reuse_identical_compiles  # noqa: F401 (autouse)

import jaxprune


def mlp_params(key=0):
  k1, k2 = jax.random.split(jax.random.key(key))
  return {
    "fc1": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jnp.zeros(32)},
    "fc2": {"kernel": jax.random.normal(k2, (32, 4)), "bias": jnp.zeros(4)},
  }


def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batch(step):
  k = jax.random.fold_in(jax.random.key(42), step)
  x = jax.random.normal(k, (8, 16))
  return x, (x[:, 0] > 0).astype(jnp.int32)


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def train(tx, steps):
  """``steps`` jitted steps of ``tx`` on the MLP from ``mlp_params()``: (params, state)."""
  params = mlp_params()
  state = tx.init(params)
  step = make_step(tx)
  for t in range(steps):
    params, state = step(params, state, *batch(t))
  return params, state


def adam_moments(state):
  inner = state.inner_state
  return inner[0].mu, inner[0].nu


def test_pruned_weights_and_their_adam_moments_stay_zero_for_100_steps():
  tx = jaxprune.masked(optax.adam(1e-2), jaxprune.magnitude(0.75))
  params, state = train(tx, 100)
  masks = jaxprune.masks_of(state)
  mu, nu = adam_moments(state)
  for layer, n in (("fc1", 512), ("fc2", 128)):
    m = masks[layer]["kernel"]
    assert int(m.sum()) == n // 4
    assert bool((params[layer]["kernel"][~m] == 0).all())
    assert bool((params[layer]["kernel"][m] != 0).all())
    assert bool((mu[layer]["kernel"][~m] == 0).all()) and bool((nu[layer]["kernel"][~m] == 0).all())
  assert jaxprune.summary(params, "kernel").sparsity == 0.75
  assert int(state.count) == 100


def test_agp_reaches_exact_targets_and_masks_nest():
  sched = jaxprune.agp(0.8, begin=2, end=20, every=6)
  tx = jaxprune.masked(optax.adam(1e-2), jaxprune.magnitude(sched))
  params = mlp_params()
  state = tx.init(params)
  step = make_step(tx)
  previous = jaxprune.masks_of(state)
  for t in range(25):
    params, state = step(params, state, *batch(t))
    masks = jaxprune.masks_of(state)
    target = float(sched.sparsity(t))
    kernel = params["fc1"]["kernel"]
    assert int((kernel == 0).sum()) == round(target * 512), t
    assert not bool((masks["fc1"]["kernel"] & ~previous["fc1"]["kernel"]).any())
    previous = masks
  assert jaxprune.summary(params, "kernel").sparsity == pytest.approx(0.8)


def test_moments_of_newly_pruned_weights_are_zeroed_at_the_update():
  tx = jaxprune.masked(optax.adam(1e-2), jaxprune.magnitude(jaxprune.one_shot(0.5, at=5)))
  params, state = train(tx, 6)
  m = jaxprune.masks_of(state)["fc1"]["kernel"]
  mu, _ = adam_moments(state)
  assert int(m.sum()) == 256
  assert bool((mu["fc1"]["kernel"][~m] == 0).all())
  assert bool((mu["fc1"]["kernel"][m] != 0).any())


def test_inner_multi_transform_and_optax_masked_moments_are_zeroed():
  # optax.multi_transform / optax.masked hold an empty MaskedNode where a partition does
  # not see a param; zeroing the moments of pruned weights went through them with a
  # pytree structure error (also optax.contrib.muon, built on them).
  inner = optax.multi_transform(
    {"adam": optax.adam(1e-2), "mom": optax.sgd(1e-2, momentum=0.9)},
    {"fc1": {"kernel": "adam", "bias": "mom"}, "fc2": {"kernel": "mom", "bias": "mom"}},
  )
  tx = jaxprune.masked(inner, jaxprune.magnitude(jaxprune.one_shot(0.5, at=2)))
  params, state = train(tx, 3)
  masks = jaxprune.masks_of(state)
  for name in ("fc1", "fc2"):
    assert int((params[name]["kernel"] == 0).sum()) == params[name]["kernel"].size // 2
  inner_states = state.inner_state.inner_states
  mu = inner_states["adam"].inner_state[0].mu["fc1"]["kernel"]
  trace = inner_states["mom"].inner_state[0].trace["fc2"]["kernel"]
  assert bool((mu[~masks["fc1"]["kernel"]] == 0).all()) and bool((mu != 0).any())
  assert bool((trace[~masks["fc2"]["kernel"]] == 0).all()) and bool((trace != 0).any())


def test_masks_in_other_containers_than_the_params():
  # Same leaf paths, other containers (a dict of masks for FrozenDict params, a FrozenDict
  # for dict params): init accepted them, then the first update failed inside
  # jax.tree.map with a pytree structure error; set_masks too.
  from flax.core import FrozenDict

  params = mlp_params()
  masks = jaxprune.magnitude(0.5).masks(params)
  for p, m in ((FrozenDict(params), masks), (params, FrozenDict(masks))):
    tx = jaxprune.masked(optax.sgd(0.1), m)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    assert jaxprune.summary(optax.apply_updates(p, updates)).zeros == 320
  tx = jaxprune.masked(optax.adam(0.1), jaxprune.magnitude(jaxprune.one_shot(0.5, at=9)))
  frozen = FrozenDict(params)
  state = jaxprune.set_masks(tx.init(frozen), masks)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, frozen), state, frozen)
  assert jaxprune.summary(optax.apply_updates(frozen, updates)).zeros == 320
  assert isinstance(jaxprune.masks_of(state), FrozenDict)


def test_params_holding_none_leaves():
  # optax takes None for "no param"; masked refused such params with "the grads tree does
  # not match the params: ... the params have 'fc1/bias' but the grads has 'a'".
  params = {"a": None, "w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(0.5))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert new["a"] is None and new["w"][:2].tolist() == [[0.0] * 4] * 2
  fixed = jaxprune.masked(optax.sgd(0.1), {"a": None, "w": jnp.ones((4, 4), bool)})
  assert fixed.init(params).masks["a"] is None
  with pytest.raises(ValueError, match=r"mask for 'a' is an array, but the param there is None"):
    jaxprune.apply_mask(params, {**jaxprune.magnitude(0.5).masks(params), "a": jnp.ones(2, bool)})


def test_saliency_and_random_under_jit():
  for pruner in (jaxprune.saliency(0.5), jaxprune.random(0.5, seed=1)):
    tx = jaxprune.masked(optax.sgd(0.1), pruner)
    params, state = mlp_params(), tx.init(mlp_params())
    params, state = make_step(tx)(params, state, *batch(0))
    assert jaxprune.summary(params, "kernel").sparsity == 0.5


def test_global_scope_inside_masked():
  tx = jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(0.9, scope="global"))
  params, state = make_step(tx)(mlp_params(), tx.init(mlp_params()), *batch(0))
  s = jaxprune.summary(params, "kernel")
  assert s.zeros == round(0.9 * 640)
  assert s["fc1/kernel"].zeros != s["fc2/kernel"].zeros * 4  # one threshold, not per layer


def test_same_result_with_and_without_jit():
  tx = jaxprune.masked(optax.adam(1e-2), jaxprune.magnitude(jaxprune.agp(0.5, 0, 2, 1)))
  p1 = p2 = mlp_params()
  s1 = s2 = tx.init(p1)
  jitted = make_step(tx)
  for t in range(3):
    x, y = batch(t)
    p1, s1 = jitted(p1, s1, x, y)
    grads = jax.grad(loss_fn)(p2, x, y)
    updates, s2 = tx.update(grads, s2, p2)
    p2 = optax.apply_updates(p2, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)


def test_inside_chain_and_around_chain():
  pruner = jaxprune.magnitude(0.5)
  for tx in (
    optax.chain(optax.clip_by_global_norm(1.0), jaxprune.masked(optax.adam(1e-2), pruner)),
    jaxprune.masked(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), pruner),
  ):
    params, state = make_step(tx)(mlp_params(), tx.init(mlp_params()), *batch(0))
    assert jaxprune.summary(params, "kernel").sparsity == 0.5
    assert jaxprune.masks_of(state)["fc1"]["kernel"].sum() == 256


def test_inject_hyperparams_inner_learning_rate_is_changeable():
  inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
  tx = jaxprune.masked(inner, jaxprune.magnitude(0.5))
  state = tx.init(mlp_params())
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  params, state = make_step(tx)(mlp_params(), state, *batch(0))
  kept = jaxprune.masks_of(state)["fc1"]["kernel"]
  np.testing.assert_array_equal(params["fc1"]["kernel"][kept], mlp_params()["fc1"]["kernel"][kept])
  assert bool((params["fc1"]["kernel"][~kept] == 0).all())


def test_inject_hyperparams_around_masked():
  tx = optax.inject_hyperparams(jaxprune.masked, static_args=("pruner",))(
    inner=optax.sgd(0.1), pruner=jaxprune.magnitude(0.5)
  )
  params, state = make_step(tx)(mlp_params(), tx.init(mlp_params()), *batch(0))
  assert jaxprune.summary(params, "kernel").sparsity == 0.5
  assert int(jaxprune.masks_of(state)["fc2"]["kernel"].sum()) == 64


def test_nnx_optimizer_and_state():
  model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
  tx = jaxprune.masked(optax.adam(1e-2), jaxprune.magnitude(0.75))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  for t in range(3):
    train_step(model, optimizer, *batch(t))
  s = jaxprune.summary(nnx.state(model, nnx.Param), "kernel")
  assert s.as_dict() == {"layers/0/kernel": 0.75, "layers/1/kernel": 0.75, "total": 0.75}
  masks = jaxprune.summary(jaxprune.masks_of(optimizer.opt_state))
  assert masks.as_dict() == {"layers/0/kernel": 0.75, "layers/1/kernel": 0.75, "total": 0.75}


def test_errors():
  tx = jaxprune.masked(optax.sgd(0.1), jaxprune.magnitude(0.5))
  state = tx.init(mlp_params())
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(mlp_params(), state)
  with pytest.raises(TypeError, match="pruner must be a jaxprune.Pruner .* or a fixed"):
    jaxprune.masked(optax.sgd(0.1), 0.5)
  with pytest.raises(ValueError, match="No jaxprune.masked state"):
    jaxprune.masks_of(optax.sgd(0.1).init(mlp_params()))
  bad = {"fc1": mlp_params()["fc1"]}
  with pytest.raises(ValueError, match="'fc2/bias' is only in the"):
    tx.update(bad, state, mlp_params())


def test_fixed_masks_are_kept_for_the_whole_run():
  params = mlp_params()
  masks = jaxprune.magnitude(0.5, scope="global").masks(params)
  tx = jaxprune.masked(optax.adam(1e-2), masks)
  state = tx.init(params)
  step = make_step(tx)
  for t in range(3):
    params, state = step(params, state, *batch(t))
  np.testing.assert_array_equal(params["fc1"]["kernel"] != 0, masks["fc1"]["kernel"])
  assert jaxprune.masks_of(state) is not None
  with pytest.raises(ValueError, match="'fc2/bias' is only in the params"):
    jaxprune.masked(optax.sgd(0.1), {"fc1": masks["fc1"]}).init(mlp_params())


@pytest.mark.parametrize(
  ("inner", "message"),
  [
    (0.1, r"inner must be an optax GradientTransformation .*got 0.1 \(float\)"),
    (optax.adam, r"got <function adam.*Call the factory first, e.g. adam\(1e-3\)"),
    (jaxprune.magnitude(0.5), "arguments are swapped"),
    ({"init": 1}, r"\(dict\)"),
  ],
)
def test_masked_refuses_a_bad_inner_at_construction(inner, message):
  with pytest.raises(TypeError, match=message):
    jaxprune.masked(inner, jaxprune.magnitude(0.5))


@pytest.mark.parametrize(
  ("pruner", "message"),
  [
    (0.5, r"got float\. For a sparsity, pass a pruner: jaxprune.magnitude\(0.5\)"),
    ("magnitude", "got str"),
    (optax.sgd(0.1), "arguments are swapped"),
    ({"w": jnp.ones((2, 2))}, "has a leaf of float32; masks are bool arrays"),
    ({"w": None}, "no array leaves"),
  ],
)
def test_masked_refuses_a_bad_pruner_at_construction(pruner, message):
  with pytest.raises(TypeError, match="pruner must be a jaxprune.Pruner"):
    jaxprune.masked(optax.sgd(0.1), pruner)
  with pytest.raises(TypeError, match=message):
    jaxprune.masked(optax.sgd(0.1), pruner)


def test_training_loop_sets_masks_of_a_masked_state_inside_a_chain():
  """``loop.init_state(..., masks=)`` finds the MaskedState in a chain (``tree_set``)."""
  from jaxprune.train import loop

  model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
  params = nnx.state(model, nnx.Param)
  masks = jaxprune.magnitude(0.75).masks(params)
  later = jaxprune.magnitude(jaxprune.one_shot(0.5, at=100))  # keeps the masks it is given
  tx = optax.chain(optax.clip(1.0), jaxprune.masked(optax.sgd(0.1), later))
  _, state = loop.init_state(model, tx, seed=0, masks=masks)
  assert jaxprune.masks_of(state.opt_state) is masks
  assert jaxprune.summary(state.params, "kernel").sparsity == 0.75
  updates, opt_state = tx.update(
    jax.tree.map(jnp.ones_like, state.params), state.opt_state, state.params
  )
  params = optax.apply_updates(state.params, updates)
  assert jaxprune.summary(params, "kernel").sparsity == 0.75
  np.testing.assert_array_equal(
    jaxprune.masks_of(opt_state)["layers"][0]["kernel"], masks["layers"][0]["kernel"]
  )
  with pytest.raises(ValueError, match="No jaxprune.masked state found"):
    loop.init_state(model, optax.sgd(0.1), seed=0, masks=masks)


def test_set_masks_inside_a_chain_and_its_errors():
  params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
  tx = optax.chain(optax.clip(1.0), jaxprune.masked(optax.adam(0.1), jaxprune.magnitude(0.5)))
  state = tx.init(params)
  new = {"w": jnp.array([[True, False], [False, False]]), "b": None}
  assert jaxprune.masks_of(jaxprune.set_masks(state, new))["w"].sum() == 1
  with pytest.raises(ValueError, match=r"mask for 'w' is \(3,\), the state's is \(2, 2\)"):
    jaxprune.set_masks(state, {"w": jnp.ones(3, bool), "b": None})
  with pytest.raises(ValueError, match="new masks have the leaves"):
    jaxprune.set_masks(state, {"v": None})
  with pytest.raises(ValueError, match="No jaxprune.masked state"):
    jaxprune.set_masks(optax.adam(0.1).init(params), new)
  # An int / float mask was stored and failed at the next update, blamed on apply_mask.
  for dtype in (jnp.int32, jnp.float32):
    with pytest.raises(TypeError, match=r"set_masks takes bool masks.*'w' is " + dtype.__name__):
      jaxprune.set_masks(state, {"w": new["w"].astype(dtype), "b": None})


def _entry_bytes_written(compiled_text: str) -> int:
  """Bytes the top-level instructions of a compiled program write (branches excluded)."""
  sizes = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2, "u8": 1, "s8": 1}
  entry = compiled_text[compiled_text.index("\nENTRY") :]
  entry = entry[: entry.index("\n}\n")]
  skip = {"parameter", "tuple", "get-tuple-element", "conditional", "constant", "bitcast"}
  total = 0
  for dtype, dims, op in re.findall(
    r"\n\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(", entry
  ):
    if op not in skip:
      total += int(np.prod([int(d) for d in dims.split(",") if d])) * sizes.get(dtype, 4)
  return total


def test_steady_state_step_of_a_pruner_does_the_work_of_fixed_masks():
  # Outside its mask-update branch, the compiled step of masked(adam, magnitude(0.9))
  # writes what the step with the same masks given as a fixed pytree writes: no copy of
  # the optimizer state through the cond, no separate pass zeroing the moments.
  params = {
    "fc1": {"kernel": jax.random.normal(jax.random.key(0), (64, 256)), "bias": jnp.zeros(256)},
    "fc2": {"kernel": jax.random.normal(jax.random.key(1), (256, 4)), "bias": jnp.zeros(4)},
  }
  pruner = jaxprune.magnitude(0.9)
  x, y = jnp.ones((8, 64)), jnp.zeros((8,), jnp.int32)

  def loss(p, x, y):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    logits = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  written = {}
  for name, tx in {
    "pruner": jaxprune.masked(optax.adam(1e-3), pruner),
    "fixed": jaxprune.masked(optax.adam(1e-3), pruner.masks(params)),
    "dense": optax.adam(1e-3),
  }.items():

    def step(params, state, x, y, tx=tx):
      updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
      return optax.apply_updates(params, updates), state

    compiled = jax.jit(step).lower(params, tx.init(params), x, y).compile()
    written[name] = _entry_bytes_written(compiled.as_text())
  assert written["dense"] < written["fixed"]  # the masks cost something, and are counted
  assert abs(written["pruner"] - written["fixed"]) <= 64, written  # scalars: the step test
