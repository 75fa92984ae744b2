"""A pre-norm decoder-only transformer language model (NNX), written out layer by layer.

:class:`CharLM` maps token ids ``(batch, length)`` to next-token logits ``(batch,
length, vocab)``: token embeddings (``embed``), ``depth`` :class:`Block` s (RMSNorm ->
causal grouped-query attention with rotary positions -> residual; RMSNorm -> gated MLP
-> residual), a final RMSNorm (``norm``) and an untied ``head``. Every projection is its
own bias-free ``nnx.Linear`` (``[in, out]`` kernels): ``attn/q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` and ``mlp/gate_proj``, ``up_proj``, ``down_proj`` in each
``blocks/i``, so post-training pruning finds them by path and surgery can rebuild a
smaller model from its widths: head counts, ``head_dim`` and the MLP width are
constructor arguments, per block when given as sequences.

Grouped-query attention: ``num_heads`` query heads share ``num_kv_heads`` key/value
heads; query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (the
query heads of one KV group are consecutive, as in LLaMA's ``repeat_kv``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def rotary(x: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding of ``(batch, length, heads, head_dim)`` (halves rotated).

  Position ``t`` rotates the pair ``(x_i, x_{i + d/2})`` by ``t * base^(-2i/d)``.

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
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query heads and rotary positions.

  Examples:
    >>> from flax import nnx
    >>> attn = nnx.eval_shape(lambda: Attention(64, 4, 2, 16, rngs=nnx.Rngs(0)))
    >>> attn.q_proj.kernel.shape, attn.k_proj.kernel.shape, attn.o_proj.kernel.shape
    ((64, 64), (64, 32), (64, 64))
  """

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rngs: nnx.Rngs):
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(
        f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
        f"({num_kv_heads}): each KV head serves the same number of query heads."
      )
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)  # noqa: E731
    self.q_proj = linear(dim, num_heads * head_dim)
    self.k_proj = linear(dim, num_kv_heads * head_dim)
    self.v_proj = linear(dim, num_kv_heads * head_dim)
    self.o_proj = linear(num_heads * head_dim, dim)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
    q = rotary(self.q_proj(x).reshape(b, t, h, d)).reshape(b, t, kv, h // kv, d)
    k = rotary(self.k_proj(x).reshape(b, t, kv, d))
    v = self.v_proj(x).reshape(b, t, kv, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
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
  """``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))`` (pre-norm, RMSNorm)."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    *,
    rngs: nnx.Rngs,
  ):
    self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.attn = Attention(dim, num_heads, num_kv_heads, head_dim, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.mlp = MLP(dim, mlp_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


def _per_block(value: int | Sequence[int], depth: int, name: str) -> list[int]:
  values = [value] * depth if isinstance(value, int) else list(value)
  if len(values) != depth or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
    raise ValueError(f"{name} must be an int or {depth} ints (one per block), got {value!r}.")
  return values


class CharLM(nnx.Module):
  """A pre-norm decoder-only language model: ids ``(B, T)`` -> logits ``(B, T, vocab)``.

  Args:
    vocab_size: the number of token ids.
    dim: the residual stream's width (``d_model``).
    depth: the number of blocks.
    num_heads: query heads, an int or one per block.
    num_kv_heads: key/value heads (divides ``num_heads``), an int or one per block.
    head_dim: the width of a head (default ``dim // num_heads``; even, for rotary).
    mlp_dim: the gated MLP's hidden width, an int or one per block.
    rngs: the parameter RNGs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = CharLM(16, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
    ...                rngs=nnx.Rngs(0))
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
    rngs: nnx.Rngs,
  ):
    heads = _per_block(num_heads, depth, "num_heads")
    kv_heads = _per_block(num_kv_heads, depth, "num_kv_heads")
    hidden = _per_block(mlp_dim, depth, "mlp_dim")
    if head_dim is None:
      if dim % heads[0]:
        raise ValueError(f"dim ({dim}) must divide by num_heads ({heads[0]}), or give head_dim.")
      head_dim = dim // heads[0]
    self.embed = nnx.Embed(vocab_size, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List(
      [Block(dim, h, kv, head_dim, m, rngs=rngs) for h, kv, m in zip(heads, kv_heads, hidden)]
    )
    self.norm = nnx.RMSNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab_size, use_bias=False, rngs=rngs)
    self.vocab_size, self.dim, self.head_dim = vocab_size, dim, head_dim

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))
