"""Hugging Face ``config.json`` <-> :class:`~jaxprune.models.DecoderConfig`, and tensor names.

Needs no extra: :mod:`jaxprune.models.hf` reads and writes the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxprune.models.decoder import DecoderConfig, RopeScaling

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
}


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read or written as asked (names the file)."""


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, scaling)`` from 5.x ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping):
    theta, scaling = params.get("rope_theta", hf.get("rope_theta", 10_000.0)), dict(params)
  else:
    theta, scaling = hf.get("rope_theta", 10_000.0), dict(hf.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if scaling.get("attention_factor") not in (None, 1, 1.0):
    raise CheckpointError(
      f"{where}: rope attention_factor {scaling['attention_factor']} is not supported."
    )
  if kind == "default":
    return float(theta), None
  if kind == "linear":
    return float(theta), RopeScaling("linear", float(scaling["factor"]))
  if kind == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
      raise CheckpointError(f"{where}: llama3 rope scaling without {missing}.")
    return float(theta), RopeScaling(
      "llama3",
      float(scaling["factor"]),
      float(scaling["low_freq_factor"]),
      float(scaling["high_freq_factor"]),
      int(scaling["original_max_position_embeddings"]),
    )
  raise CheckpointError(
    f"{where}: rope type {kind!r} is not supported (default, linear and llama3 are)."
  )


def _window(hf: Mapping[str, Any], family: str, where: str) -> int | None:
  types = hf.get("layer_types")
  if types:
    kinds = set(types)
    if kinds == {"full_attention"}:
      return None
    if kinds == {"sliding_attention"}:
      return int(hf["sliding_window"])
    raise CheckpointError(
      f"{where}: layer_types mixes {sorted(kinds)}; a Decoder has one attention kind for "
      "all layers."
    )
  if family == "mistral":
    return None if hf.get("sliding_window") is None else int(hf["sliding_window"])
  if hf.get("use_sliding_window"):
    raise CheckpointError(
      f"{where}: use_sliding_window with max_window_layers (no layer_types) is not supported."
    )
  return None


def decoder_config(hf: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
  """The :class:`~jaxprune.models.DecoderConfig` of a Hugging Face ``config.json`` dict.

  Raises:
    CheckpointError: an architecture other than the four supported, or a field this
      decoder cannot represent (naming ``where`` and the field).

  Examples:
    >>> c = decoder_config({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10,
    ...   "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
    ...   "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 1e6})
    >>> c.qkv_bias, c.qk_norm, c.rope_theta
    (True, False, 1000000.0)
  """
  names = list(hf.get("architectures") or [])
  family = next((ARCHITECTURES[a] for a in names if a in ARCHITECTURES), None)
  if family is None:
    raise CheckpointError(
      f"{where}: architectures {names} is none of the supported {sorted(ARCHITECTURES)}."
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r}; only 'silu' is supported.")
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{where}: mlp_bias=true is not supported.")
  try:
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // heads)
    theta, scaling = _rope(hf, where)
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
      int(hf["vocab_size"]),
      dim=dim,
      depth=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=None if head_dim * heads == dim else head_dim,
      mlp_dim=int(hf["intermediate_size"]),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      qkv_bias=True if family == "qwen2" else bias,
      o_bias=False if family == "qwen2" else bias,
      qk_norm=family == "qwen3",
      sliding_window=_window(hf, family, where),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
  except KeyError as e:
    raise CheckpointError(f"{where}: missing the field {e.args[0]!r}.") from None


def tensor_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  """Hugging Face tensor name -> ``(decoder param path, transposed)`` for ``config``.

  Examples:
    >>> names = tensor_names(DecoderConfig(10, dim=8, depth=1, num_heads=2, mlp_dim=8))
    >>> names["model.layers.0.self_attn.q_proj.weight"]
    ('blocks/0/attn/q_proj/kernel', True)
  """
  out = {"model.embed_tokens.weight": ("embed/embedding", False)}
  for i in range(config.depth):
    hf, jx = f"model.layers.{i}", f"blocks/{i}"
    out[f"{hf}.input_layernorm.weight"] = (f"{jx}/attn_norm/scale", False)
    for proj in ("q", "k", "v", "o"):
      out[f"{hf}.self_attn.{proj}_proj.weight"] = (f"{jx}/attn/{proj}_proj/kernel", True)
      if config.o_bias if proj == "o" else config.qkv_bias:
        out[f"{hf}.self_attn.{proj}_proj.bias"] = (f"{jx}/attn/{proj}_proj/bias", False)
    if config.qk_norm:
      for n in ("q", "k"):
        out[f"{hf}.self_attn.{n}_norm.weight"] = (f"{jx}/attn/{n}_norm/scale", False)
    out[f"{hf}.post_attention_layernorm.weight"] = (f"{jx}/mlp_norm/scale", False)
    for proj in ("gate", "up", "down"):
      out[f"{hf}.mlp.{proj}_proj.weight"] = (f"{jx}/mlp/{proj}_proj/kernel", True)
  out["model.norm.weight"] = ("norm/scale", False)
  if not config.tie_embeddings:
    out["lm_head.weight"] = ("head/kernel", True)
  return out


def hf_config_of(
  config: DecoderConfig, *, dtype: str = "float32", max_position_embeddings: int = 2048
) -> dict[str, Any]:
  """A ``config.json`` dict for ``config``: Llama for the plain decoder, Qwen2 for q/k/v
  biases without an output bias, Qwen3 for q/k norms, Mistral for a sliding window.

  Raises:
    CheckpointError: options no supported architecture has together, per-block widths.

  Examples:
    >>> from jaxprune.models import DecoderConfig
    >>> hf = hf_config_of(DecoderConfig(50, dim=32, depth=2, num_heads=4, mlp_dim=48))
    >>> hf["architectures"], hf["num_key_value_heads"], hf["head_dim"]
    (['LlamaForCausalLM'], 2, 8)
  """
  heads, kv_heads, mlp_dim = uniform_widths(config)
  if config.qk_norm:
    arch, model_type = "Qwen3ForCausalLM", "qwen3"
  elif config.qkv_bias and not config.o_bias:
    arch, model_type = "Qwen2ForCausalLM", "qwen2"
  else:
    arch, model_type = "LlamaForCausalLM", "llama"
  if config.sliding_window is not None:
    arch, model_type = "MistralForCausalLM", "mistral"
    if config.qk_norm or config.qkv_bias or config.o_bias:
      raise CheckpointError("hf_config_of: a sliding window with biases or q/k norms.")
  hf: dict[str, Any] = {
    "architectures": [arch],
    "model_type": model_type,
    "hidden_act": "silu",
    "vocab_size": config.vocab_size,
    "hidden_size": config.dim,
    "intermediate_size": mlp_dim,
    "num_hidden_layers": config.depth,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": config.head_dim or config.dim // heads,
    "rms_norm_eps": config.norm_eps,
    "rope_theta": config.rope_theta,
    "rope_scaling": None,
    "max_position_embeddings": max_position_embeddings,
    "tie_word_embeddings": config.tie_embeddings,
    "attention_bias": config.o_bias if model_type != "qwen2" else False,
    "mlp_bias": False,
    "torch_dtype": dtype,
  }
  if config.rope_scaling is not None:
    r = config.rope_scaling
    hf["rope_scaling"] = {"rope_type": r.kind, "factor": r.factor}
    if r.kind == "llama3":
      hf["rope_scaling"].update(
        low_freq_factor=r.low_freq_factor,
        high_freq_factor=r.high_freq_factor,
        original_max_position_embeddings=r.original_max_position_embeddings,
      )
  if model_type == "mistral":
    hf["sliding_window"] = config.sliding_window
  if config != decoder_config(hf, "hf_config_of"):
    raise CheckpointError(f"hf_config_of: no {arch} config expresses {config}.")
  return hf


def uniform_widths(config: DecoderConfig) -> tuple[int, int, int]:
  """``(num_heads, num_kv_heads, mlp_dim)``, the same in every block, or an error naming them."""
  per_block = {
    name: value
    for name, value in (
      ("num_attention_heads", config.num_heads),
      ("num_key_value_heads", config.num_kv_heads),
      ("intermediate_size", config.mlp_dim),
    )
    if isinstance(value, tuple)
  }
  if per_block:
    listed = ", ".join(f"{k} per block {list(v)}" for k, v in per_block.items())
    raise CheckpointError(
      f"The Hugging Face config.json has one width for all layers, but this model has "
      f"{listed}. Prune the same number of heads / neurons in every block to save it in "
      "this format, or save the params with jaxprune's own checkpoint."
    )
  return int(config.num_heads), int(config.num_kv_heads), int(config.mlp_dim)  # type: ignore[arg-type]


def resized_config(
  hf_config: Mapping[str, Any], old: DecoderConfig, config: DecoderConfig
) -> dict[str, Any]:
  """``hf_config`` (the config.json of ``old``) with the widths and depth of ``config``.

  Raises:
    CheckpointError: widths that differ between blocks, or an option (biases, norms,
      rotary, window, tied embeddings, vocabulary, hidden size) that differs from the
      checkpoint's: those are not what pruning changes.
  """
  heads, kv_heads, mlp_dim = uniform_widths(config)
  fixed = ("vocab_size", "dim", "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "o_bias",
           "qk_norm", "sliding_window", "tie_embeddings")  # fmt: skip
  changed = [f for f in fixed if getattr(config, f) != getattr(old, f)]
  if changed:
    raise CheckpointError(
      f"save_hf: the model's {changed} differ from the checkpoint's config.json; only the "
      "head counts, the MLP width and the number of layers can change."
    )
  hf = dict(hf_config)
  head_dim = config.head_dim or config.dim // heads
  hf.update(
    num_hidden_layers=config.depth,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    intermediate_size=mlp_dim,
  )
  if "head_dim" in hf or head_dim != config.dim // heads:
    hf["head_dim"] = head_dim
  if hf.get("layer_types"):
    hf["layer_types"] = [hf["layer_types"][0]] * config.depth
  return hf
