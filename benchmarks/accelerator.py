"""What jaxprune's performance claims rest on, measured on whatever backend JAX sees.

One command, six parts, one markdown file (``benchmarks/results/accelerator-<backend>.md``):

1. masked-step overhead: a jitted Adam train step, dense vs ``jaxprune.masked`` with
   fixed masks (``magnitude(0.9)``, masks at step 0) and AGP every 10 steps, for a
   ResNet-50-sized CNN (bottleneck blocks 3-4-6-3, batch 64, 224x224) and a decoder
   transformer of ~100M params in bfloat16 (12 layers, d = 768, batch 8 x 512);
2. global exact top-k (``jaxprune.topk_mask``, scope global) over 10M and 100M scores
   vs a full ``argsort`` and ``lax.top_k``;
3. surgery: latency speed-up vs FLOP reduction of the shrunk ResNet-50 (batch 64; half
   the channels of every group) and transformer (half the MLP neurons);
4. SparseGPT on one 4096 x 4096 layer (``jaxprune.posttrain.sparsegpt_layer``, 50%);
5. 2:4: ``jaxprune.export.nm_matmul`` vs a dense matmul (where JAX has a sparse N:M
   dot; else the table says so);
6. sparse export: a Dense layer's matmul, dense vs BCOO (``jaxprune.export``) vs the
   shrunk layer (the kept outputs only), at 50/90/99% sparsity;
7. a 1B decoder pruned end to end (``benchmarks/llm_1b.py`` in this process: a random
   TinyLlama-shaped Decoder in bfloat16, Wanda then SparseGPT at 50%, one pass per block):
   time per block, total, peak host and device memory, exact 50% per kernel, finite logits.
   ``--quick``: one tiny block, Wanda only.

``--quick`` runs every part at tiny sizes (seconds on a CPU; ``make test`` runs it, so
the script cannot rot) and writes nothing unless ``--out`` is given.

  python benchmarks/accelerator.py                  # full sizes: a GPU / TPU
  python benchmarks/accelerator.py --quick --out /tmp/acc
  python benchmarks/accelerator.py --parts sparse   # one part (names: see --help)
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import llm_1b
import numpy as np
import optax
import timing
from flax import nnx

import jaxprune
from jaxprune import export, fileio, surgery
from jaxprune.models.decoder import DecoderConfig
from jaxprune.posttrain import sparsegpt_layer

PARTS = ("masked_step", "topk", "surgery", "sparsegpt", "nm", "sparse", "llm_1b")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every size the parts use: full (accelerator) or quick (CPU smoke run)."""

  cnn_blocks: tuple[int, ...] = (3, 4, 6, 3)
  cnn_width: int = 64
  cnn_image: int = 224
  cnn_batch: int = 64
  lm_layers: int = 12
  lm_dim: int = 768
  lm_heads: int = 12
  lm_vocab: int = 32_000
  lm_seq: int = 512
  lm_batch: int = 8
  topk_sizes: tuple[int, ...] = (10_000_000, 100_000_000)
  sparsegpt_dim: int = 4096
  nm_dims: tuple[int, int, int] = (4096, 4096, 4096)  # batch, in, out
  sparse_dims: tuple[int, int, int] = (256, 4096, 4096)
  window: int = 10
  rounds: int = 7
  lm1b_config: DecoderConfig = llm_1b.TINYLLAMA
  lm1b_methods: tuple[str, ...] = llm_1b.METHODS
  lm1b_tokens: tuple[int, int, int] = (8, 256, 8)  # sequences, tokens each, per batch


QUICK = Sizes(
  cnn_blocks=(1,), cnn_width=4, cnn_image=16, cnn_batch=2, lm_layers=1, lm_dim=16,
  lm_heads=2, lm_vocab=64, lm_seq=8, lm_batch=2, topk_sizes=(10_000,), sparsegpt_dim=128,
  nm_dims=(8, 64, 32), sparse_dims=(8, 256, 128), window=2, rounds=1,
  lm1b_config=dataclasses.replace(llm_1b.QUICK, depth=1), lm1b_methods=("wanda",),
  lm1b_tokens=(2, 8, 2),
)  # fmt: skip


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (4x width) convs with BatchNorm, plus the shortcut."""

  def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
    out = 4 * width
    self.conv1 = nnx.Conv(cin, width, (1, 1), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, (3, 3), strides=stride, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(width, rngs=rngs)
    self.conv3 = nnx.Conv(width, out, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(out, rngs=rngs)
    project = stride != 1 or cin != out
    self.proj = (
      nnx.Conv(cin, out, (1, 1), strides=stride, use_bias=False, rngs=rngs) if project else None
    )
    self.proj_bn = nnx.BatchNorm(out, rngs=rngs) if project else None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(y + shortcut)


class ResNet50(nnx.Module):
  """ResNet-50's layout (He et al. 2016): stem 7x7/2 + max pool, bottleneck stages."""

  def __init__(self, blocks, width: int, classes: int = 1000, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, width, (7, 7), strides=2, use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
    layers, cin = [], width
    for stage, n in enumerate(blocks):
      for i in range(n):
        layers.append(Bottleneck(cin, width * 2**stage, 2 if stage and not i else 1, rngs=rngs))
        cin = 4 * width * 2**stage
    self.blocks = nnx.List(layers)
    self.head = nnx.Linear(cin, classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


class DecoderBlock(nnx.Module):
  """Pre-norm causal self-attention and a 4x GELU MLP."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
    causal = jnp.tril(jnp.ones((t, t), bool))
    attn = jax.nn.dot_product_attention(q, k, v, mask=causal[None, None])
    x = x + self.out(attn.reshape(b, t, d))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Decoder(nnx.Module):
  def __init__(self, s: Sizes, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(s.lm_vocab, s.lm_dim, rngs=rngs)
    self.pos = nnx.Param(jnp.zeros((s.lm_seq, s.lm_dim)))
    self.blocks = nnx.List(
      [DecoderBlock(s.lm_dim, s.lm_heads, rngs=rngs) for _ in range(s.lm_layers)]
    )
    self.norm = nnx.LayerNorm(s.lm_dim, rngs=rngs)
    self.head = nnx.Linear(s.lm_dim, s.lm_vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def workloads(s: Sizes):
  """``{name: (model, inputs, labels)}``: the CNN (float32) and the LM (bfloat16)."""
  cnn = ResNet50(s.cnn_blocks, s.cnn_width, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (s.cnn_batch, s.cnn_image, s.cnn_image, 3))
  lm = Decoder(s, rngs=nnx.Rngs(0))
  _, lm_params, _ = nnx.split(lm, nnx.Param, ...)
  nnx.update(lm, jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm_params))
  tokens = jax.random.randint(jax.random.key(2), (s.lm_batch, s.lm_seq), 0, s.lm_vocab)
  return {
    "ResNet-50 layout": (cnn, images, jnp.zeros((s.cnn_batch,), jnp.int32)),
    "decoder LM, bfloat16": (lm, tokens, tokens),
  }


def timed(runs, rounds: int) -> dict[str, list[float]]:
  """:func:`timing.interleaved` after one untimed call of each run (compilation)."""
  for run in runs.values():
    run()
  return timing.interleaved(runs, rounds)


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_step(model, tx):
  """A jitted ``(params, rest, opt_state, x, y) -> (params, rest, opt_state)`` Adam step."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, x, y):
    m = nnx.merge(graphdef, params, rest, copy=True)  # BatchNorm updates its copy
    logits = m(x).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.split(m, nnx.Param, ...)[2]

  @jax.jit
  def step(params, rest, opt_state, x, y):
    grads, rest = jax.grad(loss_fn, has_aux=True)(params, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state

  return step, params, rest


def part_masked_step(s: Sizes) -> str:
  rows = []
  for name, (model, x, y) in workloads(s).items():
    variants = {
      "dense": optax.adam(1e-4),
      "fixed masks": jaxprune.masked(optax.adam(1e-4), jaxprune.magnitude(0.9)),
      "AGP every 10": jaxprune.masked(
        optax.adam(1e-4), jaxprune.magnitude(jaxprune.agp(0.9, begin=0, end=10**6, every=10))
      ),
    }
    runs = {}
    for variant, tx in variants.items():
      step, params, rest = train_step(model, tx)
      box = [params, rest, tx.init(params)]

      def run(step=step, box=box, x=x, y=y, steps=s.window):
        for _ in range(steps):
          box[:] = step(*box, x, y)
        jax.block_until_ready(box)

      run(steps=1 + s.window)  # compile, step 0 (the masks), warm up
      runs[variant] = run
    times = timing.interleaved(runs, s.rounds)
    for variant, ts in times.items():
      ratio = timing.paired_ratio(ts, times["dense"])
      rows.append([
        name, f"{n_params(model) / 1e6:.1f}M", variant, timing.ms(timing.median(ts) / s.window),
        f"{ratio:.3f}x", f"{min(ts) / min(times['dense']):.3f}x",
      ])  # fmt: skip
  header = ["model", "params", "variant", "ms / step", "vs dense (median)", "vs dense (best)"]
  return (
    f"Adam train step, {s.rounds} interleaved rounds of {s.window}-step windows; masks "
    "90% per layer.\n\n" + timing.table(header, rows)
  )


def part_topk(s: Sizes) -> str:
  rows = []
  for n in s.topk_sizes:
    scores = jax.random.normal(jax.random.key(0), (n,))
    k = n - round(0.9 * n)
    ours = jax.jit(lambda x: jaxprune.topk_mask({"s": x}, 0.9, scope="global")["s"])
    argsort = jax.jit(lambda x, k=k: jnp.zeros(x.shape, bool).at[jnp.argsort(-x)[:k]].set(True))
    top_k = jax.jit(lambda x, k=k: jnp.zeros(x.shape, bool).at[jax.lax.top_k(x, k)[1]].set(True))
    fns = {"jaxprune.topk_mask": ours, "argsort": argsort, "lax.top_k": top_k}
    masks = {name: f(scores) for name, f in fns.items()}
    assert all(int(m.sum()) == k for m in masks.values())
    assert bool((masks["jaxprune.topk_mask"] == masks["lax.top_k"]).all())
    runs = {
      name: (lambda f=f, scores=scores: jax.block_until_ready(f(scores))) for name, f in fns.items()
    }
    times = timed(runs, s.rounds)
    for name, ts in times.items():
      ratio = timing.paired_ratio(ts, times["jaxprune.topk_mask"])
      rows.append([f"{n:,}", name, timing.ms(timing.median(ts)), f"{ratio:.2f}x"])
  return (
    "Keep the top 10% of one score vector (global scope), jitted; all three masks "
    "checked equal in count, ours equal to lax.top_k's.\n\n"
    + timing.table(["scores", "method", "ms", "time vs jaxprune"], rows)
  )


def forward_time(model, x, rounds: int):
  graphdef, state = nnx.split(model)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  compiled = jax.jit(forward).lower(state, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost["flops"]), lambda: jax.block_until_ready(compiled(state, x))


def part_surgery(s: Sizes) -> str:
  rows = []
  for name, (model, x, _) in workloads(s).items():
    example = x[:1]
    ratios = {"channels": 0.5} if x.ndim == 4 else {"neurons": 0.5}
    plan = surgery.plan(model, example_input=example)
    masks = surgery.channel_masks(plan, nnx.state(model, nnx.Param), ratios)
    start = time.perf_counter()
    shrunk = surgery.shrink(model, masks=masks, example_input=example)
    seconds = time.perf_counter() - start
    (f_dense, dense), (f_small, small) = (
      forward_time(m, x, s.rounds) for m in (model, shrunk.model)
    )
    times = timed({"dense": dense, "shrunk": small}, s.rounds)
    speedup = timing.paired_ratio(times["dense"], times["shrunk"])
    rows.append([
      name, f"{n_params(model) / 1e6:.1f}M -> {n_params(shrunk.model) / 1e6:.1f}M",
      f"{f_dense / f_small:.2f}x", timing.ms(timing.median(times["dense"])),
      timing.ms(timing.median(times["shrunk"])), f"{speedup:.2f}x",
      f"{speedup / (f_dense / f_small):.2f}", f"{seconds:.1f} s",
    ])  # fmt: skip
  header = [
    "model", "params", "FLOP reduction", "dense ms", "shrunk ms", "speed-up",
    "speed-up / FLOP reduction", "shrink() took",
  ]  # fmt: skip
  return (
    "Eval forward pass, weights as arguments; half of every channel group (CNN) or of "
    "the MLP neurons (LM) removed by L1 norm.\n\n" + timing.table(header, rows)
  )


def part_sparsegpt(s: Sizes) -> str:
  d = s.sparsegpt_dim
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2 * d, d))
  hessian = 2 / x.shape[0] * x.T @ x
  kernel = jax.random.normal(kw, (d, d)) / np.sqrt(d)
  run = lambda: jax.block_until_ready(sparsegpt_layer(kernel, hessian, 0.5))  # noqa: E731
  run()
  ts = timing.interleaved({"sparsegpt": run}, s.rounds)["sparsegpt"]
  return f"`sparsegpt_layer` on a {d} x {d} kernel, 50% unstructured (blocks of 128): {timing.ms(timing.median(ts))} ms (median of {s.rounds})."


def part_nm(s: Sizes) -> str:
  b, n_in, n_out = s.nm_dims
  w = jax.random.normal(jax.random.key(0), (n_in, n_out))
  mask = jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)).masks({"w": w})["w"]
  packed = export.nm_pack(w * mask, mask=mask)
  x = jax.random.normal(jax.random.key(1), (b, n_in), jnp.bfloat16)
  if not export.nm_matmul_available():
    return (
      f"not measured: JAX {jax.__version__} has no sparse N:M matmul "
      "(`jax.experimental.sparse.nm` is not in this release); the 2:4 kernel packs to "
      f"{packed.values.nbytes + packed.metadata.nbytes:,} bytes of float32 values + "
      f"metadata vs {w.nbytes:,} dense."
    )
  dense_w = (w * mask).astype(jnp.bfloat16)
  dense = jax.jit(lambda x: x @ dense_w)
  sparse = jax.jit(lambda x: export.nm_matmul(x, packed))
  runs = {
    "dense": lambda: jax.block_until_ready(dense(x)),
    "2:4": lambda: jax.block_until_ready(sparse(x)),
  }
  times = timed(runs, s.rounds)
  speedup = timing.paired_ratio(times["dense"], times["2:4"])
  return f"{b} x {n_in} @ {n_in} x {n_out}, bfloat16: dense {timing.ms(timing.median(times['dense']))} ms, 2:4 {timing.ms(timing.median(times['2:4']))} ms, speed-up {speedup:.2f}x."


def part_sparse(s: Sizes) -> str:
  b, n_in, n_out = s.sparse_dims
  x = jax.random.normal(jax.random.key(1), (b, n_in))
  w = jax.random.normal(jax.random.key(0), (n_in, n_out)) / np.sqrt(n_in)
  rows = []
  for sparsity in (0.5, 0.9, 0.99):
    params = {"kernel": w}
    masks = jaxprune.magnitude(sparsity).masks(params)
    masked = jaxprune.apply_mask(params, masks)["kernel"]
    bcoo = export.to_sparse(params, masks)
    # The shrunk layer: the same number of weights as a narrower dense layer.
    kept_out = max(1, round((1 - sparsity) * n_out))
    narrow = masked[:, :kept_out]
    f_dense = jax.jit(lambda x, w: x @ w)
    f_bcoo = jax.jit(export.sparse_apply(lambda p, x: x @ p["kernel"]))
    np.testing.assert_allclose(f_bcoo(bcoo, x), f_dense(x, masked), rtol=1e-4, atol=1e-4)
    calls = {
      "dense": (f_dense, (x, masked)),
      "BCOO": (f_bcoo, (bcoo, x)),
      "shrunk": (f_dense, (x, narrow)),
    }
    runs = {k: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for k, (f, a) in calls.items()}
    times = timed(runs, s.rounds)
    rows.append([
      f"{sparsity:.0%}", timing.ms(timing.median(times["dense"])),
      timing.ms(timing.median(times["BCOO"])), timing.ms(timing.median(times["shrunk"])),
      f"{timing.paired_ratio(times['dense'], times['BCOO']):.2f}x",
      f"{timing.paired_ratio(times['dense'], times['shrunk']):.2f}x",
    ])  # fmt: skip
  header = ["sparsity", "dense ms", "BCOO ms", "shrunk ms", "BCOO speed-up", "shrunk speed-up"]
  return (
    f"`x @ W`, x {b} x {n_in}, W {n_in} x {n_out} float32, unstructured magnitude masks; "
    "BCOO through `jaxprune.export.sparse_apply` (checked equal to the masked dense "
    "product); 'shrunk' is a dense layer with the same number of weights (the output "
    "width a structured prune to that sparsity leaves).\n\n" + timing.table(header, rows)
  )


def part_llm_1b(sizes: Sizes) -> str:
  """benchmarks/llm_1b.py's run, each method on a fresh model in this process."""
  rows = []
  for method in sizes.lm1b_methods:
    r = llm_1b.run_method(sizes.lm1b_config, method, *sizes.lm1b_tokens)
    assert r["finite_logits"] and r["sparsity_min"] == r["sparsity_max"] == 0.5, r
    device = "-" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.2f}"
    blocks = r["block_s"]
    rows.append(
      f"| {method} | {r['params'] / 1e9:.2f}B | {len(blocks)} | {blocks[0]:.2f} | "
      f"{np.median(blocks[1:] or blocks):.2f} | {r['total_s']:.1f} | "
      f"{r['peak_rss_gib']:.2f} | {device} |"
    )
  n, t, b = sizes.lm1b_tokens
  return "\n".join(
    [
      f"Random {sizes.lm1b_config.depth}-block Decoder (dim {sizes.lm1b_config.dim}, MLP "
      f"{sizes.lm1b_config.mlp_dim}) in bfloat16, 50% unstructured, {n} x {t} random tokens "
      f"(batches of {b}); block 1 includes compiling and the stack check; peaks are the "
      "process's so far (earlier parts included).",
      "",
      "| method | params | blocks | block 1 (s) | median block (s) | total (s) | "
      "peak RSS (GiB) | device peak (GiB) |",
      "|---|---|---|---|---|---|---|---|",
      *rows,
    ]
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
  parser.add_argument(
    "--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}"
  )
  parser.add_argument("--rounds", type=int, help="timed rounds per measurement")
  parser.add_argument("--out", metavar="DIR", help="write accelerator-<backend>.md here")
  parser.add_argument("--no-write", action="store_true", help="write nothing")
  args = parser.parse_args()
  sizes = QUICK if args.quick else Sizes()
  if args.rounds:
    sizes = dataclasses.replace(sizes, rounds=args.rounds)
  parts = args.parts.split(",")
  unknown = set(parts) - set(PARTS)
  if unknown:
    parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
  titles = {
    "masked_step": "Masked-step overhead", "topk": "Global exact top-k",
    "surgery": "Surgery: latency vs FLOPs", "sparsegpt": "SparseGPT, one layer",
    "nm": "2:4 sparse matmul", "sparse": "Sparse export: dense vs BCOO vs shrunk",
    "llm_1b": "A 1B decoder pruned end to end",
  }  # fmt: skip
  functions = {
    "masked_step": part_masked_step, "topk": part_topk, "surgery": part_surgery,
    "sparsegpt": part_sparsegpt, "nm": part_nm, "sparse": part_sparse, "llm_1b": part_llm_1b,
  }  # fmt: skip
  sections = []
  for part in parts:
    start = time.perf_counter()
    body = functions[part](sizes)
    sections.append(f"### {titles[part]}\n\n{body}\n\n_({time.perf_counter() - start:.0f} s)_")
    print(sections[-1], flush=True)
  backend = jax.default_backend()
  mode = "quick (tiny sizes: a smoke run, not a measurement)" if args.quick else "full sizes"
  text = f"## Accelerator benchmarks: {backend}, {mode}\n\n" + "\n\n".join(sections)
  text += f"\n\n_{timing.machine()}; `python benchmarks/accelerator.py {' '.join(__import__('sys').argv[1:])}`._\n"
  write = not args.no_write and (args.out or not args.quick)
  if write:
    out = pathlib.Path(args.out) if args.out else timing.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / f"accelerator-{backend}.md", text)
    print(f"Written to {out / f'accelerator-{backend}.md'}")


if __name__ == "__main__":
  main()
