"""Makes tests/fixtures/hf/: tiny random Hugging Face checkpoints and their reference logits.

Run in the benchmark-only venv (torch, transformers, safetensors, tokenizers; never a
dependency of jaxprune or of `make test`):

  /work/main/.venv-bench/bin/python benchmarks/make_hf_fixtures.py

Each directory is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``
or shards with ``model.safetensors.index.json``, float32) plus a tiny ``tokenizer.json``
(a BPE trained here on a few lines) and ``reference.npz``: ``tokens`` (2, 11) and the
transformers logits for the first 6 and all 11 tokens (``logits_6``, ``logits_11``),
eager attention. Five checkpoints, hidden 32, 2 layers, 4 query heads / 2 KV heads,
intermediate 48, vocabulary 64:

* ``llama3``: LlamaForCausalLM with Llama 3 rope scaling, its config rewritten with the
  transformers 4.x fields (``rope_theta``, ``rope_scaling``, ``torch_dtype``) that most
  checkpoints carry;
* ``mistral``: MistralForCausalLM with a sliding window of 4 (shorter than both lengths);
* ``qwen2``: Qwen2ForCausalLM (biases on q/k/v);
* ``qwen3``: Qwen3ForCausalLM (q/k norms, head_dim 16 != hidden / heads, tied embeddings);
* ``llama_sharded``: LlamaForCausalLM saved in two shards with an index.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
VOCAB = 64
LENGTHS = (6, 11)
TEXT = [
  "the quick brown fox jumps over the lazy dog",
  "a pruned model is a smaller model that computes almost the same thing",
  "sparse weights are zero and the rest are kept as they were",
  "every block of the decoder reads the residual stream and writes back to it",
  "attention heads share keys and values in groups",
]
COMMON = {
  "vocab_size": VOCAB,
  "hidden_size": 32,
  "intermediate_size": 48,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-5,
  "tie_word_embeddings": False,
}


def tokenizer() -> Tokenizer:
  """A BPE tokenizer of at most VOCAB ids trained on TEXT (whitespace pre-tokenizer)."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>"])  # type: ignore[call-arg]
  tok.train_from_iterator(TEXT, trainer)
  assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
  return tok


def checkpoints() -> dict[str, tuple[type, transformers.PretrainedConfig]]:
  llama3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
  return {
    "llama3": (
      transformers.LlamaForCausalLM,
      transformers.LlamaConfig(**COMMON, rope_parameters=llama3),
    ),
    "mistral": (
      transformers.MistralForCausalLM,
      transformers.MistralConfig(**COMMON, sliding_window=4, head_dim=8),
    ),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**COMMON)),
    "qwen3": (
      transformers.Qwen3ForCausalLM,
      transformers.Qwen3Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=16),
    ),
    "llama_sharded": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**COMMON)),
  }


def to_4x_fields(path: pathlib.Path) -> None:
  """Rewrites config.json with transformers 4.x's rope_theta / rope_scaling / torch_dtype."""
  config = json.loads(path.read_text())
  rope = dict(config.pop("rope_parameters"))
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = rope
  config["torch_dtype"] = config.pop("dtype", "float32")
  path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> int:
  torch.manual_seed(0)
  tok = tokenizer()
  tokens = torch.randint(0, VOCAB, (2, max(LENGTHS)), generator=torch.Generator().manual_seed(1))
  if ROOT.exists():
    shutil.rmtree(ROOT)
  for name, (cls, config) in checkpoints().items():
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():  # random init has std 0.02: widen it so the logits are not ~0
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.3)
    out = ROOT / name
    shard = "50KB" if name == "llama_sharded" else "50MB"
    model.save_pretrained(out, max_shard_size=shard)
    tok.save(str(out / "tokenizer.json"))
    reference = {"tokens": tokens.numpy().astype(np.int32)}
    with torch.no_grad():
      for n in LENGTHS:
        reference[f"logits_{n}"] = model(tokens[:, :n]).logits.numpy().astype(np.float32)
    np.savez(out / "reference.npz", **reference)
    (out / "generation_config.json").unlink(missing_ok=True)
    if name == "llama3":
      to_4x_fields(out / "config.json")
    files = sorted(p.name for p in out.iterdir())
    print(f"{name}: {files}, {sum(p.stat().st_size for p in out.iterdir())} bytes")
  total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
  print(f"transformers {transformers.__version__}, torch {torch.__version__}: {total} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
