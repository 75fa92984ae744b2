"""Do checkpoints written by jaxprune load in transformers with the same logits?

Runs in the benchmark-only venv (torch, transformers; not part of `make test`), and
calls jaxprune through the main venv's python (``--jax-python``):

  /work/main/.venv-bench/bin/python benchmarks/hf_transformers_check.py

For each fixture of tests/fixtures/hf (or ``--checkpoint DIR``):

1. ``jaxprune prune --checkpoint DIR --text T --method M --structure/--sparsity --out DIR2``
   (the command line, its output printed);
2. a uniformly shrunk copy written by ``save_hf`` (block 0 dropped, one KV group and half
   the MLP neurons removed in the remaining block: config.json updated);
3. a random ``charlm`` (the training recipes' decoder) written with ``new_checkpoint``.

Each directory is loaded by jaxprune (``load_hf``) and by transformers
(``AutoModelForCausalLM``, float32, eager attention), both compute the logits of the same
tokens, and the largest absolute difference is printed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"

JAX_SIDE = textwrap.dedent(
  """
  import dataclasses, sys
  import jax.numpy as jnp, numpy as np
  from flax import nnx
  from jaxprune.models import Decoder, config_of, hf

  mode, source, out, tokens_file = sys.argv[1:5]
  tokens = np.load(tokens_file)
  if mode == "structured":
    model, ck = hf.load_hf(source)
    c = ck.config
    d = c.head_dim or c.dim // c.num_heads
    g = c.num_heads // c.num_kv_heads  # query heads per KV head
    small = dataclasses.replace(c, depth=c.depth - 1, num_heads=c.num_heads - g,
                                num_kv_heads=c.num_kv_heads - 1, head_dim=d, mlp_dim=c.mlp_dim // 2)
    new = small.make(nnx.Rngs(0))
    q, kv, m = slice(g * d, None), slice(d, None), slice(c.mlp_dim // 2, None)
    for old_b, new_b in zip(list(model.blocks)[1:], new.blocks):
      a, b = old_b.attn, new_b.attn
      for name, cols in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        getattr(b, name).kernel[...] = getattr(a, name).kernel[:, cols]
        if c.qkv_bias:
          getattr(b, name).bias[...] = getattr(a, name).bias[cols]
      b.o_proj.kernel[...] = a.o_proj.kernel[q, :]
      if c.qk_norm:
        b.q_norm.scale[...], b.k_norm.scale[...] = a.q_norm.scale[...], a.k_norm.scale[...]
      for name in ("gate_proj", "up_proj"):
        getattr(new_b.mlp, name).kernel[...] = getattr(old_b.mlp, name).kernel[:, m]
      new_b.mlp.down_proj.kernel[...] = old_b.mlp.down_proj.kernel[m, :]
      new_b.attn_norm.scale[...], new_b.mlp_norm.scale[...] = old_b.attn_norm.scale[...], old_b.mlp_norm.scale[...]
    new.embed.embedding[...] = model.embed.embedding[...]
    new.norm.scale[...] = model.norm.scale[...]
    if not c.tie_embeddings:
      new.head.kernel[...] = model.head.kernel[...]
    hf.save_hf(new, ck, out)
  elif mode == "charlm":
    model = Decoder(64, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, rngs=nnx.Rngs(3))
    hf.save_hf(model, hf.new_checkpoint(config_of(model), max_position_embeddings=64), out)
  again, _ = hf.load_hf(out)
  np.save(out + "/jaxprune_logits.npy", np.asarray(again(jnp.asarray(tokens)), np.float32))
  """
)


def transformers_logits(directory: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def compare(name: str, directory: pathlib.Path, tokens: np.ndarray) -> float:
  ours = np.load(directory / "jaxprune_logits.npy")
  theirs = transformers_logits(directory, tokens)
  error = float(np.abs(ours - theirs).max())
  config = json.loads((directory / "config.json").read_text())
  widths = {k: config.get(k) for k in ("num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "intermediate_size")}  # fmt: skip
  print(f"{name}: max |logits jaxprune - transformers| = {error:.2e} (max |logit| "
        f"{np.abs(theirs).max():.2f}); {widths}", flush=True)  # fmt: skip
  return error


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", action="append", help="default: every fixture")
  parser.add_argument("--jax-python", default="/work/main/.venv/bin/python")
  parser.add_argument("--method", default="sparsegpt")
  parser.add_argument("--structure", default="2:4")
  parser.add_argument("--tolerance", type=float, default=1e-4)
  args = parser.parse_args()
  sources = [pathlib.Path(p) for p in args.checkpoint or sorted(FIXTURES.iterdir())]
  print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix="hf_check_"))
  rng = np.random.default_rng(0)
  words = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "sparse",
    "weights",
    "are",
    "zero",
  ]
  (work / "text.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(200)))
  tokens = rng.integers(0, 64, (2, 24)).astype(np.int32)
  np.save(work / "tokens.npy", tokens)
  env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
  errors = {}
  for source in sources:
    out = work / f"{source.name}_pruned"
    command = [args.jax_python, "-m", "jaxprune", "prune", "--checkpoint", str(source),
               "--text", str(work / "text.txt"), "--method", args.method,
               "--structure", args.structure, "--out", str(out), "--seq-len", "32",
               "--calibration", "32"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    print(run.stdout, run.stderr[-2000:] if run.returncode else "", flush=True)
    run.check_returncode()
    for mode, target in (("pruned", out), ("structured", work / f"{source.name}_structured")):
      subprocess.run(
        [args.jax_python, "-c", JAX_SIDE, mode, str(source), str(target), str(work / "tokens.npy")],
        check=True, cwd=ROOT, env=env,
      )  # fmt: skip
      errors[f"{source.name} {mode}"] = compare(f"{source.name} {mode}", target, tokens)
  charlm = work / "charlm"
  subprocess.run(
    [args.jax_python, "-c", JAX_SIDE, "charlm", "-", str(charlm), str(work / "tokens.npy")],
    check=True, cwd=ROOT, env=env,
  )  # fmt: skip
  errors["charlm"] = compare("charlm (new_checkpoint)", charlm, tokens)
  worst = max(errors.values())
  print(f"worst: {worst:.2e} over {len(errors)} checkpoints (tolerance {args.tolerance:g})")
  return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
