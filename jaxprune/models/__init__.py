"""Models and checkpoint formats: the Llama-family decoder and Hugging Face checkpoints.

* :class:`Decoder` (alias :data:`CharLM`, the training recipes' ``charlm``): a pre-norm
  decoder-only transformer in NNX with the Llama layout, built from a
  :class:`DecoderConfig` that covers Llama (incl. Llama 3 rope scaling), Mistral (sliding
  window), Qwen2 (q/k/v biases) and Qwen3 (q/k norms), tied or untied embeddings.
* :mod:`jaxprune.models.hf` (needs the ``llm`` extra): ``load_hf`` / ``save_hf`` read and
  write Hugging Face checkpoint directories (``config.json`` + safetensors);
  :mod:`jaxprune.models.hf_config` maps ``config.json`` to a :class:`DecoderConfig` and
  back (no extra needed).
"""

from jaxprune.models.decoder import (
  MLP,
  Attention,
  Block,
  CharLM,
  Decoder,
  DecoderConfig,
  RopeScaling,
  config_of,
  rotary,
)

__all__ = [
  "Attention",
  "Block",
  "CharLM",
  "config_of",
  "Decoder",
  "DecoderConfig",
  "MLP",
  "RopeScaling",
  "rotary",
]
