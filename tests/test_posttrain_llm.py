"""posttrain at LLM scale: one pass per block from cached states (equal to the traced path,
block evaluations counted, host cache), bfloat16, OWL's per-block sparsity and depth
pruning (block influence, drop_blocks), against NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_log import compiled
from flax import nnx

import jaxprune
from jaxprune import posttrain
from jaxprune.models.decoder import CharLM
from jaxprune.posttrain import blockwise
from jaxprune.posttrain import calibration as calibration_lib
from jaxprune.train import data

BLOCKS = r"^blocks/(\d+)/"


def small_lm(depth=3, seed=0, vocab=11):
  return CharLM(vocab, dim=16, depth=depth, num_heads=4, num_kv_heads=2, mlp_dim=32,
                rngs=nnx.Rngs(seed))  # fmt: skip


def token_batches(n=2, vocab=11, shape=(4, 8)):
  rng = np.random.default_rng(0)
  return [rng.integers(0, vocab, shape).astype(np.int32) for _ in range(n)]


def leaves_np(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- One pass per block ------------------------------------------------------------------


def test_one_pass_per_block_equals_the_traced_block_by_block_path():
  method = "sparsegpt"  # masks and weight updates (Wanda's masks: the OWL test)
  model, batches = small_lm(depth=2), token_batches()
  ref_params, ref_masks = posttrain.prune(model, None, batches, method=method, blocks=BLOCKS)
  params, masks = posttrain.prune(model, None, batches, method=method, stack=True)
  assert len([m for m in jax.tree.leaves(masks)]) == 14  # 7 projections x 2 blocks
  for a, b in zip(leaves_np(ref_masks), leaves_np(masks), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(leaves_np(ref_params), leaves_np(params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


class Counter:
  def __init__(self):
    self.n, self.rows = 0, 0

  def tick(self, rows=0):
    self.n += 1
    self.rows += rows


class Counting(nnx.Module):
  """One block, wrapped: every evaluation of the compiled program ticks the counter."""

  def __init__(self, inner, counter):
    self.inner, self.counter = inner, counter

  def __call__(self, x):
    jax.debug.callback(functools.partial(self.counter.tick, x.shape[0]))
    return self.inner(x)


class CountedLM(nnx.Module):
  def __init__(self, depth, counter, rngs):
    lm = CharLM(11, dim=16, depth=depth, num_heads=2, num_kv_heads=1, mlp_dim=16, rngs=rngs)
    self.embed, self.norm, self.head = lm.embed, lm.norm, lm.head
    self.blocks = nnx.List([Counting(b, counter) for b in lm.blocks])

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def test_each_block_is_evaluated_twice_per_batch_the_last_once():
  counter, depth, n_batches = Counter(), 3, 2
  model = CountedLM(depth, counter, nnx.Rngs(0))
  batches = token_batches(n_batches)
  stack = posttrain.Stack(model.embed, list(model.blocks))  # no suffix: no check pass
  posttrain.prune(model, None, batches, method="wanda", stack=stack)
  jax.effects_barrier()
  assert counter.n == (2 * depth - 1) * n_batches  # capture + output, the last: capture


def test_hidden_cache_goes_to_the_host_over_budget():
  arrays = [jnp.ones((2, 3), jnp.bfloat16), jnp.ones((2, 3), jnp.bfloat16)]  # 24 bytes
  assert not blockwise.HiddenCache(arrays, budget=24).on_host
  host = blockwise.HiddenCache(arrays, budget=23)
  assert host.on_host and all(isinstance(x, np.ndarray) for x in host.arrays)
  assert all(isinstance(x, np.ndarray) for x in host.map(lambda x: x * 2).arrays)


def test_the_stack_check_runs_the_model_on_one_example_not_the_batch():
  counter, depth, n_batches = Counter(), 3, 2
  model = CountedLM(depth, counter, nnx.Rngs(0))
  batches = token_batches(n_batches)  # 4 rows each
  posttrain.prune(model, None, batches, method="wanda", stack=True)  # with suffix: checked
  jax.effects_barrier()
  assert counter.n == (2 * depth - 1) * n_batches + 2 * depth  # + the stack and the model
  assert counter.rows == (2 * depth - 1) * n_batches * 4 + 2 * depth * 1


class Scaled(nnx.Module):
  """embed -> blocks -> norm -> head, but the embedding is scaled: not the plain pattern."""

  def __init__(self):
    lm = small_lm(depth=1)
    self.embed, self.blocks, self.norm, self.head = lm.embed, lm.blocks, lm.norm, lm.head

  def __call__(self, tokens):
    x = self.embed(tokens) * 4.0
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def test_stack_errors_name_the_problem():
  batches = token_batches(1)
  with pytest.raises(ValueError, match=r"stack of Scaled .* does not reproduce the model"):
    posttrain.prune(Scaled(), None, batches, stack=True)
  seq = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"Sequential has 'layers' but no embed or embed_tokens"):
    posttrain.prune(seq, None, [np.ones((2, 4), np.float32)], stack=True)
  with pytest.raises(ValueError, match="blocks= .* or stack=, not both"):
    posttrain.prune(small_lm(), None, batches, stack=True, blocks=BLOCKS)
  with pytest.raises(ValueError, match=r"No linear layer selected by where='nothing' in the 2"):
    posttrain.prune(small_lm(depth=2), None, batches, stack=True, where="nothing")
  other = small_lm(depth=2)
  stack = posttrain.Stack(other.embed, list(other.blocks))
  with pytest.raises(ValueError, match=r"Stack block 0 \(Block\) is not a submodule"):
    posttrain.prune(small_lm(), None, batches, stack=stack)


# --- bfloat16, on a briefly trained character LM -------------------------------------------


@pytest.fixture(scope="module")
def trained():
  """A tiny charlm trained 100 steps on pydoc_topics (windows of 32 characters)."""
  ds = data.load("pydoc_topics", seq_len=32)
  model = CharLM(ds.num_classes, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 rngs=nnx.Rngs(0))  # fmt: skip
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  rng = np.random.default_rng(0)
  for _ in range(100):
    x, y = ds.train.take(rng.integers(0, len(ds.train), 32))
    step(model, optimizer, x, y)
  calibration = [ds.train.take(rng.integers(0, len(ds.train), 32))[0] for _ in range(2)]
  test = ds.test.take(np.arange(256))
  return model, calibration, test


@nnx.jit
def mean_loss(model, x, y):
  logits = model(x).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def perplexity(model, test):
  return float(np.exp(mean_loss(model, *test)))


def as_dtype(model, dtype):
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))


def test_bfloat16_pruning_is_within_one_percent_of_float32(trained):
  model, calibration, test = trained
  half = as_dtype(model, jnp.bfloat16)
  stats = posttrain.calibrate(half, None, calibration)
  assert {s.sq_norms.dtype for s in stats.values()} == {jnp.dtype(jnp.float32)}
  assert {s.xtx.dtype for s in stats.values()} == {jnp.dtype(jnp.float32)}
  full_params, _ = posttrain.prune(
    model, None, calibration, sparsity=0.6, stack=posttrain.Stack(model.embed, model.blocks)
  )
  half_params, half_masks = posttrain.prune(
    half, None, calibration, sparsity=0.6, stack=posttrain.Stack(half.embed, half.blocks)
  )
  kernel = half_params["blocks"][0]["mlp"]["down_proj"]["kernel"][...]
  assert kernel.dtype == jnp.bfloat16 and int(half_masks["blocks"][0]["mlp"]["down_proj"][
    "kernel"].sum()) == round(0.4 * kernel.size)  # fmt: skip
  pruned_full, pruned_half = nnx.clone(model), nnx.clone(half)
  nnx.update(pruned_full, full_params)
  nnx.update(pruned_half, half_params)
  dense, p32, p16 = (perplexity(m, test) for m in (model, pruned_full, pruned_half))
  assert p32 > 1.02 * dense  # the pruning did something
  assert abs(p16 / p32 - 1) < 0.01, (dense, p32, p16)


def test_pruning_again_compiles_nothing_and_equals_a_fresh_compile():
  """Programs are kept across calls, keyed by what they compute (the graph definition,
  state structure and dtypes): a sparsity sweep compiles once, and a model of the same
  structure in another dtype gets its own programs. Results served by kept programs equal
  the ones compiled from scratch (the caches emptied)."""
  model, batches = small_lm(depth=2, seed=4), token_batches(2)
  half = as_dtype(model, jnp.bfloat16)
  runs = [(m, where) for m in (model, half) for where in ({"stack": True}, {"blocks": BLOCKS})]

  def sweep(sparsities):
    return [
      leaves_np(posttrain.prune(m, None, batches, method="wanda", sparsity=s, **where)[1])
      for s in sparsities
      for m, where in runs
    ]

  first = sweep((0.5, 0.75))  # 0.75: every program was compiled at 0.5
  with compiled() as names:
    again = sweep((0.5, 0.75))
  assert names == []
  blockwise._RUNS.clear()
  calibration_lib._STATS.clear()
  fresh = sweep((0.75,))
  for a, b, c in zip(first[len(runs) :], again[len(runs) :], fresh, strict=True):
    for x, y, z in zip(a, b, c, strict=True):
      np.testing.assert_array_equal(x, z)
      np.testing.assert_array_equal(y, z)
  assert not all((x == y).all() for x, y in zip(first[0], first[2]))  # f32 and bf16 differ


def test_the_program_cache_is_bounded_oldest_out():
  cache = calibration_lib.ProgramCache(size=2)
  for key in "abc":
    assert cache.put(key, len) is len
  assert list(cache) == ["b", "c"]


# --- OWL ------------------------------------------------------------------------------------


def numpy_owl(kernels_by_block, norms_by_block, s, m=5.0, lam=0.08):
  """The reference code's steps, in float64 NumPy."""
  ratios = []
  for kernels, norms in zip(kernels_by_block, norms_by_block):
    scores = np.concatenate(
      [(np.abs(k.astype(np.float64)) * n[:, None]).ravel() for k, n in zip(kernels, norms)]
    )
    ratios.append((scores > m * scores.mean()).sum() / scores.size * 100)
  r = np.asarray(ratios)
  r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
  r = r - r.mean() + (1 - s)
  return 1 - r, np.asarray(ratios) / 100


def test_owl_sparsities_match_the_reference_formula_and_prune_uses_them():
  model = small_lm(depth=4, seed=3)
  batches = token_batches(2)
  stats = posttrain.calibrate(model, None, batches, hessian=False)
  params = nnx.state(model, nnx.Param)
  groups = posttrain.group_blocks({p: s.layer for p, s in stats.items()}, BLOCKS)
  flat = dict(jaxprune.tree.leaves_with_paths(params))
  kernels = [[np.asarray(flat[p]) for p in g] for g in groups]
  norms = [[np.sqrt(np.asarray(stats[p].sq_norms, np.float64)) for p in g] for g in groups]
  for s in (0.6, 0.7, 0.8):
    expected, ratios = numpy_owl(kernels, norms, s)
    got = posttrain.owl_sparsities(params, stats, groups, s)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert np.mean(got) == pytest.approx(s, abs=1e-12)
    np.testing.assert_allclose(posttrain.outlier_ratios(params, stats, groups), ratios)
    assert list(np.argsort(got, kind="stable")) == list(np.argsort(-ratios, kind="stable"))
    assert max(got) - min(got) == pytest.approx(0.16)
  # prune(owl=True): each block's Wanda layers at that block's sparsity, per output
  expected, _ = numpy_owl(kernels, norms, 0.7)
  _, masks = posttrain.prune(model, None, batches, method="wanda", sparsity=0.7, owl=True,
                             stack=True)  # fmt: skip
  for b, s_b in enumerate(expected):
    kept = np.asarray(masks["blocks"][b]["mlp"]["up_proj"]["kernel"])
    assert (kept.sum(0) == 16 - round(s_b * 16)).all()
  generic = posttrain.prune(model, None, batches, method="wanda", sparsity=0.7, owl=True,
                            blocks=BLOCKS)[1]  # fmt: skip
  for a, b in zip(leaves_np(masks), leaves_np(generic), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="owl= .* does not apply to N:M"):
    posttrain.prune(model, None, batches, owl=True, stack=True, structure=jaxprune.n_m(2, 4))
  with pytest.raises(ValueError, match=r"owl: sparsity=0.95 with lam=0.08 .* outside \[0, 1\)"):
    posttrain.owl_sparsities(params, stats, groups, 0.95)


def test_per_block_sparsity_list_and_the_host_cache():
  model, batches = small_lm(), token_batches()
  _, masks = posttrain.prune(model, None, batches, method="wanda", sparsity=[0.25, 0.5, 0.75],
                             stack=True)  # fmt: skip
  for b, s in enumerate([0.25, 0.5, 0.75]):
    assert np.asarray(masks["blocks"][b]["attn"]["q_proj"]["kernel"]).mean() == 1 - s
  # the host cache (a 1-byte budget: every batch on the host) gives the same result
  _, host = posttrain.prune(model, None, batches, method="wanda", sparsity=[0.25, 0.5, 0.75],
                            stack=True, cache_bytes=1)  # fmt: skip
  for a, b in zip(leaves_np(masks), leaves_np(host), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"sparsity: 2 values given, one per block is 3"):
    posttrain.prune(model, None, batches, sparsity=[0.5, 0.5], blocks=BLOCKS)


# --- Depth pruning -----------------------------------------------------------------------


@nnx.jit
def forward(module, x):
  """One compile per module structure (the 4 blocks share one); eagerly, every op compiles."""
  return module(x)


def test_block_influence_matches_numpy_and_drop_blocks_skips_them():
  model, batches = small_lm(depth=4, seed=1), token_batches(2)
  bi = posttrain.block_influence(model, batches)
  cos = [[] for _ in range(4)]
  for tokens in batches:
    x = forward(model.embed, tokens)
    for i, block in enumerate(model.blocks):
      y = forward(block, x)
      a, b = np.asarray(x, np.float64).reshape(-1, 16), np.asarray(y, np.float64).reshape(-1, 16)
      cos[i] += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
      x = y
  np.testing.assert_allclose(bi, [1 - np.mean(c) for c in cos], atol=1e-6)
  drop = list(np.argsort(bi)[:2])
  short = posttrain.drop_blocks(model, drop)
  assert len(short.blocks) == 2 and len(model.blocks) == 4  # the original is unchanged
  kept = [i for i in range(4) if i not in drop]
  state = nnx.state(short, nnx.Param)
  assert sorted(state["blocks"].keys()) == [0, 1]  # renumbered
  np.testing.assert_array_equal(
    state["blocks"][1]["mlp"]["up_proj"]["kernel"][...],
    model.blocks[kept[1]].mlp.up_proj.kernel[...],
  )
  tokens = batches[0]
  x = forward(model.embed, tokens)
  for i in kept:
    x = forward(model.blocks[i], x)
  np.testing.assert_allclose(
    forward(short, tokens), forward(model.head, forward(model.norm, x)), atol=1e-6
  )
  with pytest.raises(
    ValueError, match=r"indices \[1, 1\] must be distinct blocks of Decoder, 0..3"
  ):
    posttrain.drop_blocks(model, [1, 1])
  with pytest.raises(ValueError, match="removing all 4 blocks"):
    posttrain.drop_blocks(model, [0, 1, 2, 3])


class Configured(nnx.Module):
  def __init__(self):
    lm = small_lm(depth=3)
    self.embed, self.layers, self.norm, self.lm_head = lm.embed, lm.blocks, lm.norm, lm.head
    self.config = {"num_hidden_layers": 3, "hidden_size": 16}
    self.num_layers = 3

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))


def test_drop_blocks_updates_the_layer_count_of_the_config():
  short = posttrain.drop_blocks(Configured(), [0])
  assert short.config == {"num_hidden_layers": 2, "hidden_size": 16} and short.num_layers == 2
  assert len(short.layers) == 2
