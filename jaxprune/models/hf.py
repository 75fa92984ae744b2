"""Hugging Face checkpoints of the Llama family in and out: ``load_hf`` and ``save_hf``.

A checkpoint directory holds ``config.json`` and the weights in ``model.safetensors``, or
in shards listed by ``model.safetensors.index.json`` (a ``weight_map`` from tensor name to
file). Read: ``LlamaForCausalLM`` (with Llama 3 or linear rope scaling),
``MistralForCausalLM`` (sliding window), ``Qwen2ForCausalLM`` (q/k/v biases) and
``Qwen3ForCausalLM`` (q/k norms), tied or untied embeddings, into a
:class:`~jaxprune.models.Decoder` in float32 or bfloat16. The config fields of
transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and 5.x
(``rope_parameters``, ``dtype``) are both read. Tensors go through the ``safetensors``
package's numpy API (no torch); bfloat16 is ``ml_dtypes.bfloat16``.

Layout: a PyTorch ``Linear.weight`` is ``[out, in]``; the decoder's ``nnx.Linear``
kernel is its transpose ``[in, out]``. Names: ``model.embed_tokens.weight`` ->
``embed/embedding``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`` ->
``blocks/{i}/attn/{q,k,v,o}_proj/{kernel,bias}``, ``...self_attn.{q,k}_norm.weight`` ->
``.../attn/{q,k}_norm/scale``, ``...mlp.{gate,up,down}_proj.weight`` ->
``blocks/{i}/mlp/...``, ``...input_layernorm`` -> ``attn_norm``,
``...post_attention_layernorm`` -> ``mlp_norm``, ``model.norm`` -> ``norm``,
``lm_head.weight`` -> ``head/kernel`` (absent with ``tie_word_embeddings``).

:func:`save_hf` writes a model back with the same tensor names, shapes and dtypes (each
tensor in the dtype it was stored in, whatever dtype it was computed in), the same
shards and ``config.json`` byte for byte when the architecture did not change
(unstructured and N:M pruning). After uniform structured pruning (the same head counts
and MLP width in every block) or dropped blocks, ``config.json`` gets the new
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
``num_hidden_layers`` (and ``head_dim``); widths that differ between blocks cannot be
written in this format, and saving says so. Files are written atomically.

Examples:
  >>> import filecmp, tempfile
  >>> from jaxprune.models import hf
  >>> model, checkpoint = hf.load_hf("tests/fixtures/hf/qwen3")  # a tiny Qwen3 made by transformers
  >>> checkpoint.config.qk_norm, model.blocks[0].attn.q_proj.kernel.shape
  (True, (32, 64))
  >>> out = hf.save_hf(model, checkpoint, tempfile.mkdtemp())
  >>> filecmp.cmp(out / "model.safetensors", "tests/fixtures/hf/qwen3/model.safetensors", shallow=False)
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import tree as tree_lib
from jaxprune._extras import require
from jaxprune.models.decoder import Decoder, DecoderConfig, RopeScaling, config_of

require("safetensors", extra="llm", by="jaxprune.models.hf")

from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# Files of a checkpoint directory that save_hf copies along: the tokenizer and generation
# settings, so the written directory is a complete checkpoint.
COMPANIONS = (
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "special_tokens_map.json",
  "generation_config.json",
)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read or written as asked (names the file)."""


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
  """What :func:`load_hf` read besides the weights, and what :func:`save_hf` needs.

  Attributes:
    source: the directory read (``None``: made by :func:`new_checkpoint`).
    config: the architecture as a :class:`~jaxprune.models.DecoderConfig`.
    hf_config: ``config.json`` as a dict; ``config_text`` its exact text.
    dtypes: each tensor's stored dtype (``"float32"``, ``"bfloat16"``, ...), by name.
    weight_map: tensor name -> shard file (``None`` for a single ``model.safetensors``).
    metadata: each weight file's safetensors header metadata (``{"format": "pt"}``).
  """

  source: pathlib.Path | None
  config: DecoderConfig
  hf_config: Mapping[str, Any]
  config_text: str
  dtypes: Mapping[str, str]
  weight_map: Mapping[str, str] | None
  metadata: Mapping[str, Mapping[str, str]]


def _read_json(path: pathlib.Path) -> tuple[dict[str, Any], str]:
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file; a Hugging Face checkpoint has one.") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}.")
  return value, text


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


def _weight_files(directory: pathlib.Path) -> tuple[dict[str, str] | None, list[str]]:
  if (directory / INDEX).is_file():
    index, _ = _read_json(directory / INDEX)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{directory / INDEX}: no weight_map (tensor name -> file).")
    return dict(weight_map), sorted(set(weight_map.values()))
  if (directory / SINGLE).is_file():
    return None, [SINGLE]
  raise FileNotFoundError(
    f"{directory}: neither {SINGLE} nor {INDEX}; a Hugging Face checkpoint directory "
    "has one of them next to config.json."
  )


def load_hf(directory: str | os.PathLike, dtype: str = "float32") -> tuple[Decoder, HFCheckpoint]:
  """Reads a Hugging Face checkpoint directory of the Llama family into a :class:`Decoder`.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` or shards with
      ``model.safetensors.index.json``.
    dtype: ``"float32"`` or ``"bfloat16"``: every parameter is cast to it (and the
      model computes in it).

  Returns:
    ``(model, checkpoint)``: the NNX model and the :class:`HFCheckpoint` that
    :func:`save_hf` needs to write it back in the same format.

  Raises:
    FileNotFoundError: no ``config.json`` or weights.
    CheckpointError: an unsupported architecture or field, a missing, unexpected or
      misshapen tensor (naming the file and the tensor).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  source = pathlib.Path(directory)
  hf, text = _read_json(source / "config.json")
  config = decoder_config(hf, str(source / "config.json"))
  names = tensor_names(config)
  weight_map, files = _weight_files(source)
  abstract = nnx.eval_shape(lambda: config.make(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shapes = {p: tuple(leaf.shape) for p, leaf in tree_lib.leaves_with_paths(state)}
  values: dict[str, jax.Array] = {}
  dtypes: dict[str, str] = {}
  metadata: dict[str, dict[str, str]] = {}
  for file in files:
    path = source / file
    if not path.is_file():
      raise FileNotFoundError(f"{path}: listed in {INDEX} but missing.")
    try:
      handle = safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
    with handle as f:
      metadata[file] = dict(f.metadata() or {})
      for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
        if _IGNORED.search(name):
          continue
        if name not in names:
          raise CheckpointError(
            f"{path}: unexpected tensor {name!r} for a {hf['architectures'][0]} with "
            f"{config.depth} layers (a field of config.json this reader does not support?)."
          )
        array = f.get_tensor(name)
        param, transposed = names[name]
        array = array.T if transposed else array
        if tuple(array.shape) != shapes[param]:
          raise CheckpointError(
            f"{path}: tensor {name!r} has shape {tuple(f.get_slice(name).get_shape())}, "
            f"config.json implies {shapes[param][::-1] if transposed else shapes[param]}."
          )
        dtypes[name] = str(array.dtype)
        values[param] = jnp.asarray(array, DTYPES[dtype])
  missing = [n for n, (p, _) in names.items() if p not in values]
  if missing:
    raise CheckpointError(f"{source}: missing tensors {missing[:5]} ({len(missing)} in all).")
  state = jax.tree_util.tree_map_with_path(lambda path, _: values[tree_lib.path_str(path)], state)
  checkpoint = HFCheckpoint(source, config, hf, text, dtypes, weight_map, metadata)
  return nnx.merge(graphdef, state), checkpoint


def new_checkpoint(
  config: DecoderConfig, *, dtype: str = "float32", max_position_embeddings: int = 2048
) -> HFCheckpoint:
  """A ``LlamaForCausalLM`` (or Qwen2 / Qwen3) ``config.json`` for a model made in jaxprune.

  With it :func:`save_hf` writes e.g. a trained ``charlm`` as a Hugging Face checkpoint
  that :func:`load_hf` and ``transformers`` read: Llama for the plain decoder, Qwen2 for
  q/k/v biases without an output bias, Qwen3 for q/k norms.

  Raises:
    CheckpointError: options no supported architecture has together, per-block widths.

  Examples:
    >>> from jaxprune.models import DecoderConfig
    >>> ck = new_checkpoint(DecoderConfig(50, dim=32, depth=2, num_heads=4, mlp_dim=48))
    >>> ck.hf_config["architectures"], decoder_config(ck.hf_config) == ck.config
    (['LlamaForCausalLM'], True)
  """
  heads, kv_heads, mlp_dim = _uniform_widths(config)
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  if config.qk_norm:
    arch, model_type = "Qwen3ForCausalLM", "qwen3"
  elif config.qkv_bias and not config.o_bias:
    arch, model_type = "Qwen2ForCausalLM", "qwen2"
  else:
    arch, model_type = "LlamaForCausalLM", "llama"
  if config.sliding_window is not None:
    arch, model_type = "MistralForCausalLM", "mistral"
    if config.qk_norm or config.qkv_bias or config.o_bias:
      raise CheckpointError("new_checkpoint: a sliding window with biases or q/k norms.")
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
  if config != decoder_config(hf, "new_checkpoint"):
    raise CheckpointError(f"new_checkpoint: no {arch} config expresses {config}.")
  names = tensor_names(config)
  text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
  return HFCheckpoint(None, config, hf, text, dict.fromkeys(names, dtype), None, {})


@contextlib.contextmanager
def _replacing(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to ``path``; on success fsyncs it and renames it to ``path``."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_text(path: pathlib.Path, text: str) -> None:
  with _replacing(path) as tmp:
    tmp.write_text(text)


def _uniform_widths(config: DecoderConfig) -> tuple[int, int, int]:
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
      f"save_hf: the Hugging Face format has one width for all layers, but this model has "
      f"{listed}. Prune the same number of heads / neurons in every block to save it in "
      "this format, or save the params with jaxprune's own checkpoint."
    )
  return int(config.num_heads), int(config.num_kv_heads), int(config.mlp_dim)  # type: ignore[arg-type]


def updated_config(checkpoint: HFCheckpoint, config: DecoderConfig) -> dict[str, Any]:
  """``config.json`` of ``checkpoint`` with the widths and depth of ``config``.

  Raises:
    CheckpointError: widths that differ between blocks, or an option (biases, norms,
      rotary, window, tied embeddings, vocabulary, hidden size) that differs from the
      checkpoint's: those are not what pruning changes.
  """
  heads, kv_heads, mlp_dim = _uniform_widths(config)
  old = checkpoint.config
  fixed = ("vocab_size", "dim", "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "o_bias",
           "qk_norm", "sliding_window", "tie_embeddings")  # fmt: skip
  changed = [f for f in fixed if getattr(config, f) != getattr(old, f)]
  if changed:
    raise CheckpointError(
      f"save_hf: the model's {changed} differ from the checkpoint's config.json; only the "
      "head counts, the MLP width and the number of layers can change."
    )
  hf = dict(checkpoint.hf_config)
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


def _stored_dtype(name: str, dtypes: Mapping[str, str]) -> str:
  if name in dtypes:
    return dtypes[name]
  role = re.sub(r"\.layers\.\d+\.", ".layers.0.", name)
  return dtypes.get(role, "float32")


def save_hf(
  model: Decoder | nnx.State, checkpoint: HFCheckpoint, directory: str | os.PathLike
) -> pathlib.Path:
  """Writes ``model`` as a Hugging Face checkpoint in the format ``checkpoint`` was read from.

  The same tensor names, shapes (after structural changes: the new ones) and stored
  dtypes, the same shard files, and ``config.json`` unchanged unless the architecture
  changed (:func:`updated_config`). The tokenizer and generation files of the source
  directory (:data:`COMPANIONS`) are copied along. Every file is written atomically.

  Args:
    model: a :class:`Decoder` (e.g. pruned, shrunk, blocks dropped), or the
      ``nnx.Param`` state of one with the checkpoint's architecture.
    checkpoint: what :func:`load_hf` returned with the model.
    directory: where to write (created; may be the source only if you mean it).

  Returns:
    The directory.

  Raises:
    CheckpointError: per-block widths the format cannot express (naming them), or an
      architecture option that differs from the checkpoint's.
  """
  if not isinstance(model, Decoder):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: checkpoint.config.make(nnx.Rngs(0))))
    model = nnx.merge(graphdef, model)
  assert isinstance(model, Decoder)
  config = config_of(model)
  hf = updated_config(checkpoint, config)
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  params = dict(tree_lib.leaves_with_paths(nnx.state(model, nnx.Param)))
  tensors: dict[str, np.ndarray] = {}
  for name, (param, transposed) in tensor_names(config).items():
    dtype = _stored_dtype(name, checkpoint.dtypes)
    array = np.asarray(jnp.asarray(params[param]).astype(jnp.dtype(dtype)))
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  if checkpoint.weight_map is None:
    shards = {SINGLE: tensors}
  else:
    shards: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
      last = sorted(set(checkpoint.weight_map.values()))[-1]
      shards.setdefault(checkpoint.weight_map.get(name, last), {})[name] = array
  for file, part in shards.items():
    with _replacing(out / file) as tmp:
      save_file(part, str(tmp), metadata=dict(checkpoint.metadata.get(file) or {"format": "pt"}))
  if checkpoint.weight_map is not None:
    index = {
      "metadata": {
        "total_parameters": sum(a.size for a in tensors.values()),
        "total_size": sum(a.nbytes for a in tensors.values()),
      },
      "weight_map": {n: f for f, part in shards.items() for n in sorted(part)},
    }
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    _write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
  same = hf == dict(checkpoint.hf_config)
  _write_text(
    out / "config.json",
    checkpoint.config_text if same else json.dumps(hf, indent=2, sort_keys=True) + "\n",
  )
  source = checkpoint.source
  for name in COMPANIONS:
    if source is None or not (source / name).is_file():
      continue
    if (source / name).resolve() != (out / name).resolve():
      with _replacing(out / name) as tmp:
        shutil.copyfile(source / name, tmp)
  return out
