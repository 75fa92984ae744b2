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

import dataclasses
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxprune import fileio
from jaxprune import tree as tree_lib
from jaxprune._extras import require
from jaxprune.models.decoder import Decoder, DecoderConfig, RopeScaling, config_of
from jaxprune.models.hf_config import (
  ARCHITECTURES,
  CheckpointError,
  decoder_config,
  hf_config_of,
  resized_config,
  tensor_names,
)

require("safetensors", extra="llm", by="jaxprune.models.hf")

from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

__all__ = [
  "ARCHITECTURES",
  "CheckpointError",
  "COMPANIONS",
  "HFCheckpoint",
  "INDEX",
  "RopeScaling",
  "SINGLE",
  "decoder_config",
  "hf_config_of",
  "load_hf",
  "new_checkpoint",
  "resized_config",
  "save_hf",
  "tensor_names",
]

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


def load_hf(
  directory: str | os.PathLike,
  dtype: str = "float32",
  *,
  mesh: Mesh | None = None,
  axis: str | None = None,
) -> tuple[Decoder, HFCheckpoint]:
  """Reads a Hugging Face checkpoint directory of the Llama family into a :class:`Decoder`.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` or shards with
      ``model.safetensors.index.json``.
    dtype: ``"float32"`` or ``"bfloat16"``: every parameter is cast to it (and the
      model computes in it).
    mesh: each tensor goes from the file straight to its shards on this mesh, in the
      layout :func:`jaxprune.posttrain.prune` uses over it (a projection kernel split
      along its outputs, the embedding along its larger divisible axis, norms
      replicated), so no device ever holds the whole model. ``None``: one device.
    axis: the mesh axis to split over (default: the mesh's only axis).

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
  place = _placer(mesh, axis)
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
        values[param] = place(param, np.asarray(array).astype(DTYPES[dtype]))
  missing = [n for n, (p, _) in names.items() if p not in values]
  if missing:
    raise CheckpointError(f"{source}: missing tensors {missing[:5]} ({len(missing)} in all).")
  state = jax.tree_util.tree_map_with_path(lambda path, _: values[tree_lib.path_str(path)], state)
  checkpoint = HFCheckpoint(source, config, hf, text, dtypes, weight_map, metadata)
  return nnx.merge(graphdef, state), checkpoint


def _placer(mesh: Mesh | None, axis: str | None) -> Callable[[str, np.ndarray], jax.Array]:
  """``place(path, array)``: the array on one device, or split over ``mesh`` as
  :func:`jaxprune.posttrain.sharded.leaf_spec` splits it (a Decoder's ``kernel`` is an
  ``[in, out]`` linear weight; anything else takes the rule for non-linear arrays)."""
  if mesh is None:
    return lambda path, array: jnp.asarray(array)
  from jaxprune.posttrain import sharded  # posttrain imports surgery: only when asked
  from jaxprune.surgery.linear import Layer

  axis = sharded.check_axes(mesh, axis, None)[0]
  size = int(mesh.shape[axis])

  def place(path: str, array: np.ndarray) -> jax.Array:
    kernel = path.endswith("/kernel") and array.ndim == 2
    layer = Layer(path, array.shape, (0,), (), ()) if kernel else None
    return jax.device_put(array, NamedSharding(mesh, sharded.leaf_spec(array, layer, axis, size)))

  return place


def new_checkpoint(
  config: DecoderConfig, *, dtype: str = "float32", max_position_embeddings: int = 2048
) -> HFCheckpoint:
  """An :class:`HFCheckpoint` for a model made in jaxprune (:func:`hf_config_of`'s config).

  With it :func:`save_hf` writes e.g. a trained ``charlm`` as a Hugging Face checkpoint
  that :func:`load_hf` and ``transformers`` read.

  Raises:
    CheckpointError: options no supported architecture has together, per-block widths.

  Examples:
    >>> from jaxprune.models import DecoderConfig
    >>> ck = new_checkpoint(DecoderConfig(50, dim=32, depth=2, num_heads=4, mlp_dim=48))
    >>> ck.hf_config["architectures"], decoder_config(ck.hf_config) == ck.config
    (['LlamaForCausalLM'], True)
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  hf = hf_config_of(config, dtype=dtype, max_position_embeddings=max_position_embeddings)
  names = tensor_names(config)
  text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
  return HFCheckpoint(None, config, hf, text, dict.fromkeys(names, dtype), None, {})


def _write_text(path: pathlib.Path, text: str) -> None:
  fileio.write_text(path, text)


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
  changed (:func:`~jaxprune.models.hf_config.resized_config`). The tokenizer and generation files of the source
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
  hf = resized_config(checkpoint.hf_config, checkpoint.config, config)
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
    with fileio.atomic_path(out / file) as tmp:
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
      with fileio.atomic_path(out / name) as tmp:
        shutil.copyfile(source / name, tmp)
  return out
