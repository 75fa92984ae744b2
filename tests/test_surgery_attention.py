"""Transformer surgery: heads, grouped-query heads, head dims and (gated) MLP neurons.

Shrunk == masked within 1e-5 (relative to the output scale) at two sequence
lengths, against a reference computed here: the user's masks applied with ``jnp.where``
to the original params and the original model run. Models are filled with numpy random
values (non-zero biases, so removed channels emit constants).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from jaxprune import surgery
from jaxprune import tree as tree_lib

LENGTHS = (3, 8)  # and shrink checks its own traced and grown lengths


def build(make, seed=0):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if name == "kernel":
      value = rng.normal(size=x.shape) / np.sqrt(x.shape[0])
    elif name == "scale":
      value = rng.uniform(0.5, 2.0, size=x.shape)
    else:
      value = 0.5 * rng.normal(size=x.shape) + 0.3
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def where(masks, tree):
  return jax.tree.map(
    lambda m, x: x if m is None else jnp.where(m, x, 0), masks, tree, is_leaf=lambda m: m is None
  )


@nnx.jit
def forward(model, x):
  """One compile per model and input shape (eager, each op of the model compiles per shape)."""
  return model(x)


@functools.partial(jax.jit, static_argnums=0)
def apply(module, variables, x):
  """A Linen module's forward: one compile per module and input shape."""
  return module.apply(variables, x)


def reference(model, masks, x):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return forward(nnx.merge(graphdef, where(masks, params), rest), x)


def assert_equivalent(model, masks, small, d_in):
  for t in LENGTHS:
    x = jnp.asarray(np.random.default_rng(t).normal(size=(2, t, d_in)), jnp.float32)
    ref, out = np.asarray(reference(model, masks, x)), np.asarray(forward(small.model, x))
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ref - out).max())
    assert err <= 1e-5 * scale, f"length {t}: max error {err:.3g} (scale {scale:.3g})"


def n_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def example(d_in, t=4):
  return jax.ShapeDtypeStruct((1, t, d_in), jnp.float32)


# nnx.MultiHeadAttention in a pre-LayerNorm block with an MLP.


class MHABlock(nnx.Module):
  def __init__(self, rngs, num_heads=4, num_kv_heads=None):
    self.embed = nnx.Linear(6, 16, rngs=rngs)
    self.ln1 = nnx.LayerNorm(16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      in_features=16,
      qkv_features=32,
      decode=False,
      rngs=rngs,
    )
    self.ln2 = nnx.LayerNorm(16, rngs=rngs)
    self.up = nnx.Linear(16, 24, rngs=rngs)
    self.down = nnx.Linear(24, 16, rngs=rngs)
    self.head = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    h = h + self.attn(self.ln1(h), mask=nnx.make_causal_mask(x[..., 0]))
    h = h + self.down(nnx.gelu(self.up(self.ln2(h))))
    return self.head(h)


def test_plan_shows_heads_as_heads_with_unique_names():
  p = surgery.plan(build(MHABlock), example_input=example(6))
  names = [g.name for g in p.groups]
  assert len(names) == len(set(names))
  kinds = {g.name: (g.kind, g.size, g.blocked) for g in p.groups}
  assert kinds["attn/heads"] == ("heads", 4, None)
  assert kinds["attn/head_dim"] == ("head_dim", 8, None)
  assert "attn/v_head_dim" not in kinds  # one head_dim for q, k and v: tied
  assert kinds["up/kernel"] == ("neurons", 24, None)
  heads = p.group("attn/heads")
  assert set(heads.producers) == {
    ("attn/query/kernel", 1),
    ("attn/key/kernel", 1),
    ("attn/value/kernel", 1),
  }
  assert ("attn/out/kernel", 0) in heads.members
  text = str(p)
  assert "attn/heads (4 heads, prunable)" in text
  assert "attn/head_dim (8 head dims, removed only when asked" in text
  stream = next(g for g in p.groups if ("embed/kernel", 1) in g.members)
  assert "LayerNorm/RMSNorm" in stream.blocked


def test_names_are_stable_across_traces_and_sequence_lengths():
  model = build(MHABlock)
  a = [(g.name, g.members) for g in surgery.plan(model, example_input=example(6, 4)).groups]
  b = [(g.name, g.members) for g in surgery.plan(model, example_input=example(6, 7)).groups]
  assert a == b


def test_mha_heads_and_neurons_shrink_to_an_ordinary_module():
  model = build(MHABlock)
  p = surgery.plan(model, example_input=example(6))
  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(p, params, {"heads": 0.5, "neurons": 0.25})
  small = surgery.shrink(model, masks=masks, example_input=example(6))
  assert small.removed["attn/heads"] and len(small.removed["attn/heads"]) == 2
  assert len(small.removed["up/kernel"]) == 6
  assert "attn/head_dim" not in small.removed  # only when asked
  att = small.model.attn
  assert (att.num_heads, att.num_kv_heads, att.head_dim, att.qkv_features) == (2, 2, 8, 16)
  assert att.query.out_features == (2, 8) and att.out.in_features == (2, 8)
  assert small.widths["attn"]["num_heads"] == 2
  assert small.model.up.out_features == 18
  assert_equivalent(model, masks, small, 6)
  assert n_params(small.model) < n_params(model)


def test_mha_head_dim_only_when_asked():
  model = build(MHABlock)
  p = surgery.plan(model, example_input=example(6))
  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(p, params, {"head_dim": 0.25})
  kept = surgery.shrink(model, masks=masks, example_input=example(6), verify=False)
  assert not kept.removed
  small = surgery.shrink(model, masks=masks, example_input=example(6), head_dim=True)
  att = small.model.attn
  assert att.head_dim == 6 and att.query.kernel.shape == (16, 4, 6)
  assert att.key.out_features == (4, 6) and att.value.out_features == (4, 6)
  assert att.out.in_features == (4, 6)
  assert_equivalent(model, masks, small, 6)


def test_mha_grouped_query_attention_whole_kv_groups_or_query_heads_per_group():
  model = build(lambda rngs: MHABlock(rngs, num_heads=8, num_kv_heads=2))
  p = surgery.plan(model, example_input=example(6))
  kv, per = p.group("attn/kv_heads"), p.group("attn/query_heads")
  assert (kv.size, per.size) == (2, 4)
  # a KV group: its key/value head and its 4 query heads (8..15 of the query kernel)
  assert kv.channels[1][("attn/key/kernel", 1)].tolist() == [1]
  assert kv.channels[1][("attn/query/kernel", 1)].tolist() == [4, 5, 6, 7]
  assert per.channels[1][("attn/query/kernel", 1)].tolist() == [1, 5]
  params = nnx.state(model, nnx.Param)
  for remove, heads in (({"attn/kv_heads": 0.5}, (4, 1)), ({"attn/query_heads": 0.5}, (4, 2))):
    masks = surgery.channel_masks(p, params, remove)
    small = surgery.shrink(model, masks=masks, example_input=example(6))
    att = small.model.attn
    assert (att.num_heads, att.num_kv_heads) == heads
    assert att.num_heads % att.num_kv_heads == 0
    assert_equivalent(model, masks, small, 6)
    rebuilt = nnx.MultiHeadAttention(
      **{k: small.widths["attn"][k] for k in ("num_heads", "num_kv_heads", "in_features")},
      qkv_features=small.widths["attn"]["qkv_features"],
      decode=False,
      rngs=nnx.Rngs(0),
    )
    assert jax.tree.map(jnp.shape, nnx.state(rebuilt, nnx.Param)) == jax.tree.map(
      jnp.shape, nnx.state(att, nnx.Param)
    )


# Hand-written attention: q/k/v/o Linear, reshape into heads, einsum; grouped-query.


class HandGQA(nnx.Module):
  """8 query heads share 2 KV heads (head_dim 4): k and v have 8 features, q 32, so a
  head view of k built from the query head count would divide (Torch-Pruning #516)."""

  def __init__(self, rngs, num_heads=8, num_kv_heads=2, head_dim=4, repeat=False):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.repeat = repeat
    self.scale = 0.5  # fixed 1/sqrt(head_dim): the logits do not depend on the shapes
    self.embed = nnx.Linear(6, 12, rngs=rngs)
    self.q = nnx.Linear(12, num_heads * head_dim, rngs=rngs)
    self.k = nnx.Linear(12, num_kv_heads * head_dim, rngs=rngs)
    self.v = nnx.Linear(12, num_kv_heads * head_dim, rngs=rngs)
    self.o = nnx.Linear(num_heads * head_dim, 12, rngs=rngs)
    self.head = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    h = self.embed(x)
    k = self.k(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    if self.repeat:
      group = self.num_heads // self.num_kv_heads
      q = self.q(h).reshape(b, t, self.num_heads, self.head_dim)
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      logits = jnp.einsum("bthd,bshd->bhts", q, k) * self.scale
      w = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
      out = jnp.einsum("bhts,bshd->bthd", w, v)
    else:
      group = self.num_heads // self.num_kv_heads
      q = self.q(h).reshape(b, t, self.num_kv_heads, group, self.head_dim)
      logits = jnp.einsum("btkgd,bskd->bkgts", q, k) * self.scale
      w = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
      out = jnp.einsum("bkgts,bskd->btkgd", w, v)
    h = h + self.o(out.reshape(b, t, -1))
    return self.head(h)


def test_hand_written_gqa_groups_are_traced_not_guessed():
  model = build(HandGQA)
  p = surgery.plan(model, example_input=example(6))
  kv, per = p.group("kv_heads"), p.group("query_heads")
  assert (kv.size, per.size) == (2, 4)
  assert kv.channels[1][("k/kernel", 1)].tolist() == [4, 5, 6, 7]  # KV head 1, not query head 1
  assert kv.channels[1][("q/kernel", 1)].tolist() == list(range(16, 32))
  assert kv.channels[1][("o/kernel", 0)].tolist() == list(range(16, 32))
  assert per.channels[1][("q/kernel", 1)].tolist() == [4, 5, 6, 7, 20, 21, 22, 23]
  assert p.group("head_dim").channels[0][("k/kernel", 1)].tolist() == [0, 4]
  assert p.group("v_head_dim").channels[0][("o/kernel", 0)].tolist() == list(range(0, 32, 4))


@pytest.mark.parametrize(
  "remove, counts",
  [({"kv_heads": [0]}, (4, 1, 4)), ({"query_heads": [1, 3]}, (4, 2, 4))],
  ids=["whole_kv_group", "query_heads_of_every_group"],
)
def test_hand_written_gqa_shrinks_and_updates_head_counts(remove, counts):
  model = build(HandGQA)
  p = surgery.plan(model, example_input=example(6))
  masks = surgery.group_masks(p, nnx.state(model, nnx.Param), remove)
  small = surgery.shrink(model, masks=masks, example_input=example(6))
  m = small.model
  assert (m.num_heads, m.num_kv_heads, m.head_dim) == counts  # not stale (Torch-Pruning #461)
  assert small.widths[""]["num_heads"] == counts[0]
  assert m.q.out_features == counts[0] * 4 and m.k.out_features == counts[1] * 4
  assert_equivalent(model, masks, small, 6)


def test_hand_written_gqa_with_repeated_kv_heads_removes_whole_groups():
  model = build(lambda rngs: HandGQA(rngs, repeat=True))
  p = surgery.plan(model, example_input=example(6))
  heads = [g for g in p.groups if g.kind == "heads"]
  assert [g.name for g in heads] == ["kv_heads"]
  assert heads[0].channels[0][("q/kernel", 1)].tolist() == list(range(16))
  masks = surgery.group_masks(p, nnx.state(model, nnx.Param), {"kv_heads": [1]})
  small = surgery.shrink(model, masks=masks, example_input=example(6))
  assert (small.model.num_heads, small.model.num_kv_heads) == (4, 1)
  assert_equivalent(model, masks, small, 6)


def test_hand_written_head_dim_when_asked():
  model = build(HandGQA)
  p = surgery.plan(model, example_input=example(6))
  # the module reshapes k and v by one head_dim: both lose a dim
  remove = {"head_dim": [3], "v_head_dim": [1]}
  masks = surgery.group_masks(p, nnx.state(model, nnx.Param), remove)
  small = surgery.shrink(model, masks=masks, example_input=example(6), head_dim=True)
  assert small.model.head_dim == 3 and small.model.k.out_features == 6
  assert small.stayed == {}  # the heads are not "partly pruned": the dims went
  assert_equivalent(model, masks, small, 6)


# Gated MLP: the gate column goes with the up column and the down row.


class GatedMLP(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.RMSNorm(8, rngs=rngs)
    self.gate = nnx.Linear(8, 16, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    u = self.norm(h)
    h = h + self.down(nnx.silu(self.gate(u)) * self.up(u))
    return self.head(h)


def test_gated_mlp_neurons_fold_their_constant_into_the_down_bias():
  model = build(GatedMLP)
  p = surgery.plan(model, example_input=example(6))
  hidden = p.group("gate/kernel")
  assert hidden.kind == "neurons" and set(hidden.producers) == {
    ("gate/kernel", 1),
    ("up/kernel", 1),
  }
  assert ("down/kernel", 0) in hidden.members
  stream = next(g for g in p.groups if ("embed/kernel", 1) in g.members)
  assert "statistic over the channel axis" in stream.blocked
  # kernels' columns zero, biases kept: each removed neuron emits silu(b_gate) * b_up
  params = nnx.state(model, nnx.Param)
  cols = np.ones((8, 16), bool)
  cols[:, [0, 3, 5, 9]] = False
  masks = jax.tree.map(lambda x: None, params)
  masks["gate"]["kernel"] = jnp.asarray(cols)
  masks["up"]["kernel"] = jnp.asarray(cols)
  small = surgery.shrink(model, masks=masks, example_input=example(6))
  assert small.removed["gate/kernel"] == [0, 3, 5, 9] and not small.kept_constant
  assert small.model.gate.out_features == 12 and small.model.down.in_features == 12
  assert not np.allclose(small.model.down.bias[...], model.down.bias[...])
  assert_equivalent(model, masks, small, 6)


# What stays unsupported says which op and where.


class Rotary(HandGQA):
  def __call__(self, x):
    b, t, _ = x.shape
    q = self.q(self.embed(x)).reshape(b, t, self.num_heads, self.head_dim)
    half = self.head_dim // 2
    rotated = jnp.concatenate([-q[..., half:], q[..., :half]], axis=-1)  # rotate_half
    return self.head(self.o((q + rotated).reshape(b, t, -1)))


def test_rotary_style_slicing_of_head_dims_blocks_them_with_the_op_and_line():
  p = surgery.plan(build(Rotary), example_input=example(6))
  dims = next(g for g in p.groups if ("q/kernel", 1) in g.members and g.size == 4)
  assert dims.blocked.startswith("`slice`") and "test_surgery_attention.py:" in dims.blocked
  with pytest.raises(ValueError, match="slice"):
    surgery.shrink(build(Rotary), remove={dims.name: [0]}, example_input=example(6))


# The zoo's language model: rotary GQA attention, gated MLP, RMSNorm.


def test_zoo_charlm_heads_and_neurons_shrink_and_rebuild_from_widths():
  from jaxprune.models.decoder import CharLM

  def make(rngs):
    return CharLM(11, dim=16, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=24, rngs=rngs)

  model = build(make)
  tokens = jax.ShapeDtypeStruct((1, 5), jnp.int32)
  p = surgery.plan(model, example_input=tokens)
  assert p.group("blocks/0/attn/query_heads").size == 2
  assert p.group("blocks/1/attn/kv_heads").size == 2
  assert p.group("blocks/0/attn/q_proj/head_dim").blocked.startswith("`slice`")  # rotary
  assert "decoder.py:" in p.group("blocks/0/attn/q_proj/head_dim").blocked
  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(p, params, {"heads": 0.5, "neurons": 0.25})
  small = surgery.shrink(model, masks=masks, example_input=tokens)
  for i in range(2):
    attn = small.model.blocks[i].attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 2, 4)  # 1 per KV group
    assert small.model.blocks[i].mlp.up_proj.out_features == 18
  for t in LENGTHS:
    x = jnp.asarray(np.random.default_rng(t).integers(0, 11, size=(2, t)), jnp.int32)
    ref, out = np.asarray(reference(model, masks, x)), np.asarray(forward(small.model, x))
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(ref - out).max()) <= 1e-5 * scale, t
  w = small.widths
  blocks = [f"blocks/{i}" for i in range(2)]
  rebuilt = nnx.eval_shape(
    lambda: CharLM(
      11,
      dim=16,
      depth=2,
      num_heads=[w[f"{b}/attn"]["num_heads"] for b in blocks],
      num_kv_heads=[w[f"{b}/attn"].get("num_kv_heads", 2) for b in blocks],
      mlp_dim=[w[f"{b}/mlp/up_proj"]["out_features"] for b in blocks],
      head_dim=4,
      rngs=nnx.Rngs(0),
    )
  )
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m, nnx.Param))  # noqa: E731
  assert shapes(rebuilt) == shapes(small.model)


# A hand-written Linen block: q/k/v/o nn.Dense, heads split by a reshape to (-1, head_dim).


class LinenAttention(linen.Module):
  head_dim: int = 4

  @linen.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = linen.Dense(16, name="embed")(x)
    y = linen.LayerNorm(name="ln1")(h)
    q, k, v = (linen.Dense(32, name=n)(y).reshape(b, t, -1, self.head_dim) for n in "qkv")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, -1)
    h = h + linen.Dense(16, name="o")(out)
    z = linen.gelu(linen.Dense(24, name="up")(linen.LayerNorm(name="ln2")(h)))
    h = h + linen.Dense(16, name="down")(z)
    return linen.Dense(5, name="head")(h)


def test_linen_hand_written_attention_heads_and_neurons_shrunk_equals_masked():
  net = LinenAttention()
  variables = net.init(jax.random.key(0), jnp.ones((1, 4, 6)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype), variables
  )
  p = surgery.plan(net, variables, example_input=example(6))
  assert p.group("params/heads").size == 8 and p.group("params/heads").blocked is None
  # the line is the model's einsum, not opt_einsum's (where jnp.einsum raises)
  assert "at test_surgery_attention.py:" in str(p.group("params/v_head_dim").blocked)
  masks = surgery.channel_masks(p, variables["params"], {"heads": 0.5, "neurons": 0.25})
  small = surgery.shrink(net, variables, masks, example_input=example(6))
  assert {n: small.widths[n]["features"] for n in ("q", "k", "v", "up")} == {
    "q": 16,
    "k": 16,
    "v": 16,
    "up": 18,
  }
  assert small.variables["params"]["o"]["kernel"].shape == (16, 16)
  masked = {**variables, "params": where(masks, variables["params"])}
  for t in LENGTHS:
    x = jnp.asarray(np.random.default_rng(t).normal(size=(2, t, 6)), jnp.float32)
    ref, out = np.asarray(apply(net, masked, x)), np.asarray(apply(small.model, small.variables, x))
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(ref - out).max()) <= 1e-5 * scale, t
