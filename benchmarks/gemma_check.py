"""jaxprune surgery on the real `gemma` package's (Linen) transformer, tiny and random.

Not a dependency and not in `make test`. The `gemma` package (google-deepmind/gemma)
needs kauldron, and through it TensorFlow, for its `gm` API; release 2.0.8 still ships
the legacy Linen modules (`gemma.transformer`, `gemma.modules`, `gemma.layers`) that
import only flax and jax. A separate venv that sees the main one's jax/flax:

    python3 -m venv .venv-gemma
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
      > .venv-gemma/lib/python3.11/site-packages/main_venv.pth
    .venv-gemma/bin/pip install --no-deps 'gemma==2.0.8'
    PYTHONPATH=$PWD .venv-gemma/bin/python benchmarks/gemma_check.py

It builds a 1-layer config (d_model 16, 4 query heads and 2 KV heads of head_dim 4, an
MLP of 32, vocabulary 11) with random weights, plans it, removes a quarter of the MLP
neurons and half the query heads, and compares the shrunk model with the masked one at
the traced size and at other batch sizes and lengths. Each step prints what happened,
an error included: the point is to see where surgery stands on real code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from gemma import modules, transformer

from jaxprune import surgery


def tiny_config(num_kv_heads: int) -> transformer.TransformerConfig:
  return transformer.TransformerConfig(
    num_layers=1,
    num_embed=11,
    embed_dim=16,
    hidden_dim=32,
    num_heads=4,
    head_dim=4,
    num_kv_heads=num_kv_heads,
    final_logit_softcap=None,
    use_post_attn_norm=False,
    use_post_ffw_norm=False,
    attention_types=(modules.AttentionType.GLOBAL,),
    max_cache_length=None,
  )


def main() -> None:
  from flax import linen as nn

  class Gemma(nn.Module):
    config: transformer.TransformerConfig

    @nn.compact
    def __call__(self, tokens):
      b, t = tokens.shape
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask = transformer.make_causal_attn_mask(jnp.ones((b, t), bool))
      logits, _ = transformer.Transformer(self.config, name="transformer")(
        tokens, positions, None, mask
      )
      return logits

  for kv in (4, 2):
    print(f"\n== gemma 2.0.8 Transformer, 4 query heads, {kv} KV heads ==")
    net = Gemma(tiny_config(kv))
    example = jnp.zeros((1, 4), jnp.int32)
    variables = net.init(jax.random.key(0), example)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
      lambda x, rng=rng: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), variables
    )
    try:
      p = surgery.plan(net, variables, example_input=example)
    except Exception as e:
      print(f"  plan fails: {type(e).__name__}: {e}")
      continue
    for g in p.groups:
      print(f"  {g.name}: {g.kind}, {g.size}, {g.blocked or 'prunable'}")
    for spec in ({"neurons": 0.25}, {"heads": 0.5, "neurons": 0.25}):
      print(f"-- {spec}")
      check(net, variables, p, spec, example, rng)


def check(net, variables, p, spec, example, rng) -> None:
  """Shrinks by ``spec`` and prints the report and the error at other sizes."""
  try:
    masks = surgery.channel_masks(p, variables["params"], spec)
    small = surgery.shrink(net, variables, masks, example_input=example)
  except Exception as e:
    print(f"  shrink fails: {type(e).__name__}: {str(e)[:400]}")
    return
  print(small.report())
  print("widths:", small.widths)
  masked = jax.tree.map(
    lambda m, x: x if m is None else jnp.where(m, x, 0),
    masks,
    variables["params"],
    is_leaf=lambda m: m is None,
  )
  for b, t in ((1, 4), (2, 3), (2, 7)):
    tokens = jnp.asarray(rng.integers(0, 11, size=(b, t)), jnp.int32)
    ref = net.apply({"params": masked}, tokens)
    try:
      out = small.model.apply(small.variables, tokens)
      print(
        f"  batch {b}, length {t}: max |shrunk - masked| = {float(jnp.abs(ref - out).max()):.3g}"
      )
    except Exception as e:
      print(f"  batch {b}, length {t}: shrunk model fails: {type(e).__name__}: {e}")


if __name__ == "__main__":
  main()
