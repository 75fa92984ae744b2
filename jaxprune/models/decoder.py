"""A pre-norm decoder-only transformer language model (NNX) with the Llama family's layout.

:class:`Decoder` maps token ids ``(batch, length)`` to next-token logits ``(batch,
length, vocab)``: token embeddings (``embed``), ``depth`` :class:`Block` s (RMSNorm ->
causal grouped-query attention with rotary positions -> residual; RMSNorm -> gated MLP
-> residual), a final RMSNorm (``norm``) and a ``head`` (absent with tied embeddings:
the logits are then ``x @ embed.embedding.T``). Every projection is its own
``nnx.Linear`` (``[in, out]`` kernels): ``attn/q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` and ``mlp/gate_proj``, ``up_proj``, ``down_proj`` in each ``blocks/i``, so
post-training pruning finds them by path and surgery can rebuild a smaller model from
its widths: head counts, ``head_dim`` and the MLP width are constructor arguments, per
block when given as sequences.

The options cover the Hugging Face families :mod:`jaxprune.models.hf` reads: Llama
(``rope_scaling`` of Llama 3), Mistral (``sliding_window``: a position attends to the
last ``W`` positions, itself included), Qwen2 (``qkv_bias``) and Qwen3 (``qk_norm``: an
RMSNorm over each query and key head before the rotation). With the defaults it is the
``charlm`` of the training recipes (:data:`CharLM`).

Grouped-query attention: ``num_heads`` query heads share ``num_kv_heads`` key/value
heads; query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (the
query heads of one KV group are consecutive, as in LLaMA's ``repeat_kv``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.posttrain.blockwise import Stack


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling: ``"linear"`` (frequencies / factor) or ``"llama3"``.

  Llama 3 (``rope_type: llama3``) divides the low frequencies (wavelength above
  ``original_max_position_embeddings / low_freq_factor``) by ``factor``, keeps the high
  ones (wavelength below ``... / high_freq_factor``) and interpolates in between.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"RopeScaling.kind must be 'linear' or 'llama3', got {self.kind!r}.")
    if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
        f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > "
        f"low_freq_factor ({self.low_freq_factor})."
      )


def inverse_frequencies(
  head_dim: int, base: float = 10_000.0, scaling: RopeScaling | None = None
) -> jax.Array:
  """The ``head_dim // 2`` rotary frequencies ``base^(-2i/d)``, scaled as ``scaling`` says."""
  half = head_dim // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return freqs
  if scaling.kind == "linear":
    return freqs / scaling.factor
  old = scaling.original_max_position_embeddings
  low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
  wavelen = 2 * math.pi / freqs
  scaled = jnp.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
  smooth = (old / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rotary(x: jax.Array, base: float = 10_000.0, scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary position embedding of ``(batch, length, heads, head_dim)`` (halves rotated).

  Position ``t`` rotates the pair ``(x_i, x_{i + d/2})`` by ``t * base^(-2i/d)`` (the
  frequencies scaled by ``scaling``, :class:`RopeScaling`).

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 1, 4))
    >>> bool(jnp.allclose(rotary(x)[0, 0], x[0, 0]))  # position 0 is not rotated
    True
  """
  length, dim = x.shape[1], x.shape[-1]
  if dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {dim}.")
  half = dim // 2
  freqs = inverse_frequencies(dim, base, scaling)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query heads and rotary positions.

  Args:
    dim, num_heads, num_kv_heads, head_dim: the widths.
    qkv_bias: biases on the q/k/v projections (Qwen2); ``o_bias`` on the output one.
    qk_norm: an RMSNorm (``q_norm``, ``k_norm``, over ``head_dim``) on every query and
      key head before the rotation (Qwen3).
    norm_eps: the epsilon of those norms.
    rope_theta, rope_scaling: the rotary base and scaling (:func:`rotary`).
    sliding_window: attend to the last ``sliding_window`` positions only (Mistral).

  Examples:
    >>> from flax import nnx
    >>> attn = nnx.eval_shape(lambda: Attention(64, 4, 2, 16, rngs=nnx.Rngs(0)))
    >>> attn.q_proj.kernel.shape, attn.k_proj.kernel.shape, attn.o_proj.kernel.shape
    ((64, 64), (64, 32), (64, 64))
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
    norm_eps: float = 1e-6,
    rope_theta: float = 10_000.0,
    rope_scaling: RopeScaling | None = None,
    sliding_window: int | None = None,
    rngs: nnx.Rngs,
  ):
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(
        f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
        f"({num_kv_heads}): each KV head serves the same number of query heads."
      )
    if sliding_window is not None and sliding_window < 1:
      raise ValueError(f"sliding_window must be a positive length or None, got {sliding_window}.")

    def linear(i: int, o: int, bias: bool) -> nnx.Linear:
      return nnx.Linear(i, o, use_bias=bias, rngs=rngs)

    self.q_proj = linear(dim, num_heads * head_dim, qkv_bias)
    self.k_proj = linear(dim, num_kv_heads * head_dim, qkv_bias)
    self.v_proj = linear(dim, num_kv_heads * head_dim, qkv_bias)
    self.o_proj = linear(num_heads * head_dim, dim, o_bias)
    if qk_norm:
      self.q_norm = nnx.RMSNorm(head_dim, epsilon=norm_eps, rngs=rngs)
      self.k_norm = nnx.RMSNorm(head_dim, epsilon=norm_eps, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.qk_norm, self.rope_theta, self.rope_scaling = qk_norm, rope_theta, rope_scaling
    self.sliding_window = sliding_window

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_proj(x).reshape(b, t, h, d)
    k = self.k_proj(x).reshape(b, t, kv, d)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rotary(q, self.rope_theta, self.rope_scaling).reshape(b, t, kv, h // kv, d)
    k = rotary(k, self.rope_theta, self.rope_scaling)
    v = self.v_proj(x).reshape(b, t, kv, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(d)
    allowed = jnp.tril(jnp.ones((t, t), bool))
    if self.sliding_window is not None:
      allowed &= jnp.triu(jnp.ones((t, t), bool), 1 - self.sliding_window)
    logits = jnp.where(allowed, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, t, h * d)
    return self.o_proj(out)


class MLP(nnx.Module):
  """The gated MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (SwiGLU)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.gate_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))`` (pre-norm, RMSNorm).

  ``**attention`` goes to :class:`Attention` (biases, q/k norms, rotary, window).
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    *,
    norm_eps: float = 1e-6,
    rngs: nnx.Rngs,
    **attention: Any,
  ):
    self.attn_norm = nnx.RMSNorm(dim, epsilon=norm_eps, rngs=rngs)
    self.attn = Attention(
      dim, num_heads, num_kv_heads, head_dim, norm_eps=norm_eps, rngs=rngs, **attention
    )
    self.mlp_norm = nnx.RMSNorm(dim, epsilon=norm_eps, rngs=rngs)
    self.mlp = MLP(dim, mlp_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


def _per_block(value: int | Sequence[int], depth: int, name: str) -> list[int]:
  values = [value] * depth if isinstance(value, int) else list(value)
  if len(values) != depth or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
    raise ValueError(f"{name} must be an int or {depth} ints (one per block), got {value!r}.")
  return values


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Everything that defines a :class:`Decoder`'s architecture (its constructor's arguments).

  Widths (``num_heads``, ``num_kv_heads``, ``mlp_dim``) are an int or a tuple with one
  per block (a structurally pruned model). :meth:`make` builds the model;
  :func:`config_of` reads the config back from a model's actual shapes.

  Examples:
    >>> from flax import nnx
    >>> config = DecoderConfig(50, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
    ...                        qk_norm=True, tie_embeddings=True)
    >>> model = nnx.eval_shape(lambda: config.make(nnx.Rngs(0)))
    >>> config_of(model) == config
    True
  """

  vocab_size: int
  dim: int = 128
  depth: int = 4
  num_heads: int | tuple[int, ...] = 4
  num_kv_heads: int | tuple[int, ...] = 2
  head_dim: int | None = None
  mlp_dim: int | tuple[int, ...] = 384
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  tie_embeddings: bool = False

  def make(self, rngs: nnx.Rngs) -> Decoder:
    """The :class:`Decoder` of this config (random parameters from ``rngs``)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return Decoder(fields.pop("vocab_size"), **fields, rngs=rngs)


class Decoder(nnx.Module):
  """A pre-norm decoder-only language model: ids ``(B, T)`` -> logits ``(B, T, vocab)``.

  Args:
    vocab_size: the number of token ids.
    dim: the residual stream's width (``d_model``).
    depth: the number of blocks.
    num_heads: query heads, an int or one per block.
    num_kv_heads: key/value heads (divides ``num_heads``), an int or one per block.
    head_dim: the width of a head (default ``dim // num_heads``; even, for rotary).
    mlp_dim: the gated MLP's hidden width, an int or one per block.
    norm_eps: the RMSNorms' epsilon.
    rope_theta, rope_scaling: the rotary base and frequency scaling (:class:`RopeScaling`).
    qkv_bias, o_bias: biases on the q/k/v and on the output projections.
    qk_norm: RMSNorm on each query and key head (Qwen3).
    sliding_window: attend to the last ``sliding_window`` positions only (Mistral).
    tie_embeddings: no ``head``; the logits use the embedding matrix.
    rngs: the parameter RNGs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = Decoder(16, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
    ...                 rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((3, 10), jnp.int32)).shape
    (3, 10, 16)
    >>> model.blocks[0].attn.k_proj.kernel.shape  # 2 KV heads of 8
    (32, 16)
  """

  def __init__(
    self,
    vocab_size: int,
    *,
    dim: int = 128,
    depth: int = 4,
    num_heads: int | Sequence[int] = 4,
    num_kv_heads: int | Sequence[int] = 2,
    head_dim: int | None = None,
    mlp_dim: int | Sequence[int] = 384,
    norm_eps: float = 1e-6,
    rope_theta: float = 10_000.0,
    rope_scaling: RopeScaling | None = None,
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
    sliding_window: int | None = None,
    tie_embeddings: bool = False,
    rngs: nnx.Rngs,
  ):
    heads = _per_block(num_heads, depth, "num_heads")
    kv_heads = _per_block(num_kv_heads, depth, "num_kv_heads")
    hidden = _per_block(mlp_dim, depth, "mlp_dim")
    if head_dim is None:
      if dim % heads[0]:
        raise ValueError(f"dim ({dim}) must divide by num_heads ({heads[0]}), or give head_dim.")
      head_dim = dim // heads[0]
    attention = {
      "qkv_bias": qkv_bias,
      "o_bias": o_bias,
      "qk_norm": qk_norm,
      "rope_theta": rope_theta,
      "rope_scaling": rope_scaling,
      "sliding_window": sliding_window,
    }
    self.embed = nnx.Embed(vocab_size, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List(
      [
        Block(dim, h, kv, head_dim, m, norm_eps=norm_eps, rngs=rngs, **attention)
        for h, kv, m in zip(heads, kv_heads, hidden)
      ]
    )
    self.norm = nnx.RMSNorm(dim, epsilon=norm_eps, rngs=rngs)
    if not tie_embeddings:
      self.head = nnx.Linear(dim, vocab_size, use_bias=False, rngs=rngs)
    self.vocab_size, self.dim, self.head_dim = vocab_size, dim, head_dim
    self.norm_eps, self.tie_embeddings = norm_eps, tie_embeddings

  def logits(self, x: jax.Array) -> jax.Array:
    """The last hidden states ``(B, T, dim)`` -> logits: final norm, then head or tied embedding."""
    x = self.norm(x)
    return self.embed.attend(x) if self.tie_embeddings else self.head(x)

  def stack(self) -> Stack:
    """Its forward pass as embed -> blocks -> :meth:`logits`, for one-pass-per-block
    post-training pruning (``posttrain.prune(model, stack=True)``; tied embeddings
    included)."""
    return Stack(self.embed, list(self.blocks), self.logits)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.logits(x)


CharLM = Decoder  # the training recipes' ``charlm``: a Decoder with the default options


def _uniform(values: list[int]) -> int | tuple[int, ...]:
  return values[0] if len(set(values)) == 1 else tuple(values)


def config_of(model: Decoder) -> DecoderConfig:
  """The :class:`DecoderConfig` of a model as it is now: widths read from its param shapes.

  Reads the shapes, not the constructor's arguments, so it stays right after surgery
  sliced heads or neurons out of a block or blocks were dropped from ``model.blocks``.

  Raises:
    ValueError: no blocks, or blocks that disagree on ``head_dim`` or on an option.
  """
  blocks = list(model.blocks)
  if not blocks:
    raise ValueError("config_of: the model has no blocks.")
  attn = [b.attn for b in blocks]
  head_dims = {a.head_dim for a in attn}
  options = {
    (
      a.qk_norm,
      a.rope_theta,
      a.rope_scaling,
      a.sliding_window,
      a.q_proj.use_bias,
      a.o_proj.use_bias,
    )
    for a in attn
  }
  if len(head_dims) > 1 or len(options) > 1:
    raise ValueError(
      f"config_of: the blocks differ in head_dim ({sorted(head_dims)}) or in their attention "
      "options; a DecoderConfig has one of each."
    )
  qk_norm, theta, scaling, window, qkv_bias, o_bias = options.pop()
  head_dim = head_dims.pop()
  heads = [int(np.shape(a.q_proj.kernel)[1]) // head_dim for a in attn]
  kv_heads = [int(np.shape(a.k_proj.kernel)[1]) // head_dim for a in attn]
  hidden = [int(np.shape(b.mlp.up_proj.kernel)[1]) for b in blocks]
  vocab, dim = (int(n) for n in np.shape(model.embed.embedding))
  return DecoderConfig(
    vocab,
    dim=dim,
    depth=len(blocks),
    num_heads=_uniform(heads),
    num_kv_heads=_uniform(kv_heads),
    head_dim=None if dim == heads[0] * head_dim else head_dim,
    mlp_dim=_uniform(hidden),
    norm_eps=model.norm_eps,
    rope_theta=theta,
    rope_scaling=scaling,
    qkv_bias=qkv_bias,
    o_bias=o_bias,
    qk_norm=qk_norm,
    sliding_window=window,
    tie_embeddings=model.tie_embeddings,
  )
