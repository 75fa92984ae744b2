import pathlib

import flax.linen as linen_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune
from jaxprune import nn, surgery
from jaxprune import tree as tree_lib
from jaxprune.train import config as config_lib
from jaxprune.train.autopruner import conv_net_macs, train_recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(3, 5, 5, 6), (4, 6), (2, 3, 6)], ids=["conv", "dense", "seq"])
def test_gate_pools_batch_and_positions_and_scales_channels(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # no RNG compile
  gate = nn.Gate(6, alpha=2.0, rngs=nnx.Rngs(1))
  y = gate(x)
  v = gate.vector[...]
  assert y.shape == x.shape and v.shape == (6,)
  assert bool(jnp.all((v >= 0) & (v <= 1)))
  pooled = np.asarray(x).reshape(-1, 6).mean(0)  # one vector per batch, not per sample
  expected = jax.nn.sigmoid(2.0 * (pooled @ np.asarray(gate.kernel[...]) + 0.0))
  np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, x * v, rtol=1e-6)


def test_fc_init_follows_the_paper_unless_overridden():
  gate = nn.Gate(64, rngs=nnx.Rngs(0))
  assert nn.fc_std(64) == pytest.approx(10 * np.sqrt(2 / 64))
  assert float(jnp.std(gate.kernel[...])) == pytest.approx(nn.fc_std(64), rel=0.05)
  assert float(jnp.abs(gate.bias[...]).max()) == 0.0
  small = nn.Gate(64, init_std=0.01, rngs=nnx.Rngs(0))
  assert float(jnp.std(small.kernel[...])) == pytest.approx(0.01, rel=0.05)
  assert bool(jnp.isnan(nn.Gate(3, rngs=nnx.Rngs(0)).vector[...]).all())  # no pass yet


def test_gate_rejects_wrong_channel_count():
  with pytest.raises(ValueError, match="4 channels but its input has 3"):
    nn.Gate(4, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))


def test_infinite_alpha_is_the_hard_gate():
  x = jnp.array([[1.0, -2.0, 0.5]])
  kernel, bias = jnp.eye(3), jnp.array([0.0, 0.0, -1.0])  # z = [1, -2, -0.5]
  assert nn.gate_vector(kernel, bias, x, jnp.inf).tolist() == [1.0, 0.0, 0.0]
  soft = nn.gate_vector(kernel, bias, x, 7.0)
  assert (soft > 0.5).tolist() == [True, False, False]
  grads = jax.grad(lambda b: nn.gate_vector(kernel, b, x, jnp.inf).sum())(bias)
  assert bool(jnp.isfinite(grads).all())


def test_alpha_schedule_rules():
  lin = nn.alpha_schedule(1.0, 100.0, steps=100, every=10)
  geo = nn.alpha_schedule(1.0, 100.0, steps=100, every=1, mode="geometric")
  assert [float(lin(t)) for t in (0, 9, 10, 100, 10**6)] == pytest.approx(
    [1.0, 1.0, 10.9, 100.0, 100.0]
  )
  assert [float(geo(t)) for t in (0, 25, 50, 100)] == pytest.approx(
    [1.0, 10**0.5, 10.0, 100.0], rel=1e-5
  )
  assert float(jax.jit(lin)(jnp.int32(55))) == pytest.approx(50.5)
  with pytest.raises(ValueError, match="mode"):
    nn.alpha_schedule(mode="cubic")


def test_alpha_schedule_may_start_at_zero():
  """Gates open (v = 0.5, no gradient to their FC) while the network pretrains."""
  a = nn.alpha_schedule(0.0, 100.0, steps=100)
  assert [float(a(t)) for t in (0, 50, 100)] == pytest.approx([0.0, 50.0, 100.0])
  with pytest.raises(ValueError, match="geometric alpha_schedule needs start > 0"):
    nn.alpha_schedule(0.0, 100.0, mode="geometric")
  with pytest.raises(ValueError, match="0 <= start <= end and end > 0"):
    nn.alpha_schedule(0.0, 0.0)
  with pytest.raises(ValueError, match="0 <= start <= end"):
    nn.alpha_schedule(-1.0, 10.0)


def test_gate_loss_and_adaptive_lambda_by_hand():
  v = jnp.array([1.0, 0.5, 0.0, 0.5])  # ||v||_1 / C = 0.5
  assert float(nn.keep_ratio(v)) == 0.5
  assert float(nn.gate_loss(v, 0.25)) == pytest.approx(0.0625)
  assert float(nn.adaptive_lambda(v, 0.25)) == pytest.approx(25.0)
  assert float(nn.adaptive_lambda(v, 0.75)) == pytest.approx(25.0)
  assert float(nn.adaptive_lambda(v, 0.5)) == 0.0
  # lambda is a constant for the gradient: d/dv [lambda * (mean(v) - r)^2] = lambda * 2 (0.25) / 4
  assert jax.grad(lambda v: nn.adaptive_lambda(v, 0.25))(v).tolist() == [0.0] * 4
  grad = jax.grad(lambda v: nn.gate_penalty({"a": v}, 0.25))(v)
  np.testing.assert_allclose(grad, np.full(4, 25.0 * 2 * 0.25 / 4))
  vectors = {"a": v, "b": jnp.array([1.0, 1.0])}
  both = 25.0 * 0.0625 + 100 * 0.5 * 0.25  # b: ratio 1 vs 0.5
  assert float(nn.gate_penalty(vectors, 0.5)) == pytest.approx(12.5)  # a is on target
  assert float(nn.gate_penalty(vectors, {"a": 0.25, "b": 0.5})) == pytest.approx(both)
  with pytest.raises(KeyError, match="'b'"):
    nn.gate_penalty(vectors, {"a": 0.25})
  assert nn.keep_ratios(vectors) == pytest.approx({"a": 0.5, "b": 1.0, "total": 4 / 6})


class Toy(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nn.Gated(
      nnx.Linear(4, 8, rngs=rngs), activation=nnx.relu, init_std=0.1, rngs=rngs
    )
    self.out = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.hidden(x))


def _toy_step(graphdef, tx, schedule, r):
  def loss_fn(params, rest, x, y, t):
    model = nnx.merge(graphdef, params, rest, copy=True)
    nn.set_alpha(model, schedule(t))
    mse = jnp.mean((model(x)[:, 0] - y) ** 2)
    return mse + nn.gate_penalty(nn.gate_vectors(model), r), nnx.split(model, nnx.Param, ...)[2]

  @jax.jit
  def step(params, rest, opt_state, t, x, y):
    (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y, t)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state

  return step


def test_alpha_growth_makes_gates_binary_and_never_recompiles():
  model = Toy(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (64, 4))
  y = x @ jnp.array([1.0, -2.0, 0.5, 3.0])
  schedule = nn.alpha_schedule(1.0, 1000.0, steps=250, mode="geometric")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  step = _toy_step(graphdef, tx, schedule, 0.5)
  alphas = []
  for t in range(300):
    params, rest, opt_state = step(params, rest, opt_state, t, x, y)
    if t == 0:
      v0 = nnx.merge(graphdef, params, rest).hidden.gate.vector[...]
    alphas.append(float(nnx.merge(graphdef, params, rest).hidden.gate.alpha[...]))
  assert step._cache_size() == 1  # alpha changed every step without recompiling
  assert len(set(alphas[:250])) == 250 and alphas[-1] == pytest.approx(1000.0)
  v = nnx.merge(graphdef, params, rest).hidden.gate.vector[...]
  assert float(jnp.max(jnp.abs(v0 - 0.5))) < 0.2  # soft at alpha = 1
  assert float(jnp.max(jnp.minimum(v, 1 - v))) < 0.01  # binary at the end
  assert float(nn.keep_ratio(v)) == pytest.approx(0.5, abs=0.01)


def test_linen_gate_matches_nnx_and_takes_alpha_without_recompiling():
  rng = np.random.default_rng(0)  # NumPy draws: no RNG compile per shape
  x = rng.standard_normal((4, 5, 5, 6)).astype(np.float32)
  gate = nn.Gate(6, rngs=nnx.Rngs(3))
  gate.bias.set_value(jnp.asarray(rng.standard_normal(6), jnp.float32))
  nn.set_alpha(gate, 0.3)
  y_nnx = gate(x)
  params = {"params": {"kernel": gate.kernel[...], "bias": gate.bias[...]}}
  apply = jax.jit(lambda p, x, a: nn.linen.Gate().apply(p, x, a, mutable=["intermediates"]))
  y_linen, state = apply(params, x, 0.3)
  np.testing.assert_allclose(y_linen, y_nnx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nn.gate_vectors(state)[""], gate.vector[...], rtol=1e-6)
  for a in (1.0, 5.0, 50.0):
    apply(params, x, a)
  assert apply._cache_size() == 1
  init = nn.linen.Gate().init(jax.random.key(0), jnp.ones((2, 32)), 1.0)["params"]
  assert float(jnp.std(init["kernel"])) == pytest.approx(nn.fc_std(32), rel=0.1)


class GatedNet(nnx.Module):
  """Gates in three places: before a BN, after conv-BN-ReLU, after a Dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nn.Gated(nnx.Conv(2, 6, (3, 3), rngs=rngs), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.block2 = nn.Gated(
      nnx.Conv(6, 5, (3, 3), rngs=rngs),
      norm=nnx.BatchNorm(5, rngs=rngs),
      activation=nnx.relu,
      rngs=rngs,
    )
    self.fc = nn.Gated(nnx.Linear(5 * 16, 7, rngs=rngs), rngs=rngs)
    self.head = nnx.Linear(7, 3, rngs=rngs)

  def __call__(self, x):
    x = self.block2(nnx.relu(self.bn1(self.conv1(x))))
    return self.head(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


def _build(make, seed=0):
  """``make()``'s model with numpy-random values (no per-shape init compiles): random BN
  statistics and affine params, small gate kernels and gate biases of both signs."""
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    value = rng.normal(size=var.shape)
    if isinstance(var, nn.GateAlpha):
      value = 1.0
    elif isinstance(var, nn.GateMask):
      value = np.full(var.shape, np.nan)  # live
    elif path[-1] == "var":
      value = 1.0 + np.abs(value)
    elif "gate" in path and path[-1] == "kernel":
      value = 0.01 * value
    elif "gate" in path and path[-1] == "bias":
      value = np.where(np.arange(var.shape[0]) % 3 == 0, -1.0, 1.0)
    var.set_value(jnp.asarray(value, var.dtype))
  return model


forward = nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_folded_model_equals_hard_gated_model(mode):
  model = _build(lambda: GatedNet(nnx.Rngs(0)))
  model.eval() if mode == "eval" else model.train()
  x = jax.random.normal(jax.random.key(2), (4, 4, 4, 2))
  nn.set_alpha(model, jnp.inf)
  hard = nnx.clone(model)
  gated_out = forward(hard, x)
  masks = nn.hard_masks(nn.gate_vectors(hard))
  assert sorted(masks) == ["block2/gate", "conv1/gate", "fc/gate"]
  assert all(0 < int(m.sum()) < m.size for m in masks.values())  # some kept, some removed

  plain, param_masks = nn.ungate(model, masks)
  assert not nn.gates(plain)
  assert type(plain.conv1).__name__ == "Conv" and type(plain.block2).__name__ == "Sequential"
  np.testing.assert_allclose(forward(plain, x), gated_out, atol=1e-5, rtol=0)

  params = nnx.state(plain, nnx.Param)
  tree_lib.check_same_structure(params, param_masks)
  folded = {p for p, m in tree_lib.leaves_with_paths(param_masks) if m is not None}
  assert folded == {
    "conv1/kernel",
    "conv1/bias",
    "block2/layers/0/kernel",
    "block2/layers/0/bias",
    "block2/layers/1/scale",
    "block2/layers/1/bias",
    "fc/kernel",
    "fc/bias",
  }
  kernel_mask = param_masks["block2"]["layers"][0]["kernel"][...]
  assert kernel_mask.shape == (3, 3, 6, 5)
  np.testing.assert_array_equal(kernel_mask, jnp.broadcast_to(masks["block2/gate"], (3, 3, 6, 5)))
  summary = jaxprune.summary(jaxprune.apply_mask(params, param_masks), where=r"kernel")
  assert summary.zeros >= jaxprune.summary(param_masks, where=r"kernel").zeros
  assert nn.gates(model)  # the gated model is left as it was
  if mode == "eval":  # surgery then cuts the removed channels: gate-free and smaller
    small = surgery.shrink(plain, masks=param_masks, example_input=x[:1])
    small.model.eval()
    np.testing.assert_allclose(forward(small.model, x), gated_out, atol=1e-5, rtol=0)
    # channels that emit exactly zero go; conv1's removed channels still emit relu(BN(0))
    # into a padded 3x3 conv, which cannot be folded exactly, so surgery keeps them
    assert small.model.block2.layers[0].out_features == int(masks["block2/gate"].sum())
    assert small.model.fc.out_features == int(masks["fc/gate"].sum())


def _calibrated(seed=0):
  """A GatedNet with masks from a training-mode pass over 32 images (as the recipe does),
  then put in eval mode, where BatchNorm uses its running statistics. The gates' logits
  depend on the input (kernel std 1, bias 0), as trained gates' do."""
  model = _build(lambda: GatedNet(nnx.Rngs(0)), seed=seed)
  rng = np.random.default_rng(seed + 1)
  for gate in nn.gates(model).values():
    gate.kernel.set_value(jnp.asarray(rng.normal(size=gate.kernel.shape), jnp.float32))
    gate.bias.set_value(jnp.zeros_like(gate.bias[...]))
  nn.set_alpha(model, jnp.inf)
  calibration = nnx.clone(model)
  calibration.train()
  forward(calibration, jax.random.normal(jax.random.key(5), (32, 4, 4, 2)))
  masks = nn.hard_masks(nn.gate_vectors(calibration))
  model.eval()
  return model, masks


@pytest.mark.parametrize("batch", [1, 16])
def test_frozen_gated_model_equals_the_folded_model(batch):
  model, masks = _calibrated()
  x = np.random.default_rng(7).standard_normal((batch, 4, 4, 2)).astype(np.float32)
  plain, _ = nn.ungate(model, masks)
  plain.eval()
  want = jnp.concatenate([forward(plain, x[i : i + 1]) for i in range(batch)])
  np.testing.assert_allclose(forward(plain, x), want, atol=1e-5, rtol=0)
  nn.freeze_gates(model, masks)
  got = jnp.concatenate([forward(model, x[i : i + 1]) for i in range(batch)])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(forward(model, x), want, atol=1e-5, rtol=0)
  assert all((v == masks[p]).all() for p, v in nn.gate_vectors(model).items())


def test_live_hard_gates_can_disagree_with_the_masks_in_eval_mode():
  """Why freezing is needed: in eval mode the hard gates of single images differ from the
  calibration masks for some images and channels (BatchNorm running statistics)."""
  model, masks = _calibrated()
  x = jax.random.normal(jax.random.key(7), (16, 4, 4, 2))
  flips = 0
  for i in range(16):
    forward(model, x[i : i + 1])
    flips += sum(
      int((v != masks[p]).sum()) for p, v in nn.hard_masks(nn.gate_vectors(model)).items()
    )
  assert flips > 0
  nn.freeze_gates(model, masks)
  for i in range(16):
    forward(model, x[i : i + 1])
    vectors = nn.hard_masks(nn.gate_vectors(model))
    assert all((v == masks[p]).all() for p, v in vectors.items())


def test_freeze_gates_checks_the_masks():
  model, masks = _calibrated()
  with pytest.raises(ValueError, match=r"missing \['fc/gate'\], unknown \['head'\]"):
    nn.freeze_gates(model, {**{p: m for p, m in masks.items() if p != "fc/gate"}, "head": 1})
  with pytest.raises(ValueError, match="'fc/gate' has shape \\(3,\\)"):
    nn.freeze_gates(model, {**masks, "fc/gate": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match="no jaxprune.nn.Gate to freeze"):
    nn.freeze_gates(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {})


def test_frozen_gates_do_not_recompile():
  model, masks = _calibrated()
  graphdef, _ = nnx.split(model)
  apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jnp.ones((2, 4, 4, 2))
  outs = [apply(nnx.state(model), x)]
  nn.freeze_gates(model, masks)
  outs.append(apply(nnx.state(model), x))
  nn.freeze_gates(model, None)
  outs.append(apply(nnx.state(model), x))
  assert apply._cache_size() == 1
  np.testing.assert_array_equal(outs[0], outs[2])


def test_ungate_explains_what_it_cannot_fold():
  bare = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nn.Gate(3, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match="not inside jaxprune.nn.Gated"):
    nn.ungate(bare, {"layers/1": jnp.ones(3, bool)})
  block = nn.Gated(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="missing \\['gate'\\], unknown \\['fc'\\]"):
    nn.ungate(block, {"fc": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match="shape \\(4,\\)"):
    nn.ungate(block, {"gate": jnp.ones(4, bool)})
  shifted = nn.Gated(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), activation=nnx.sigmoid, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="not zero at zero"):
    nn.ungate(shifted, {"gate": jnp.ones(3, bool)})
  with pytest.raises(TypeError, match="LayerNorm"):
    nn.Gated(
      nnx.Linear(2, 3, rngs=nnx.Rngs(0)), norm=nnx.LayerNorm(3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)
    )


class LinenNet(linen_nn.Module):
  gated: bool = True

  @linen_nn.compact
  def __call__(self, x, alpha=1.0):
    x = linen_nn.Conv(6, (3, 3), name="conv1")(x)
    if self.gated:
      x = nn.linen.Gate(init_std=0.01, name="gate1")(x, alpha)
    x = linen_nn.relu(linen_nn.BatchNorm(use_running_average=True, name="bn1")(x))
    x = linen_nn.Conv(5, (3, 3), name="conv2")(x)
    x = linen_nn.relu(linen_nn.BatchNorm(use_running_average=True, name="bn2")(x))
    if self.gated:
      x = nn.linen.Gate(init_std=0.01, name="gate2")(x, alpha)
    return linen_nn.Dense(3, name="head")(x.mean((1, 2)))


def test_linen_ungate_params_equals_hard_gated_model():
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  variables = jax.jit(LinenNet().init)(jax.random.key(1), x)
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: (
      jnp.where(jnp.arange(v.shape[0]) % 3 == 0, -1.0, 1.0)
      if "gate" in tree_lib.path_str(p) and tree_lib.path_str(p).endswith("bias")
      else v
    ),
    variables["params"],
  )
  stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
  apply = jax.jit(lambda v, x, a: LinenNet().apply(v, x, a, mutable=["intermediates"]))
  out, state = apply({"params": params, "batch_stats": stats}, x, jnp.inf)
  masks = nn.hard_masks(nn.gate_vectors(state))
  assert sorted(masks) == ["gate1", "gate2"]
  assert all(0 < int(m.sum()) < m.size for m in masks.values())
  folded, param_masks = nn.ungate_params(
    params, masks, {"gate1": "conv1", "gate2": ("conv2", "bn2")}
  )
  assert "gate1" not in folded and "gate2" not in folded
  assert param_masks["bn2"]["scale"].tolist() == masks["gate2"].tolist()
  assert param_masks["head"]["kernel"] is None
  plain = jax.jit(LinenNet(gated=False).apply)({"params": folded, "batch_stats": stats}, x)
  np.testing.assert_allclose(plain, out, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="No producer"):
    nn.ungate_params(params, masks, {"gate1": "conv1"})


class LinenTrainNet(linen_nn.Module):
  """LinenNet with BatchNorm in either mode, gates after conv-BN-ReLU."""

  gated: bool = True

  @linen_nn.compact
  def __call__(self, x, alpha=1.0, train=False):
    for i, width in enumerate((6, 5)):
      x = linen_nn.Conv(width, (3, 3), name=f"conv{i}")(x)
      x = linen_nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      x = linen_nn.relu(x)
      if self.gated:
        x = nn.linen.Gate(init_std=0.01, name=f"gate{i}")(x, alpha)
    return linen_nn.Dense(3, name="head")(x.mean((1, 2)))


@pytest.mark.parametrize("batch", [1, 16])
def test_linen_frozen_gates_equal_the_folded_model(batch):
  x = jax.random.normal(jax.random.key(0), (batch, 6, 6, 2))
  calibration = jax.random.normal(jax.random.key(3), (32, 6, 6, 2))
  variables = jax.jit(LinenTrainNet().init)(jax.random.key(1), x)
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: (
      jnp.where(jnp.arange(v.shape[0]) % 3 == 0, -1.0, 1.0)
      if "gate" in tree_lib.path_str(p) and tree_lib.path_str(p).endswith("bias")
      else v
    ),
    variables["params"],
  )
  stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
  variables = {"params": params, "batch_stats": stats}
  _, state = jax.jit(
    lambda v, x: LinenTrainNet().apply(
      v, x, jnp.inf, train=True, mutable=["intermediates", "batch_stats"]
    )
  )(variables, calibration)
  masks = nn.hard_masks(nn.gate_vectors(state))
  assert sorted(masks) == ["gate0", "gate1"]
  folded, _ = nn.ungate_params(
    params, masks, {"gate0": ("conv0", "bn0"), "gate1": ("conv1", "bn1")}
  )
  plain = jax.jit(LinenTrainNet(gated=False).apply)
  want = jnp.concatenate(
    [plain({"params": folded, "batch_stats": stats}, x[i : i + 1]) for i in range(batch)]
  )
  frozen = nn.linen.freeze_gates(variables, masks)
  assert "gate_masks" not in variables and sorted(frozen["gate_masks"]) == ["gate0", "gate1"]
  apply = jax.jit(lambda v, x: LinenTrainNet().apply(v, x, 1.0, mutable=["intermediates"]))
  got = jnp.concatenate([apply(frozen, x[i : i + 1])[0] for i in range(batch)])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  out, state = apply(frozen, x)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
  assert all((v == masks[p]).all() for p, v in nn.gate_vectors(state).items())
  with pytest.raises(ValueError, match="No gate params under \\['gate9'\\]"):
    nn.linen.freeze_gates(variables, {"gate9": masks["gate0"]})
  with pytest.raises(ValueError, match="'head' is not a gate"):
    nn.linen.freeze_gates(variables, {"head": jnp.ones(3, bool)})


def test_gate_vectors_needs_gates():
  with pytest.raises(ValueError, match="No gate vectors"):
    nn.gate_vectors(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no jaxprune.nn.Gate"):
    nn.set_alpha(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 1.0)


def test_recipe_reaches_the_target_keep_ratio():
  config = config_lib.load_config(ROOT / "configs" / "autopruner.py")
  config.autopruner.update(pretrain_steps=150, finetune_steps=60)
  config.train.update(steps=300, progress=False)
  result = train_recipe(config)
  a = config.autopruner
  assert result.keep_ratio == pytest.approx(a.keep_ratio, abs=0.02)
  assert result.accuracy_finetuned > 0.9
  kept = [round(result.keep_ratios[f"blocks/{i}/gate"] * w) for i, w in enumerate(a.widths)]
  assert result.macs_pruned == conv_net_macs(kept, 8) < result.macs_dense
  assert not nn.gates(result.model)
  params = nnx.state(result.model, nnx.Param)
  for path, m in tree_lib.leaves_with_paths(result.masks):  # removed channels stay zero
    if m is not None:
      leaf = dict(tree_lib.leaves_with_paths(params))[path]
      assert float(jnp.abs(jnp.where(m, 0.0, leaf)).max()) == 0.0
