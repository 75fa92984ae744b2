"""jaxprune.sparse.lottery: rounds of magnitude pruning that rewind the survivors to step k."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_checkpoint import Interrupted, Interrupting  # a run dying after N batches
from xla_cache import reuse_identical_compiles  # noqa: F401 (autouse)

import jaxprune
from jaxprune import sparse
from jaxprune.train import config as config_lib
from jaxprune.train import data, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
  keep = w.size - round(sparsity * w.size)
  order = np.argsort(-np.abs(w).ravel(), kind="stable")
  mask = np.zeros(w.size, bool)
  mask[order[:keep]] = True
  return mask.reshape(w.shape)


def assert_rewound(got, want):
  """``p + (r - p)`` is ``r`` to rounding (optax.apply_updates adds); zeros are exact."""
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got) == 0, np.asarray(want) == 0)


def run(tx, steps, *, jit):
  """Params and optimizer states before each step (index t: after t updates)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32), "b": jnp.zeros(8)}
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  seen = [(params, state)]
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    seen.append((params, state))
  return seen


ROUNDS = [(5, 0.5), (8, 0.75)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_each_round_keeps_the_largest_and_rewinds_weights_and_momentum(jit):
  pruner = jaxprune.magnitude(jaxprune.iterative(ROUNDS))
  tx = sparse.lottery(optax.sgd(0.1, momentum=0.9), pruner, rewind=2)
  seen = run(tx, 11, jit=jit)
  at_rewind, rewind_trace = seen[2][0], seen[2][1].masked.inner_state[0].trace
  mask = np.ones((6, 8), bool)
  for t, sparsity in ROUNDS:
    trained = np.asarray(seen[t][0]["w"])  # the params the round prunes
    mask = magnitude_mask(trained, sparsity)
    params, state = seen[t + 1]
    assert_rewound(params["w"], np.where(mask, at_rewind["w"], 0))
    assert_rewound(params["b"], at_rewind["b"])  # unpruned: rewound whole
    trace = state.masked.inner_state[0].trace
    np.testing.assert_array_equal(trace["w"], np.where(mask, rewind_trace["w"], 0))
    np.testing.assert_array_equal(trace["b"], rewind_trace["b"])
    np.testing.assert_array_equal(jaxprune.masks_of(state)["w"], mask)
  for t, (params, _) in enumerate(seen):
    zeros = int((np.asarray(params["w"]) == 0).sum())
    assert zeros == (0 if t <= 5 else 24 if t <= 8 else 36), t  # exact, between rounds too
  # The snapshot is taken once: later states carry the step-2 copy unchanged.
  np.testing.assert_array_equal(seen[-1][1].rewind_params["w"], at_rewind["w"])
  assert int(seen[-1][1].masked.count) == 11


def test_rewind_zero_returns_to_the_initial_weights_and_a_fresh_adam():
  pruner = jaxprune.magnitude(jaxprune.iterative([(4, 0.5)]))
  tx = sparse.lottery(optax.adam(1e-2), pruner, rewind=0)
  seen = run(tx, 5, jit=True)
  initial, fresh = seen[0][0], optax.adam(1e-2).init(seen[0][0])
  params, state = seen[5]
  mask = magnitude_mask(np.asarray(seen[4][0]["w"]), 0.5)
  assert_rewound(params["w"], np.where(mask, initial["w"], 0))
  jax.tree.map(np.testing.assert_array_equal, state.masked.inner_state, fresh)


def test_a_dense_round_step_is_plain_training():
  """Before the first round lottery equals masked: same params, bit for bit."""
  pruner = jaxprune.magnitude(jaxprune.iterative([(6, 0.5)]))
  a = run(sparse.lottery(optax.adam(1e-2), pruner, rewind=3), 6, jit=True)
  b = run(jaxprune.masked(optax.adam(1e-2), pruner), 6, jit=True)
  for (pa, _), (pb, _) in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_errors_name_the_problem():
  pruner = jaxprune.magnitude(jaxprune.iterative([(3, 0.5)]))
  with pytest.raises(ValueError, match="updates its masks at step 3, not after the rewind"):
    sparse.lottery(optax.sgd(0.1), pruner, rewind=3)
  with pytest.raises(ValueError, match="rewind must be a step >= 0"):
    sparse.lottery(optax.sgd(0.1), pruner, rewind=-1)
  with pytest.raises(TypeError, match="needs a jaxprune.Pruner"):
    sparse.lottery(optax.sgd(0.1), {"w": jnp.ones(2, bool)})
  tx = sparse.lottery(optax.sgd(0.1), pruner)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update({"w": jnp.ones((2, 2))}, tx.init({"w": jnp.ones((2, 2))}))


# --- the recipe in the training pipeline ----------------------------------------------


def tiny_lottery_config(workdir):
  config = config_lib.load_config(ROOT / "configs" / "lenet300_lottery.py")
  config.data.update(name="digits", batch_size=100, eval_batch_size=300)
  config.train.update(steps=12, eval_every=6, log_every=2, progress=False, workdir=str(workdir))
  config.prune.update(begin=4, rewind=2)  # 3 rounds, every (12 - 4) // 3 = 2: at 4, 6, 8
  config.rethink.steps = 4
  config.checkpoint.every = 3
  return config


def test_resume_after_the_rounds_matches_an_uninterrupted_run(tmp_path):
  whole = loop.train(tiny_lottery_config(tmp_path / "whole"))
  assert whole.summary.sparsity == pytest.approx(0.9, abs=1e-3)
  masks = jaxprune.masks_of(whole.state.opt_state)
  for a, b in zip(
    jax.tree.leaves(masks), jax.tree.leaves(jaxprune.masks_of(whole.rethink.state.opt_state))
  ):
    np.testing.assert_array_equal(a, b)  # the random re-init trains the ticket's masks
  assert not isinstance(whole.rethink.state.opt_state, sparse.LotteryState)
  digits = data.load("digits")
  config = tiny_lottery_config(tmp_path / "cut")
  broken = dataclasses.replace(digits, train=Interrupting(digits.train, limit=10))
  with pytest.raises(Interrupted):  # dies at step 10: the last checkpoint is of step 9,
    loop.train(config, dataset=broken)  # after the rounds: the rewind point comes from it
  resumed = loop.train(config)
  assert resumed.resumed_from == 9
  for a, b in ((whole.state, resumed.state), (whole.rethink.state, resumed.rethink.state)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert resumed.history == whole.history and resumed.rethink.history == whole.rethink.history


def test_config_checks_the_lottery_fields():
  path = ROOT / "configs" / "lenet300_lottery.py"
  with pytest.raises(
    config_lib.ConfigError, match=r"prune\.rewind: .* \(prune\.begin = 1000\), got 1000"
  ):
    config_lib.load_config(path, ["prune.rewind=1000"])
  with pytest.raises(
    config_lib.ConfigError, match=r"prune\.schedule: lottery prunes with a pruner"
  ):
    config_lib.load_config(path, ["prune.method=rigl"])
  with pytest.raises(config_lib.ConfigError, match=r"prune\.rounds: the last pruning step is 5000"):
    config_lib.load_config(path, ["prune.every=2000"])
  with pytest.raises(config_lib.ConfigError, match=r"rethink\.seed: equals train\.seed \(1\)"):
    config_lib.load_config(path, ["train.seed=1"])
