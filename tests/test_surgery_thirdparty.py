"""Surgery on the layouts and call patterns of transformer code written elsewhere.

NNX modules written here after the public source of google-deepmind/gemma (``Einsum``
layers with a weight ``w`` and the ``shape`` it was built from; q / stacked kv / stacked
qkv einsums ``[heads, d_model, head_dim]``; the gated MLP ``'...F,NHF->...NH'`` with
gate and up stacked on an axis of size 2; ``attn_vec_einsum`` ``BTNH,NHD->BTD``; the
head counts read back from the einsums' shapes) and of AI-Hypercomputer/maxtext
(``DenseGeneral`` kernels ``[embed, heads, head_dim]`` and ``[heads, head_dim, embed]``
that check their input against ``in_features_shape``; ``wi_0``/``wi_1``/``wo`` or a fused
``wi`` ``[embed, 2, mlp]``), plus cross-attention, a fused qkv projection with repeated
KV heads, and ``nnx.MultiHeadAttention`` losing head dims. For each: plan ->
``channel_masks`` -> shrink, and the shrunk model equals the masked one (the masks
applied to the original params with ``jnp.where``, the original model run) at batch
sizes and lengths other than the example's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune import tree as tree_lib

D, VOCAB = 16, 11
SIZES = ((1, 3), (2, 5))  # (batch, length) checked here; the example is (1, 4)
TOKENS = jax.ShapeDtypeStruct((1, 4), jnp.int32)


def build(make, seed=0):
  """``make(rngs)`` with random values (non-zero biases and norm scales)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if name == "scale":
      value = rng.uniform(0.5, 2.0, size=x.shape)
    elif name == "bias":
      value = 0.5 * rng.normal(size=x.shape) + 0.3
    else:
      value = rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim > 1 else 4)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def masked(model, masks):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  where = jax.tree.map(
    lambda m, x: x if m is None else jnp.where(m, x, 0), masks, params, is_leaf=lambda m: m is None
  )
  return nnx.merge(graphdef, where, rest)


def tokens(b, t, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=(b, t)), jnp.int32)


@nnx.jit
def run(model, *xs):
  return model(*xs)


def assert_equivalent(model, masks, small, inputs=lambda b, t: (tokens(b, t, t),)):
  ref_model = masked(model, masks)
  for b, t in SIZES:
    xs = inputs(b, t)
    ref, out = run(ref_model, *xs), run(small.model, *xs)
    assert out.shape == ref.shape
    scale = max(1.0, float(jnp.abs(ref).max()))
    err = float(jnp.abs(ref - out).max())
    assert err <= 1e-5 * scale, f"batch {b}, length {t}: max error {err:.3g}"


def causal(t, s=None):
  return jnp.tril(jnp.ones((t, t if s is None else s), bool))


# Gemma (google-deepmind/gemma, gm/nn/_modules.py; Flax's NNX port in examples/gemma).


class Einsum(nnx.Module):
  """A weight ``w`` of the ``shape`` it keeps, applied by ``jnp.einsum(eqn, x, w)``."""

  def __init__(self, eqn, shape, rngs):
    self.eqn, self.shape = eqn, tuple(shape)
    self.w = nnx.Param(jax.random.normal(rngs.params(), self.shape))

  def __call__(self, x):
    return jnp.einsum(self.eqn, x, self.w[...])


class GemmaRMSNorm(nnx.Module):
  def __init__(self, dim, rngs):
    self.scale = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * (1 + self.scale[...])


def apply_rope(x, positions, base=10_000):
  """Rotary embeddings the way Gemma writes them: frequencies from ``arange(head_dim)``,
  the two halves of the head dims mixed."""
  head_dim = x.shape[-1]
  timescale = base ** (2 * jnp.arange(0, head_dim // 2) / head_dim)
  angles = positions[..., None, None] / timescale
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class GemmaAttention(nnx.Module):
  """Head counts read back from the einsums' shapes, as Flax's NNX Gemma does; the
  logits scaled by a fixed ``query_pre_attn_scalar``, as Gemma does."""

  def __init__(self, num_heads, num_kv_heads, head_dim, rngs, rope=False):
    self.rope = rope
    self.query_pre_attn_scalar = head_dim**-0.5
    self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (num_heads, head_dim, D), rngs)
    if num_heads == num_kv_heads:
      self.qkv_einsum = Einsum("BTD,SNDH->SBTNH", (3, num_heads, D, head_dim), rngs)
    else:
      self.q_einsum = Einsum("BTD,NDH->BTNH", (num_heads, D, head_dim), rngs)
      self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, num_kv_heads, D, head_dim), rngs)

  @property
  def use_qkv_einsum(self):
    return hasattr(self, "qkv_einsum")

  @property
  def head_dim(self):
    return self.attn_vec_einsum.shape[1]

  @property
  def num_heads(self):
    return self.attn_vec_einsum.shape[0]

  @property
  def num_kv_heads(self):
    return self.qkv_einsum.shape[1] if self.use_qkv_einsum else self.kv_einsum.shape[1]

  def __call__(self, x):
    if self.use_qkv_einsum:
      query, key, value = self.qkv_einsum(x)
    else:
      query = self.q_einsum(x)
      key, value = self.kv_einsum(x)
    b, t, kg, h = query.shape
    if self.rope:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      query, key = apply_rope(query, positions), apply_rope(key, positions)
    query = query * self.query_pre_attn_scalar
    mask = causal(t)[None, :, None, :]
    if self.num_kv_heads != self.num_heads:
      query = query.reshape((b, t, self.num_kv_heads, kg // self.num_kv_heads, h))
      logits = jnp.einsum("BTKGH,BSKH->BTKGS", query, key).reshape((b, t, kg, t))
    else:
      logits = jnp.einsum("BTNH,BSNH->BTNS", query, key)
    probs = jax.nn.softmax(jnp.where(mask, logits, -2.3819763e38), axis=-1)
    if self.num_kv_heads != self.num_heads:
      probs = probs.reshape((b, t, self.num_kv_heads, kg // self.num_kv_heads, t))
      encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape((b, t, kg, h))
    else:
      encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, value)
    return self.attn_vec_einsum(encoded)


class GemmaFeedForward(nnx.Module):
  """Gate and up projections stacked on an axis of size 2 (``transpose_gating_einsum``)."""

  def __init__(self, hidden_dim, rngs):
    self.gating_einsum = nnx.Param(jax.random.normal(rngs.params(), (2, hidden_dim, D)))
    self.linear = nnx.Param(jax.random.normal(rngs.params(), (hidden_dim, D)))

  def __call__(self, x):
    gate = jnp.einsum("...F,NHF->...NH", x, self.gating_einsum[...])
    activations = nnx.gelu(gate[..., 0, :]) * gate[..., 1, :]
    return jnp.einsum("...H,HF->...F", activations, self.linear[...])


class Gemma(nnx.Module):
  def __init__(self, rngs, num_heads=4, num_kv_heads=4, head_dim=4, hidden_dim=8, rope=False):
    self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, D)))
    self.pre_attention_norm = GemmaRMSNorm(D, rngs)
    self.attn = GemmaAttention(num_heads, num_kv_heads, head_dim, rngs, rope=rope)
    self.pre_ffw_norm = GemmaRMSNorm(D, rngs)
    self.mlp = GemmaFeedForward(hidden_dim, rngs)
    self.final_norm = GemmaRMSNorm(D, rngs)

  def __call__(self, tokens):
    x = self.input_embedding[...][(tokens,)] * jnp.sqrt(D)
    x = x + self.attn(self.pre_attention_norm(x))
    x = x + self.mlp(self.pre_ffw_norm(x))
    return self.final_norm(x) @ self.input_embedding[...].T


def test_gemma_gated_mlp_is_neurons_and_heads_come_from_the_softmax():
  model = build(Gemma)
  p = surgery.plan(model, example_input=TOKENS)
  kinds = {g.name: (g.kind, g.size) for g in p.groups if not g.blocked}
  hidden = next(g for g in p.groups if ("mlp/linear", 0) in g.members)
  assert (hidden.kind, hidden.size, hidden.blocked) == ("neurons", 8, None)
  assert set(hidden.producers) == {("mlp/gating_einsum", 1)}
  stacked = next(g for g in p.groups if g.producers == (("mlp/gating_einsum", 0),))
  assert stacked.kind == "neurons" and stacked.blocked.startswith("`slice`")
  assert not any(name.startswith("mlp/") and k[0] != "neurons" for name, k in kinds.items())
  # q, k, v stacked in one weight: one group of heads, one of head dims (q.k and v share
  # the weight's head_dim axis)
  assert kinds["attn/heads"] == ("heads", 4) and kinds["attn/head_dim"] == ("head_dim", 4)
  assert "attn/v_head_dim" not in kinds
  heads = p.group("attn/heads")
  assert heads.producers == (("attn/qkv_einsum/w", 1),)
  assert heads.channels[2][("attn/attn_vec_einsum/w", 0)].tolist() == [2]

  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(p, params, {"neurons": 0.25})
  assert not np.asarray(masks["mlp"]["gating_einsum"]).all()
  small = surgery.shrink(model, masks=masks, example_input=TOKENS)
  assert small.model.mlp.gating_einsum.shape == (2, 6, D)
  assert small.model.mlp.linear.shape == (6, D)
  assert small.model.attn.qkv_einsum.w.shape == (3, 4, D, 4)  # heads untouched
  assert_equivalent(model, masks, small)


@pytest.mark.parametrize("remove", ["heads", "head_dim"])
def test_gemma_grouped_query_heads_or_head_dims_update_the_einsum_shapes(remove):
  model = build(lambda rngs: Gemma(rngs, num_heads=4, num_kv_heads=2))
  p = surgery.plan(model, example_input=TOKENS)
  assert p.group("attn/kv_heads").producers == (
    ("attn/kv_einsum/w", 1),
    ("attn/q_einsum/w", 0),
  )
  assert p.group("attn/query_heads").size == 2
  assert p.group("attn/head_dim").size == 4
  params = nnx.state(model, nnx.Param)
  if remove == "heads":
    masks = surgery.channel_masks(p, params, {"heads": 0.5})
    small = surgery.shrink(model, masks=masks, example_input=TOKENS)
    counts, shape = (2, 2, 4), (2, D, 4)
  else:
    masks = surgery.channel_masks(p, params, {"head_dim": 0.25})
    small = surgery.shrink(model, masks=masks, example_input=TOKENS, head_dim=True)
    counts, shape = (4, 2, 3), (4, D, 3)
  attn = small.model.attn
  assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == counts  # read from shapes
  assert attn.q_einsum.shape == attn.q_einsum.w.shape == shape
  assert attn.kv_einsum.shape == attn.kv_einsum.w.shape
  assert small.widths["attn/attn_vec_einsum"]["shape"] == attn.attn_vec_einsum.w.shape
  assert_equivalent(model, masks, small)


def test_gemma_rotary_frequencies_from_arange_block_head_dims_at_plan_time():
  model = build(lambda rngs: Gemma(rngs, num_kv_heads=2, rope=True))
  p = surgery.plan(model, example_input=TOKENS)
  dims = p.group("attn/head_dim")
  assert dims.blocked.startswith("`iota`") and "test_surgery_thirdparty.py:" in dims.blocked
  assert "rotary frequencies" in dims.blocked
  assert p.group("attn/kv_heads").blocked is None  # heads are not touched by rotary
  with pytest.raises(ValueError, match="iota"):
    surgery.shrink(model, remove={"attn/head_dim": [0]}, example_input=TOKENS, head_dim=True)


# MaxText (AI-Hypercomputer/maxtext, layers/linears.py and attentions.py).


class DenseGeneral(nnx.Module):
  """A kernel ``in_features_shape + out_features_shape``; the input is checked against
  ``in_features_shape`` on every call."""

  def __init__(self, in_features_shape, out_features_shape, rngs, axis=-1):
    tup = lambda x: tuple(x) if isinstance(x, tuple | list) else (x,)  # noqa: E731
    self.in_features_shape, self.out_features_shape = (
      tup(in_features_shape),
      tup(out_features_shape),
    )
    self.axis = tup(axis)
    shape = self.in_features_shape + self.out_features_shape
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape))

  def __call__(self, inputs):
    axis = tuple(a % inputs.ndim for a in self.axis)
    for i, a in enumerate(axis):
      if inputs.shape[a] != self.in_features_shape[i]:
        raise ValueError(f"Input dimension {inputs.shape[a]} at axis {a} does not match")
    contract = tuple(range(len(axis)))
    return jax.lax.dot_general(inputs, self.kernel[...], ((axis, contract), ((), ())))


class MaxTextAttention(nnx.Module):
  def __init__(self, num_query_heads, num_kv_heads, head_dim, rngs):
    self.num_query_heads, self.num_kv_heads, self.head_dim = num_query_heads, num_kv_heads, head_dim
    self.query = DenseGeneral(D, (num_query_heads, head_dim), rngs)
    self.key = DenseGeneral(D, (num_kv_heads, head_dim), rngs)
    self.value = DenseGeneral(D, (num_kv_heads, head_dim), rngs)
    self.out = DenseGeneral((num_query_heads, head_dim), D, rngs, axis=(-2, -1))

  def __call__(self, inputs_q, inputs_kv, mask):
    query, key, value = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
    b, t, n, d = query.shape
    n_kv = key.shape[-2]
    query = jnp.reshape(query, (b, t, n_kv, n // n_kv, d))
    attn_weights = jnp.einsum("btkgd,bskd->bkgts", query, key)
    attn_weights = jnp.where(mask[:, None, None], attn_weights, -1e9)
    probs = jax.nn.softmax(attn_weights, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value).reshape(b, t, n, d)
    return self.out(out)


class MaxTextMlp(nnx.Module):
  def __init__(self, intermediate_dim, rngs, fused=False):
    self.fused = fused
    if fused:
      self.wi = DenseGeneral(D, (2, intermediate_dim), rngs)
    else:
      self.wi_0 = DenseGeneral(D, intermediate_dim, rngs)
      self.wi_1 = DenseGeneral(D, intermediate_dim, rngs)
    self.wo = DenseGeneral(intermediate_dim, D, rngs)

  def __call__(self, x):
    if self.fused:
      x = self.wi(x)
      gate, up = x[..., 0, :], x[..., 1, :]
    else:
      gate, up = self.wi_0(x), self.wi_1(x)
    return self.wo(nnx.silu(gate) * up)


class MaxTextDecoderLayer(nnx.Module):
  def __init__(self, rngs, fused=False):
    self.token_embedder = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pre_self_attention_norm = nnx.RMSNorm(D, rngs=rngs)
    self.self_attention = MaxTextAttention(4, 2, 4, rngs)
    self.post_self_attention_norm = nnx.RMSNorm(D, rngs=rngs)
    self.mlp = MaxTextMlp(8, rngs, fused=fused)
    self.logits_dense = DenseGeneral(D, VOCAB, rngs)

  def __call__(self, tokens):
    x = self.token_embedder(tokens)
    t = tokens.shape[1]
    h = self.pre_self_attention_norm(x)
    x = x + self.self_attention(h, h, causal(t)[None])
    x = x + self.mlp(self.post_self_attention_norm(x))
    return self.logits_dense(x)


@pytest.mark.parametrize("fused", [False, True], ids=["wi_0_wi_1", "fused_wi"])
def test_maxtext_heads_neurons_and_head_dims_set_dense_general_shapes(fused):
  model = build(lambda rngs: MaxTextDecoderLayer(rngs, fused=fused))
  p = surgery.plan(model, example_input=TOKENS)
  hidden = next(g for g in p.groups if ("mlp/wo/kernel", 0) in g.members)
  assert (hidden.kind, hidden.size, hidden.blocked) == ("neurons", 8, None)
  assert {g.name: g.kind for g in p.groups if g.name.startswith("self_attention/")} == {
    "self_attention/kv_heads": "heads",
    "self_attention/query_heads": "heads",
    "self_attention/head_dim": "head_dim",
    "self_attention/v_head_dim": "head_dim",
  }
  params = nnx.state(model, nnx.Param)
  spec = {"query_heads": 0.5, "neurons": 0.25, "head_dim": 0.25}
  spec = {f"self_attention/{k}" if "head" in k else k: v for k, v in spec.items()}
  spec["self_attention/v_head_dim"] = 0.25
  masks = surgery.channel_masks(p, params, spec)
  small = surgery.shrink(model, masks=masks, example_input=TOKENS, head_dim=True)
  attn = small.model.self_attention
  assert (attn.num_query_heads, attn.num_kv_heads, attn.head_dim) == (2, 2, 3)
  assert attn.query.out_features_shape == (2, 3) and attn.key.out_features_shape == (2, 3)
  assert attn.out.in_features_shape == (2, 3) and attn.out.kernel.shape == (2, 3, D)
  wo = small.model.mlp.wo
  assert wo.in_features_shape == (6,) and wo.kernel.shape == (6, D)
  if fused:
    assert small.model.mlp.wi.out_features_shape == (2, 6)
  assert small.widths["self_attention/out"] == {"in_features_shape": (2, 3)}
  assert_equivalent(model, masks, small)


# Cross-attention: queries from the decoder, keys and values from an encoder's output.


class CrossAttentionBlock(nnx.Module):
  def __init__(self, rngs):
    self.self_attn = GemmaAttention(4, 4, 4, rngs)
    self.q_einsum = Einsum("BTD,NDH->BTNH", (4, D, 4), rngs)
    self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, 4, D, 4), rngs)
    self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (4, 4, D), rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x, memory):
    x = x + self.self_attn(x)
    key, value = self.kv_einsum(memory)
    logits = jnp.einsum("BTNH,BSNH->BTNS", self.q_einsum(x) * 0.5, key)
    encoded = jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), value)
    return self.head(x + self.attn_vec_einsum(encoded))


def test_cross_attention_heads_at_other_lengths_of_both_inputs():
  model = build(CrossAttentionBlock)
  example = (
    jax.ShapeDtypeStruct((1, 4, D), jnp.float32),
    jax.ShapeDtypeStruct((1, 6, D), jnp.float32),
  )
  p = surgery.plan(model, example_input=example)
  heads = p.group("heads")  # MODULE is the block itself: its own q/kv/out einsums
  assert heads.producers == (("kv_einsum/w", 1), ("q_einsum/w", 0))
  assert p.group("self_attn/heads").size == 4
  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(p, params, {"heads": 0.5})
  small = surgery.shrink(model, masks=masks, example_input=example)
  assert small.model.q_einsum.w.shape == small.model.q_einsum.shape == (2, D, 4)
  assert small.model.self_attn.num_heads == 2

  def inputs(b, t):
    rng = np.random.default_rng(t)
    return tuple(jnp.asarray(rng.normal(size=(b, n, D)), jnp.float32) for n in (t, t + 4))

  assert_equivalent(model, masks, small, inputs)


# Einsum weights named `w` (not `kernel`), a module reading self.head_dim in a reshape.


class EinsumNamedW(nnx.Module):
  def __init__(self, rngs, num_heads=4, head_dim=4):
    self.num_heads, self.head_dim = num_heads, head_dim
    self.wq, self.wk, self.wv = (Einsum("btd,df->btf", (D, 16), rngs) for _ in range(3))
    self.wo = Einsum("btf,fd->btd", (16, D), rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (
      w(x).reshape(b, t, self.num_heads, self.head_dim) for w in (self.wq, self.wk, self.wv)
    )
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * 0.5
    probs = jax.nn.softmax(jnp.where(causal(t), logits, -1e9), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return self.head(x + self.wo(out.reshape(b, t, self.num_heads * self.head_dim)))


def test_head_dims_of_weights_named_w_are_named_by_role_and_set_head_dim():
  model = build(EinsumNamedW)
  x = jax.ShapeDtypeStruct((1, 4, D), jnp.float32)
  p = surgery.plan(model, example_input=x)
  names = {g.name for g in p.groups}
  assert {"heads", "head_dim", "v_head_dim"} <= names
  assert set(p.group("v_head_dim").producers) == {("wv/w", 1)}
  masks = surgery.channel_masks(p, nnx.state(model, nnx.Param), {"head_dim": 0.25})
  small = surgery.shrink(model, masks=masks, example_input=x, head_dim=True)
  assert small.model.head_dim == 3 and small.widths[""]["head_dim"] == 3
  assert small.model.wq.shape == small.model.wq.w.shape == (D, 12)

  def inputs(b, t):
    return (jnp.asarray(np.random.default_rng(t).normal(size=(b, t, D)), jnp.float32),)

  assert_equivalent(model, masks, small, inputs)


# A fused qkv projection, KV heads repeated for their query heads (jnp.repeat).


class FusedQKV(nnx.Module):
  def __init__(self, rngs, num_heads=4, num_kv_heads=2, head_dim=4):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.qkv = nnx.Linear(D, (num_heads + 2 * num_kv_heads) * head_dim, rngs=rngs)
    self.o = nnx.Linear(num_heads * head_dim, D, rngs=rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    n, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
    q, k, v = jnp.split(self.qkv(x), [n * d, (n + kv) * d], axis=-1)
    q = q.reshape(b, t, n, d)
    k, v = (jnp.repeat(y.reshape(b, t, kv, d), n // kv, axis=2) for y in (k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * 0.5
    probs = jax.nn.softmax(jnp.where(causal(t), logits, -1e9), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, n * d)
    return self.head(x + self.o(out))


def test_fused_qkv_with_repeated_kv_heads_names_kv_heads():
  model = build(FusedQKV)
  x = jax.ShapeDtypeStruct((1, 4, D), jnp.float32)
  p = surgery.plan(model, example_input=x)
  kv = p.group("kv_heads")
  assert "heads" not in {g.name for g in p.groups}
  # KV group 1: query heads 2, 3 (features 8..15), key head 1 (20..23), value head 1
  assert kv.channels[1][("qkv/kernel", 1)].tolist() == [
    *range(8, 16),
    *range(20, 24),
    *range(28, 32),
  ]
  masks = surgery.channel_masks(p, nnx.state(model, nnx.Param), {"kv_heads": 0.5})
  small = surgery.shrink(model, masks=masks, example_input=x)
  assert (small.model.num_heads, small.model.num_kv_heads) == (2, 1)
  assert small.model.qkv.out_features == 16

  def inputs(b, t):
    return (jnp.asarray(np.random.default_rng(t).normal(size=(b, t, D)), jnp.float32),)

  assert_equivalent(model, masks, small, inputs)


# nnx.MultiHeadAttention: one head_dim for q, k and v.


class MHA(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(4, D, qkv_features=16, decode=False, rngs=rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(x + self.attn(x, mask=nnx.make_causal_mask(x[..., 0])))


def test_mha_ties_qk_and_value_head_dims():
  model = build(MHA)
  x = jax.ShapeDtypeStruct((1, 4, D), jnp.float32)
  p = surgery.plan(model, example_input=x)
  dims = p.group("attn/head_dim")
  assert "attn/v_head_dim" not in {g.name for g in p.groups}
  assert {m for m, _ in dims.producers} == {
    "attn/query/kernel",
    "attn/key/kernel",
    "attn/value/kernel",
  }
  assert "tied with attn/v_head_dim (nnx.MultiHeadAttention has one head_dim" in str(p)
  small = surgery.shrink(model, remove={"attn/head_dim": [0, 3]}, example_input=x, head_dim=True)
  attn = small.model.attn
  assert attn.head_dim == 2 and attn.value.kernel.shape == (D, 4, 2)
  # remove= zeroes the producers (the biases stay and are folded): the same as masks
  producers = {path for path, _ in dims.producers}
  masks = jax.tree_util.tree_map_with_path(
    lambda path, m: m if tree_lib.path_str(path) in producers else None,
    surgery.group_masks(p, nnx.state(model, nnx.Param), {"attn/head_dim": [0, 3]}),
    is_leaf=lambda m: m is None,
  )

  def inputs(b, t):
    return (jnp.asarray(np.random.default_rng(t).normal(size=(b, t, D)), jnp.float32),)

  assert small.model.attn.qkv_features == 8
  assert_equivalent(model, masks, small, inputs)
