"""Linen attention as the ecosystem writes it: nanoGPT, Gemma's Linen modules, Flax's own.

Each model reproduces the parameter layout and call pattern of public code (written
here, not copied): a nanoGPT block (fused ``c_attn`` Dense of 3 * d, split, heads by a
reshape with the module's ``n_head`` field, causal softmax, ``c_proj``; MLP ``c_fc`` /
``c_proj`` with GELU; LayerNorm), Gemma's Linen layers (an ``Einsum`` module holding a
param of a given ``shape``; grouped-query attention with ``q_einsum`` [heads, d,
head_dim], ``kv_einsum`` [2, kv_heads, d, head_dim], ``attn_vec_einsum`` [heads,
head_dim, d]; the gated MLP ``gating_einsum`` [2, d, f] and ``linear`` [f, d] in the
MLP's own scope) and ``nn.MultiHeadDotProductAttention`` (self and cross).

For each: plan -> ``channel_masks`` -> shrink, and the shrunk model equals the masked
one (the masks applied with ``jnp.where`` to the original params, the original module
run) at batch sizes and sequence lengths other than the example input's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxprune import surgery
from jaxprune import tree as tree_lib

D, HEADS, HEAD_DIM, VOCAB = 16, 4, 4, 11
SIZES = ((1, 3), (2, 5))  # (batch, length): neither is the example's (1, 4)
TOKENS = jax.ShapeDtypeStruct((1, 4), jnp.int32)


def filled(model, *inputs, seed=0):
  """Variables of ``model`` filled with numpy random values (non-zero biases)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if name in ("scale",):
      value = rng.uniform(0.5, 1.5, size=x.shape)
    elif name == "bias":
      value = 0.5 * rng.normal(size=x.shape) + 0.3
    else:
      value = rng.normal(size=x.shape) / np.sqrt(max(x.shape[-2] if x.ndim > 1 else 1, 1))
    return jnp.asarray(value, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def where(masks, tree):
  return jax.tree.map(
    lambda m, x: x if m is None else jnp.where(m, x, 0), masks, tree, is_leaf=lambda m: m is None
  )


def tokens(batch, length, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


def assert_equivalent(model, variables, masks, small, make_inputs):
  """The shrunk model equals the masked original at every size of ``SIZES``."""
  masked = {**variables, "params": where(masks, variables["params"])}
  run, run_small = jax.jit(model.apply), jax.jit(small.model.apply)
  for batch, length in SIZES:
    xs = make_inputs(batch, length)
    ref, out = run(masked, *xs), run_small(small.variables, *xs)
    scale = max(1.0, float(jnp.abs(ref).max()))
    err = float(jnp.abs(ref - out).max())
    assert err <= 1e-5 * scale, f"batch {batch}, length {length}: error {err:.3g}"


def n_params(params):
  return sum(x.size for x in jax.tree.leaves(params))


def line_of(text):
  """``test_surgery_linen_attention.py:LINE`` of the first line of this file with ``text``."""
  with open(__file__) as f:
    n = next(i for i, line in enumerate(f, 1) if text in line)
  return f"test_surgery_linen_attention.py:{n}"


def causal(t):
  return jnp.tril(jnp.ones((t, t), bool))


# --- nanoGPT: fused c_attn, split, heads by a reshape with the module's n_head ---


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  n_embd: int = D
  n_head: int = HEADS


class CausalSelfAttention(nn.Module):
  n_embd: int
  n_head: int | None = None  # the head count as a field, or in a config (Flax ports)
  config: GPTConfig | None = None
  exact_split: bool = False  # nanoGPT's own `C // n_head`, C the input width

  @nn.compact
  def __call__(self, x):
    b, t, c = x.shape
    n_head = self.config.n_head if self.config is not None else self.n_head
    qkv = nn.Dense(3 * self.n_embd, name="c_attn")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    if self.exact_split:
      heads = lambda z: z.reshape(b, t, n_head, c // n_head).swapaxes(1, 2)  # noqa: E731
    else:
      heads = lambda z: z.reshape(b, t, n_head, -1).swapaxes(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    att = (q @ k.swapaxes(-2, -1)) * (1.0 / np.sqrt(k.shape[-1]))
    att = nn.softmax(jnp.where(causal(t), att, -jnp.inf), axis=-1)
    y = (att @ v).swapaxes(1, 2).reshape(b, t, -1)
    return nn.Dense(self.n_embd, name="c_proj")(y)


class MLP(nn.Module):
  n_embd: int

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(4 * self.n_embd, name="c_fc")(x), approximate=True)
    return nn.Dense(self.n_embd, name="c_proj")(x)


class Block(nn.Module):
  n_embd: int
  n_head: int
  exact_split: bool = False
  config_heads: bool = False  # the attention reads its head count from a GPTConfig

  @nn.compact
  def __call__(self, x):
    if self.config_heads:
      config = GPTConfig(self.n_embd, self.n_head)
      attn = CausalSelfAttention(self.n_embd, config=config, name="attn")
    else:
      attn = CausalSelfAttention(
        self.n_embd, self.n_head, exact_split=self.exact_split, name="attn"
      )
    x = x + attn(nn.LayerNorm(epsilon=1e-5, name="ln_1")(x))
    return x + MLP(self.n_embd, name="mlp")(nn.LayerNorm(epsilon=1e-5, name="ln_2")(x))


class GPT(nn.Module):
  n_layer: int = 2
  n_embd: int = D
  n_head: int = HEADS
  block_size: int = 8
  exact_split: bool = False

  @nn.compact
  def __call__(self, idx):
    t = idx.shape[1]
    x = nn.Embed(VOCAB, self.n_embd, name="wte")(idx)
    x = x + nn.Embed(self.block_size, self.n_embd, name="wpe")(jnp.arange(t)[None])
    for i in range(self.n_layer):
      x = Block(self.n_embd, self.n_head, self.exact_split, i % 2 == 1, name=f"h_{i}")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def test_nanogpt_heads_and_mlp_shrunk_equals_masked_with_n_head_set():
  model = GPT()
  variables = filled(model, jnp.zeros((1, 4), jnp.int32))
  p = surgery.plan(model, variables, example_input=TOKENS)
  heads = [g for g in p.groups if g.kind == "heads"]
  assert [(g.name, g.size, g.blocked) for g in heads] == [
    (f"params/h_{i}/attn/heads", HEADS, None) for i in range(2)
  ]
  masks = surgery.channel_masks(p, variables["params"], {"heads": 0.5, "neurons": 0.25})
  small = surgery.shrink(model, variables, masks, example_input=TOKENS)
  assert small.widths["h_0/attn"] == {"n_head": 2}
  assert small.widths["h_1/attn"] == {"config.n_head": 2}
  for i in range(2):
    assert small.widths[f"h_{i}/attn/c_attn"]["features"] == 3 * 8
    assert small.widths[f"h_{i}/mlp/c_fc"]["features"] == 48
    assert small.variables["params"][f"h_{i}"]["attn"]["c_proj"]["kernel"].shape == (8, D)
  assert_equivalent(model, variables, masks, small, lambda b, t: (tokens(b, t, 10 * b + t),))


def test_every_block_of_a_causal_stack_is_attention_with_a_batch_of_one():
  """The causal mask (``iota``) labels the positions axes of the logits and the
  weights . values dot passes them on to the residual stream: with the example's batch
  of one squeezed away, every axis of the next block's q and k carries labels. They are
  still activations (computed from the inputs), so each block has its heads, q.k head
  dims and value head dims, not three groups of neurons per fused projection."""
  model = GPT(n_layer=3)
  p = surgery.plan(model, filled(model, jnp.zeros((1, 4), jnp.int32)), example_input=TOKENS)
  attention = [
    (g.name, g.kind, g.size, sorted(g.roles)) for g in p.groups if g.kind in ("heads", "head_dim")
  ]
  assert attention == [
    group
    for i in range(3)
    for group in (
      (f"params/h_{i}/attn/c_attn/head_dim", "head_dim", HEAD_DIM, ["dim", "qk"]),
      (f"params/h_{i}/attn/heads", "heads", HEADS, ["heads"]),
      (f"params/h_{i}/attn/v_head_dim", "head_dim", HEAD_DIM, ["dim", "v"]),
    )
  ]
  assert not [g.name for g in p.groups if "/attn/c_attn/kernel" in g.name]  # no q/k/v neurons


def test_nanogpt_input_width_split_is_blocked_at_plan_time_with_the_line():
  """``reshape(B, T, n_head, C // n_head)`` with C the residual width: no field sets
  it, so the heads cannot go; the plan says so and where, before any shrink."""
  model = GPT(n_layer=1, exact_split=True)
  variables = filled(model, jnp.zeros((1, 4), jnp.int32))
  p = surgery.plan(model, variables, example_input=TOKENS)
  g = p.group("params/h_0/attn/heads")
  assert g.blocked is not None
  assert f"(at {line_of('c // n_head).swapaxes')}): cannot reshape" in g.blocked
  assert not p.group("params/h_0/mlp/c_fc/kernel").blocked
  with pytest.raises(ValueError, match="cannot be pruned: blocked by the model rebuilt"):
    surgery.shrink(model, variables, example_input=TOKENS, remove={g.name: [0]})


class LiteralHeads(nn.Module):
  """Heads split by a literal count: the rebuilt model would split 12 features into
  4 heads of 3 silently; the plan blocks the heads and names the line."""

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (nn.Dense(D, name=n)(x).reshape(b, t, 4, -1) for n in "qkv")
    w = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, -1)
    return x + nn.Dense(D, name="o")(out)


def test_literal_head_count_blocks_heads_at_plan_time():
  model = LiteralHeads()
  x = jax.ShapeDtypeStruct((1, 4, D), jnp.float32)
  variables = filled(model, jnp.zeros((1, 4, D)))
  p = surgery.plan(model, variables, example_input=x)
  g = p.group("params/heads")
  assert "has 3 head dims in params/head_dim, not 4" in g.blocked
  assert f"`reshape` in LiteralHeads at {line_of('.reshape(b, t, 4, -1)')}" in g.blocked


# --- Gemma's Linen modules: Einsum layers with a `shape` field, GQA, gated MLP ---


class Einsum(nn.Module):
  shape: tuple[int, ...]
  weight_name: str = "w"

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param(self.weight_name, nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    return x * (1 + scale)


def rope(x, positions, base=10_000):
  """Rotary embedding over the head dim (halves), as Gemma applies it."""
  half = x.shape[-1] // 2
  freq = base ** (2 * jnp.arange(half) / x.shape[-1])
  angle = positions[..., None] / freq  # [B, T, half]
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class GemmaAttention(nn.Module):
  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int

  def setup(self):
    self.q_einsum = Einsum((self.num_heads, self.features, self.head_dim))
    self.kv_einsum = Einsum((2, self.num_kv_heads, self.features, self.head_dim))
    self.attn_vec_einsum = Einsum((self.num_heads, self.head_dim, self.features))

  def __call__(self, x, positions):
    q = self.q_einsum("BTD,NDH->BTNH", x)
    k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    q = rope(q, positions) * self.head_dim**-0.5
    k = rope(k, positions)
    b, t, n, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k).reshape(b, t, n, t)
    logits = jnp.where(causal(t)[None, :, None, :], logits, -2.3819763e38)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = probs.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, t)
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class GemmaFeedForward(nn.Module):
  features: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x):
    gating = Einsum((2, self.features, self.hidden_dim), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NFH->...NH", x)
    hidden = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    linear = Einsum((self.hidden_dim, self.features), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", hidden)


class Gemma(nn.Module):
  num_heads: int = HEADS
  num_kv_heads: int = 2
  hidden_dim: int = 32

  def setup(self):
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(), (VOCAB, D))
    self.pre_attention_norm = RMSNorm()
    self.attn = GemmaAttention(self.num_heads, self.num_kv_heads, D, HEAD_DIM)
    self.pre_ffw_norm = RMSNorm()
    self.mlp = GemmaFeedForward(D, self.hidden_dim)
    self.final_norm = RMSNorm()

  def __call__(self, idx):
    x = self.input_embedding[(idx,)] * jnp.sqrt(D)
    positions = jnp.broadcast_to(jnp.arange(idx.shape[1]), idx.shape)
    x = x + self.attn(self.pre_attention_norm(x), positions)
    x = x + self.mlp(self.pre_ffw_norm(x))
    return jnp.dot(self.final_norm(x), self.input_embedding.T)


def test_gemma_einsum_attention_heads_and_gated_mlp_shrunk_equals_masked():
  """Grouped-query heads (one query head of each KV group, and a whole KV group) and
  the gated MLP's hidden units (``gating_einsum`` and ``linear`` in the MLP's own
  scope): every Einsum layer gets its new ``shape``, the attention its head counts."""
  model = Gemma()
  variables = filled(model, jnp.zeros((1, 4), jnp.int32))
  p = surgery.plan(model, variables, example_input=TOKENS)
  heads = {g.name for g in p.groups if g.kind == "heads" and not g.blocked}
  assert {"params/attn/kv_heads", "params/attn/query_heads"} <= heads
  (mlp,) = [g for g in p.groups if ("params/mlp/linear", 0) in g.members and not g.blocked]
  assert mlp.size == 32
  # half the KV groups (with their query heads), half the query heads of each group
  # and a quarter of the MLP's units; head_dim=True: the plan may call the MLP group a
  # head-dim group (its kind is the dataflow's, not this test's)
  ratios = {"params/attn/kv_heads": 0.5, "params/attn/query_heads": 0.5, mlp.name: 0.25}
  masks = surgery.channel_masks(p, variables["params"], ratios)
  small = surgery.shrink(model, variables, masks, example_input=TOKENS, head_dim=True)
  assert {k: len(v) for k, v in small.removed.items()} == {
    "params/attn/kv_heads": 1,
    "params/attn/query_heads": 1,
    mlp.name: 8,
  }
  assert small.widths["attn"] == {"num_heads": 1, "num_kv_heads": 1}
  assert small.widths["attn/q_einsum"] == {"shape": (1, D, HEAD_DIM)}
  assert small.widths["attn/kv_einsum"] == {"shape": (2, 1, D, HEAD_DIM)}
  assert small.widths["attn/attn_vec_einsum"] == {"shape": (1, HEAD_DIM, D)}
  assert small.widths["mlp/Einsum_0"] == {"shape": (2, D, 24)}
  assert small.widths["mlp/Einsum_1"] == {"shape": (24, D)}
  assert small.variables["params"]["mlp"]["linear"].shape == (24, D)
  assert_equivalent(model, variables, masks, small, lambda b, t: (tokens(b, t, 7 * b + t),))


# --- Flax's own nn.MultiHeadDotProductAttention: self- and cross-attention ---


class FlaxAttention(nn.Module):
  cross: bool = False

  @nn.compact
  def __call__(self, x, context=None):
    h = nn.Dense(D, name="embed")(x)
    y = nn.LayerNorm(name="ln")(h)
    if self.cross:
      # the attention's output feeds a projection, not the residual: it shrinks too
      kv = nn.Dense(D, name="context")(context)
      a = nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, name="attn")(y, kv)
      a = nn.Dense(D, name="proj")(nn.relu(a))
    else:
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
      a = nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, name="attn")(y, mask=mask)
    h = h + a
    z = nn.relu(nn.Dense(24, name="up")(nn.LayerNorm(name="ln2")(h)))
    return nn.Dense(5, name="head")(h + nn.Dense(D, name="down")(z))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_flax_multi_head_attention_heads_shrunk_equals_masked(cross):
  """Heads: ``num_heads`` and ``qkv_features``; cross-attention: the key/value inputs
  (``context`` neurons) and the output (``out_features``) shrink as well."""
  model = FlaxAttention(cross)
  x = jax.ShapeDtypeStruct((1, 4, 6), jnp.float32)
  example = (x, jax.ShapeDtypeStruct((1, 3, 5), jnp.float32)) if cross else x
  zeros = [jnp.zeros(e.shape) for e in (example if cross else (example,))]
  variables = filled(model, *zeros)
  p = surgery.plan(model, variables, example_input=example)
  g = p.group("params/attn/heads")
  assert (g.size, g.blocked) == (HEADS, None)
  masks = surgery.channel_masks(p, variables["params"], {"heads": 0.5, "neurons": 0.25})
  small = surgery.shrink(model, variables, masks, example_input=example)
  assert small.widths["attn"]["num_heads"] == 2
  assert small.widths["attn"]["qkv_features"] == 2 * HEAD_DIM
  attn = small.variables["params"]["attn"]
  assert attn["query"]["kernel"].shape == (D, 2, HEAD_DIM)
  out = 12 if cross else D
  assert small.widths["attn"].get("out_features", D) == out
  assert attn["out"]["kernel"].shape == (2, HEAD_DIM, out)
  assert n_params(small.variables["params"]) < n_params(variables["params"])

  def inputs(b, t):
    rng = np.random.default_rng(10 * b + t)
    xs = [jnp.asarray(rng.normal(size=(b, t, 6)), jnp.float32)]
    if cross:
      xs.append(jnp.asarray(rng.normal(size=(b, t + 2, 5)), jnp.float32))
    return tuple(xs)

  assert_equivalent(model, variables, masks, small, inputs)
