"""Experiment configs: defaults, file loading, command-line overrides, validation.

A recipe in ``configs/`` is a Python file with ``get_config()`` returning an
``ml_collections.ConfigDict``, usually :func:`default_config` with a few fields changed.
:func:`load_config` imports it, applies ``field=value`` overrides and validates every
field, so a typo or a bad value fails before any data is loaded. The optimizer and the
pruner are built from a config in :mod:`jaxprune.train.optim` (re-exported here).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

import jaxprune
from jaxprune import tree as tree_lib
from jaxprune.train import data, models, schema, structured, text, tfds_source
from jaxprune.train import optim as optim_lib
from jaxprune.train.config_type import Config
from jaxprune.train.optim import (
  make_learning_rate,
  make_optimizer,
  make_pruner,
  make_regularizer,
  make_schedule,
)

__all__ = [
  "ConfigError",
  "apply_override",
  "check_fields",
  "config_json",
  "default_config",
  "digits_convnet_config",
  "configure",
  "load_config",
  "read_config",
  "make_learning_rate",
  "make_optimizer",
  "make_pruner",
  "make_schedule",
  "validate_config",
]

FREE_FORM = schema.FREE_FORM  # groups whose keys the user chooses
PLACEHOLDER_SHAPE = (32, 32, 3)  # builds a model for a TFDS dataset not loaded yet


class ConfigError(ValueError):
  """A config field is unknown or has a bad value; the message starts with the field."""


def default_config() -> Config:
  """Every config field with its default: recipes in ``configs/`` start from this.

  The pruning steps follow ``train.steps`` (``begin = steps // 3``, ``end = 2 * steps //
  3``, ``every = ceil(steps / 30)``) until a recipe or an override sets them. Each
  field's default, check and help are in :data:`jaxprune.train.schema.FIELDS`.

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.default_config()
    >>> config.train.steps = 300
    >>> config.prune.begin, config.prune.end, config.prune.every
    (100, 200, 10)
  """
  return schema.defaults()


def config_json(config: Config) -> dict[str, Any]:
  """The config as plain JSON data (references resolved): ``config.json`` of a run."""
  return json.loads(config.to_json_best_effort())


def digits_convnet_config() -> Config:
  """:func:`default_config` for ``vgg_small`` on the 8x8 digits: the channel recipes' base.

  conv-BN-ReLU 16/32/64 + Dense, batch 64, Adam 3e-3, 1,500 steps, one channel-pruning
  step at 1,000 (``one_shot``), evaluation every 250 steps.

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.digits_convnet_config()
    >>> config.model.name, config.data.name, config.prune.begin
    ('vgg_small', 'digits', 1000)
  """
  config = default_config()
  config.data.update(name="digits", batch_size=64)
  config.model.name = "vgg_small"
  config.train.update(steps=1500, learning_rate=3e-3, eval_every=250)
  config.prune.update(schedule="one_shot", begin=1000)
  return config


def dynamic_sparse_config(method: str) -> Config:
  """:func:`default_config` for SET / RigL on LeNet-300-100 / mnist5k: their recipes' base.

  90% per layer with ERK from step 0, 3,000 Adam steps (1e-3); masks move every 100 steps
  (dT) until step 2,250 (T_end, 75% of training) with drop fraction 0.3 (cosine decay).

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.dynamic_sparse_config("rigl")
    >>> config.prune.method, config.prune.distribution, config.prune.end
    ('rigl', 'erk', 2250)
  """
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.update(steps=3000, learning_rate=1e-3)
  config.prune.update(method=method, sparsity=0.9, distribution="erk")
  config.prune.update(every=100, end=2250, drop_fraction=0.3)  # dT, T_end, f0
  return config


def _unknown(field: str, key: str, known: Iterable[str]) -> ConfigError:
  known = list(known)
  close = difflib.get_close_matches(key, known, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"{field}: unknown config field{hint}; known here: {', '.join(known)}.")


def check_fields(config: Config, reference: Any = None, prefix: str = "") -> None:
  """Raises :class:`ConfigError` naming the first field that :func:`default_config` lacks."""
  reference = default_config() if reference is None else reference
  for key in config:
    field = f"{prefix}{key}"
    if key not in reference:
      raise _unknown(field, key, reference)
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f"{field}: must be a group of fields, got {config[key]!r}.")
      if field not in FREE_FORM:
        check_fields(config[key], reference[key], f"{field}.")


def _parse(text: str, current: Any) -> Any:
  if isinstance(current, str):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
    return value if isinstance(value, str) else text
  if isinstance(current, bool):
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    return words.get(text.lower(), text)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: Config, assignment: str) -> None:
  """Sets one field from ``"train.steps=200"`` text (the ``--config.`` prefix removed).

  The value is read as a Python literal and must fit the field's type; a dict replaces
  a group (``prune.overrides={'fc3': 0.5}``); new keys may be added to
  ``prune.overrides`` only.

  Raises:
    ConfigError: naming an unknown field or a value of the wrong type.

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.default_config()
    >>> config_lib.apply_override(config, "train.steps=90")
    >>> config_lib.apply_override(config, "prune.overrides.fc3=0.5")
    >>> config.train.steps, config.prune.end, config.prune.overrides.fc3
    (90, 60, 0.5)
  """
  field, sep, text = assignment.partition("=")
  if not sep:
    raise ConfigError(f"{field}: no value given; write --config.{field}=VALUE.")
  *groups, name = field.split(".")
  node, path = config, ""
  for group in groups:
    if group not in node:
      raise _unknown(f"{path}{group}", group, node)
    node, path = node[group], f"{path}{group}."
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"{path[:-1]}: is a value, not a group of fields; cannot set {field!r}.")
  if name not in node and path[:-1] not in FREE_FORM:
    raise _unknown(field, name, node)
  current = node.get(name)
  value = _parse(text, current)
  try:
    node[name] = value
  except TypeError as e:
    kind = type(current).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    raise ConfigError(
      f"{field}: cannot set {text!r}; it needs {article} {kind} like its current value {current!r}."
    ) from e


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
  """Imports ``get_config()`` from a config file, applies overrides, validates.

  Args:
    path: a Python file defining ``get_config() -> Config``.
    overrides: ``"field=value"`` texts, applied in order (see :func:`apply_override`).

  Returns:
    The validated config.

  Raises:
    FileNotFoundError: when there is no such file.
    ConfigError: for a file without ``get_config``, or an unknown or bad field.

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.load_config("configs/lenet300_agp.py", ["data.name=digits"])
    >>> config.data.name, config.prune.schedule
    ('digits', 'agp')
  """
  return configure(read_config(path), overrides)


def configure(config: Config, overrides: Sequence[str] = ()) -> Config:
  """``config`` (as :func:`read_config` gives it) with ``overrides`` applied, validated."""
  for assignment in overrides:
    apply_override(config, assignment)
  validate_config(config)
  return config


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The ``ConfigDict`` that a config file's ``get_config()`` returns, not yet validated.

  Raises:
    FileNotFoundError: when there is no such file.
    ConfigError: for a file without ``get_config``, or one returning no ``ConfigDict``.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No config file {str(path)!r}.")
  spec = importlib.util.spec_from_file_location(f"_jaxprune_config_{path.stem}", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{path}: cannot be loaded as a Python module.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path}: a config file must define get_config().")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict.")
  return config


def validate_config(config: Config) -> None:
  """Checks every field before any work starts.

  Raises:
    ConfigError: naming the unknown or badly valued field.

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.default_config()
    >>> config.prune.sparsity = 1.5
    >>> config_lib.validate_config(config)
    Traceback (most recent call last):
    ...
    jaxprune.train.config.ConfigError: prune.sparsity: must be in [0, 1) (the fraction of weights removed), got 1.5.
  """
  check_fields(config)
  bad = schema.check(config)
  if bad is not None:
    raise ConfigError(f"{bad[0]}: {bad[1]}")

  def fail(field, message):
    raise ConfigError(f"{field}: {message}")

  d, m, t, p = config.data, config.model, config.train, config.prune
  r, par, reg = config.rethink, config.parallel, config.regularize
  if d.name not in data.names() and not tfds_source.is_tfds_name(d.name):
    fail(
      "data.name",
      f"must be one of {', '.join(map(repr, data.names()))} or a TFDS dataset name "
      f"(mnist, cifar10, ...); got {d.name!r}.",
    )
  _check_language_model(config)
  if m.width != 1 and m.name not in models.SCALABLE:
    fail("model.width", f"{m.name} has fixed layer widths; must be 1.0, got {m.width!r}.")
  n_devices = par.devices or jax.device_count()
  if n_devices > jax.device_count():
    fail("parallel.devices", f"asks for {n_devices} devices; there are {jax.device_count()}.")
  for field, size in (
    ("data.batch_size", d.batch_size),
    ("data.eval_batch_size", d.eval_batch_size),
  ):
    if size % n_devices or size % jax.process_count():
      fail(field, f"{size} does not split evenly over {n_devices} devices.")
  if structured.is_channel_method(config):
    if p.schedule != "one_shot":
      fail(
        "prune.schedule",
        f"{p.method} removes channels once, at prune.begin: set it to 'one_shot', "
        f"got {p.schedule!r}.",
      )
    if p.method == "apoz" and not p.layers:
      fail("prune.layers", "apoz needs the regex of the layers to measure, e.g. '^features/\\d+$'.")
    if p.method == "ssl" and reg.method != "group_lasso":
      fail("regularize.method", f"ssl removes the groups group_lasso zeroes; got {reg.method!r}.")
    if p.method == "slimming" and reg.method != "l1":
      fail(
        "regularize.method",
        f"slimming needs the L1 penalty on the scales ('l1'); got {reg.method!r}.",
      )
    if r.enabled:
      fail("rethink.enabled", f"the rethinking phase supports the weight pruners, not {p.method}.")
  if p.method == "autopruner":
    _check_autopruner(config)
    return
  for pattern, value in p.overrides.items():
    message = schema.fraction(value)
    if message is not None:
      fail(f"prune.overrides[{pattern!r}]", message)
  if r.enabled and p.method == "none":
    fail("rethink.enabled", "needs a pruned run to copy the masks from; prune.method is 'none'.")
  sparse_trainer = p.method in optim_lib.SPARSE_TRAINERS
  if p.schedule == "lottery" and p.method not in optim_lib.PRUNERS:
    fail(
      "prune.schedule",
      f"lottery prunes with a pruner ({' | '.join(optim_lib.PRUNERS)}), not {p.method!r}.",
    )
  if p.schedule == "lottery" and r.enabled and r.seed == t.seed:
    fail(
      "rethink.seed",
      f"equals train.seed ({t.seed}): the random re-init of the ticket's masks would be "
      "its own initial weights (the ticket rewound to step 0); choose another seed.",
    )
  if p.schedule == "lottery" and p.rewind >= p.begin:
    fail(
      "prune.rewind",
      f"the survivors rewind to a step before the first round (prune.begin = {p.begin}), "
      f"got {p.rewind}.",
    )
  if sparse_trainer and p.method != "static" and p.end >= t.steps:
    fail("prune.end", f"set / rigl stop moving masks there: below train.steps ({t.steps}).")
  if sparse_trainer and p.method != "static" and p.every >= p.end:
    fail(
      "prune.every",
      f"{p.method} moves masks every prune.every steps before prune.end ({p.end}); with "
      f"prune.every = {p.every} they never move: lower prune.every or raise prune.end.",
    )
  if p.method != "none" and p.schedule != "constant" and not sparse_trainer:
    if p.schedule in ("agp", "acdc") and p.end < p.begin:
      fail("prune.end", f"must not come before prune.begin ({p.begin}), got {p.end}.")
    field, last = {
      "agp": ("prune.end", p.end),
      "one_shot": ("prune.begin", p.begin),
      "iterative": ("prune.rounds", p.begin + (p.rounds - 1) * p.every),
      "lottery": ("prune.rounds", p.begin + (p.rounds - 1) * p.every),
      "acdc": ("prune.end", p.end),
    }[p.schedule]
    if last >= t.steps:
      fail(
        field,
        f"the last pruning step is {last}, but training stops before step "
        f"train.steps = {t.steps}; lower {field} or raise train.steps.",
      )
  _check_patterns(config)
  _check_split_sizes(config)
  _check_against_model(config)


def _check_language_model(config: Config) -> None:
  """A language model reads text and text needs one; its head counts fit its widths."""
  d, m = config.data, config.model
  is_lm, is_text = m.name in models.LANGUAGE_MODELS, d.name == text.NAME
  if is_lm != is_text:
    raise ConfigError(
      f"model.name: {m.name} " + ("reads token ids: set data.name='pydoc_topics'" if is_lm
      else f"does not read text; {d.name} is for language models (model.name='charlm')")
      + f", got data.name={d.name!r}."
    )  # fmt: skip
  if not is_lm:
    return
  if m.heads % m.kv_heads:
    raise ConfigError(
      f"model.kv_heads: {m.kv_heads} key/value heads must divide model.heads ({m.heads})."
    )
  if m.dim % m.heads or (m.dim // m.heads) % 2:
    raise ConfigError(
      f"model.heads: model.dim ({m.dim}) / {m.heads} heads must be an even integer "
      "(the head width, rotated in pairs by the rotary embedding)."
    )


def _check_autopruner(config: Config) -> None:
  """AutoPruner trains its own gated net: the fields of the other methods must stay off."""
  a = config.autopruner
  if config.regularize.method != "none":
    raise ConfigError(
      f"regularize.method: autopruner's gates are its regularizer; got "
      f"{config.regularize.method!r}, set it to 'none'."
    )
  if config.rethink.enabled:
    raise ConfigError("rethink.enabled: the rethinking phase supports the weight pruners.")
  if a.alpha_mode == "geometric" and a.alpha_start == 0:
    raise ConfigError("autopruner.alpha_start: a geometric alpha needs a start > 0, got 0.")
  if a.alpha_start > a.alpha_end:
    raise ConfigError(
      f"autopruner.alpha_start: must not exceed alpha_end ({a.alpha_end}), got {a.alpha_start}."
    )
  shape = data.IMAGE_SHAPES.get(config.data.name)
  if shape is not None and shape[0] % 2 ** len(a.widths):
    raise ConfigError(
      f"autopruner.widths: {len(a.widths)} gated convs halve the {shape[0]}x{shape[0]} "
      f"images of {config.data.name} {len(a.widths)} times; use fewer."
    )
  _check_split_sizes(config)


def _check_patterns(config: Config) -> None:
  """Every regex field compiles."""
  patterns = [(f"prune.overrides[{k!r}]", k) for k in config.prune.overrides]
  patterns += [("regularize.where", config.regularize.where), ("prune.layers", config.prune.layers)]
  for field, pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"{field}: {pattern!r} is not a valid regular expression ({e}).") from e


def _check_split_sizes(config: Config) -> None:
  """The batch fits the training split of an embedded dataset (known without loading it)."""
  size = data.TRAIN_SIZES.get(config.data.name)
  if size is not None and config.data.batch_size > size:
    raise ConfigError(
      f"data.batch_size: {config.data.batch_size} is larger than the training split of "
      f"{config.data.name} ({size} examples)."
    )


@functools.cache
def _abstract_model(
  name: str, image_shape: tuple[int, ...], width: float, sizes: tuple[tuple[str, int], ...]
) -> Any:
  return nnx.eval_shape(
    lambda: models.create(name, image_shape, 10, width=width, sizes=dict(sizes))
  )


def _check_against_model(config: Config) -> None:
  """The param and layer patterns match the model; the pruner and regularizer accept it.

  Built from shapes only (``nnx.eval_shape``), with the image shape of an embedded
  dataset, or a placeholder for a TFDS one (the param paths do not depend on it).
  """
  d, m, p, reg = config.data, config.model, config.prune, config.regularize
  shape = data.IMAGE_SHAPES.get(d.name)
  if m.name in models.LANGUAGE_MODELS:
    shape = (d.seq_len,)
  sizes = tuple(models.lm_sizes(m).items())
  try:
    model = _abstract_model(m.name, shape or PLACEHOLDER_SHAPE, float(m.width), sizes)
  except ValueError as e:
    if shape is None:
      return  # the TFDS images' shape is not known before loading; checked then
    raise ConfigError(f"model.name: {m.name} cannot take the {d.name} images: {e}") from e
  params = nnx.state(model, nnx.Param)
  if structured.is_channel_method(config) and p.method == "apoz":
    layers = [
      "/".join(map(str, path))
      for path, node in nnx.iter_graph(model)
      if path and isinstance(node, nnx.Module)
    ]
    if not any(tree_lib.matches(p.layers, layer) for layer in layers):
      raise ConfigError(
        f"prune.layers: {p.layers!r} matches none of the layers of {m.name}: {', '.join(layers)}."
      )
  if reg.method != "none":
    regularizer = make_regularizer(config, make_learning_rate(config, config.train.steps))
    if regularizer is None:  # make_regularizer returns one for every method but "none"
      raise ConfigError(f"regularize.method: no regularizer for {reg.method!r}.")
    try:
      jax.eval_shape(regularizer.init, params)
    except ValueError as e:
      raise ConfigError(f"regularize.{'where' if reg.where else 'method'}: {e}") from e
  pruner = make_pruner(config)
  if pruner is None:
    return
  if pruner.distribution is not None:  # per-layer sparsities: every layer keeps a weight
    try:
      pruner.resolve(params)
    except ValueError as e:
      raise ConfigError(f"prune.sparsity: {e}") from e
  for field, candidate in (
    (
      "prune.structure" if p.structure != "unstructured" else "prune.method",
      dataclasses.replace(pruner, overrides={}),
    ),
    ("prune.overrides", pruner),
  ):
    try:
      jax.eval_shape(jaxprune.masked(optax.identity(), candidate).init, params)
    except ValueError as e:
      raise ConfigError(f"{field}: {e}") from e
