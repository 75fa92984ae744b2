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
from jaxprune.regularizers import GROUP_KINDS
from jaxprune.train import data, models, structured, tfds_source
from jaxprune.train.optim import (
  LR_SCHEDULES,
  OPTIMIZERS,
  PRUNERS,
  REGULARIZERS,
  SCHEDULES,
  STRUCTURES,
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
  "load_config",
  "make_learning_rate",
  "make_optimizer",
  "make_pruner",
  "make_schedule",
  "validate_config",
]

AUGMENTATIONS = ("none", "flip_crop")
FREE_FORM = ("prune.overrides",)  # groups whose keys the user chooses
PLACEHOLDER_SHAPE = (32, 32, 3)  # builds a model for a TFDS dataset not loaded yet


class ConfigError(ValueError):
  """A config field is unknown or has a bad value; the message starts with the field."""


def default_config() -> ml_collections.ConfigDict:
  """Every config field with its default: recipes in ``configs/`` start from this.

  The pruning steps follow ``train.steps`` (``begin = steps // 3``, ``end = 2 * steps //
  3``, ``every = ceil(steps / 30)``) until a recipe or an override sets them.

  Examples:
    >>> from jaxprune.train import config as config_lib
    >>> config = config_lib.default_config()
    >>> config.train.steps = 300
    >>> config.prune.begin, config.prune.end, config.prune.every
    (100, 200, 10)
  """
  config = ml_collections.ConfigDict()
  config.data = dict(
    name="mnist5k",  # mnist5k | digits (embedded) | any TFDS name (mnist, cifar10, ...)
    batch_size=128,  # the global batch, split over devices and processes
    eval_batch_size=512,
    data_dir="",  # TFDS data_dir ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
    download=False,  # let TFDS download a missing dataset (needs network)
    train_split="train",
    test_split="test",
    augment="none",  # none | flip_crop (random crop + flip, for CIFAR)
  )
  config.model = dict(name="lenet300", width=1.0)  # width: channel multiplier (conv nets)
  config.train = dict(
    steps=3000,
    optimizer="adam",  # adam | sgd (Nesterov momentum 0.9)
    learning_rate=1e-3,
    lr_schedule="constant",  # constant | cosine (to 0 at train.steps)
    warmup_steps=0,
    seed=0,
    eval_every=500,
    log_every=50,
    progress=True,
    workdir="",  # metrics.csv, TensorBoard events, params.npz, report.md ("": none)
  )
  steps = config.train.get_ref("steps")
  config.prune = dict(
    # magnitude | random | saliency | none, or a channel method (jaxprune.train.structured,
    # at prune.begin): l1_filter | slimming | apoz | ssl
    method="magnitude",
    scope="layer",  # layer | global (slimming: global = one |gamma| threshold)
    schedule="agp",  # agp | one_shot | iterative | constant
    structure="unstructured",  # unstructured | neurons | filters | channels
    sparsity=0.9,
    begin=steps // 3,  # agp: first update; one_shot: the step; iterative: first round
    end=steps * 2 // 3,  # agp: last update (the final sparsity is reached here)
    every=(steps + 29) // 30,  # agp: steps between updates; iterative: between rounds
    rounds=3,  # iterative: rounds, each removing the same fraction of what is left
    overrides=ml_collections.ConfigDict(),  # {path regex: sparsity}, e.g. {"fc3": 0.5}
    dense_first=False,
    dense_last=False,
    ratios="uniform",  # l1_filter: uniform (prune.sparsity) | sensitivity (per-group sweep)
    layers="",  # apoz: regex of the modules whose ReLU outputs are counted
  )
  config.regularize = dict(
    method="none",  # none | group_lasso (SSL) | l1 (slimming: BatchNorm scales)
    strength=0.0,  # lambda; until prune.begin for the channel methods
    groups=("channel",),  # group_lasso: filter | channel | shape | depth
    where="",  # regex of the params ("": kernels for group_lasso, BN scales for l1)
  )
  config.sensitivity = dict(
    grid=(0.0, 0.25, 0.5, 0.75),  # sparsities tried per layer / channel group
    max_drop=0.01,  # l1_filter ratios: the largest sparsity within this accuracy drop
    examples=1000,  # the validation slice: the last training examples
  )
  config.rethink = dict(
    enabled=False,  # then also train the pruned net from scratch (Liu et al. 2019)
    steps=0,  # 0: as many steps as train.steps
    seed=1,  # seeds the re-initialisation
  )
  config.checkpoint = dict(
    dir="",  # "": <train.workdir>/checkpoints, or no checkpoints without a workdir
    every=500,  # steps between checkpoints (and one at the end of each phase)
    keep=3,  # the newest checkpoints kept
  )
  config.parallel = dict(
    devices=0,  # devices of the data-parallel mesh (0: all)
    shard_params=False,  # FSDP: shard each kernel's largest divisible axis over devices
  )
  return config


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (references resolved): ``config.json`` of a run."""
  return json.loads(config.to_json_best_effort())


def digits_convnet_config() -> ml_collections.ConfigDict:
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


def _unknown(field: str, key: str, known: Iterable[str]) -> ConfigError:
  known = list(known)
  close = difflib.get_close_matches(key, known, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"{field}: unknown config field{hint}; known here: {', '.join(known)}.")


def check_fields(
  config: ml_collections.ConfigDict, reference: Any = None, prefix: str = ""
) -> None:
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


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
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


def load_config(
  path: str | os.PathLike, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """Imports ``get_config()`` from a config file, applies overrides, validates.

  Args:
    path: a Python file defining ``get_config() -> ml_collections.ConfigDict``.
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
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No config file {str(path)!r}.")
  spec = importlib.util.spec_from_file_location(f"_jaxprune_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path}: a config file must define get_config().")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict.")
  for assignment in overrides:
    apply_override(config, assignment)
  validate_config(config)
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
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

  def fail(field, message):
    raise ConfigError(f"{field}: {message}")

  def integer(field, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      fail(field, f"must be an integer >= {low}, got {value!r}.")

  def choice(field, value, options):
    if value not in options:
      fail(field, f"must be one of {', '.join(map(repr, options))}; got {value!r}.")

  def fraction(field, value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
      fail(field, f"must be in [0, 1) (the fraction of weights removed), got {value!r}.")

  def flag(field, value):
    if not isinstance(value, bool):
      fail(field, f"must be True or False, got {value!r}.")

  def text(field, value):
    if not isinstance(value, str):
      fail(field, f"must be a string, got {value!r}.")

  def positive(field, value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
      fail(field, f"must be a number > 0, got {value!r}.")

  d, m, t, p = config.data, config.model, config.train, config.prune
  r, c, par = config.rethink, config.checkpoint, config.parallel
  reg, sens = config.regularize, config.sensitivity
  text("data.name", d.name)
  integer("data.batch_size", d.batch_size, 1)
  integer("data.eval_batch_size", d.eval_batch_size, 1)
  text("data.data_dir", d.data_dir)
  flag("data.download", d.download)
  text("data.train_split", d.train_split)
  text("data.test_split", d.test_split)
  choice("data.augment", d.augment, AUGMENTATIONS)
  if d.name not in data.names() and not tfds_source.is_tfds_name(d.name):
    fail(
      "data.name",
      f"must be one of {', '.join(map(repr, data.names()))} or a TFDS dataset name "
      f"(mnist, cifar10, ...); got {d.name!r}.",
    )
  choice("model.name", m.name, models.names())
  positive("model.width", m.width)
  if m.width != 1 and m.name not in models.SCALABLE:
    fail("model.width", f"{m.name} has fixed layer widths; must be 1.0, got {m.width!r}.")
  integer("train.steps", t.steps, 1)
  choice("train.optimizer", t.optimizer, OPTIMIZERS)
  positive("train.learning_rate", t.learning_rate)
  choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
  integer("train.warmup_steps", t.warmup_steps, 0)
  integer("train.seed", t.seed, 0)
  integer("train.eval_every", t.eval_every, 1)
  integer("train.log_every", t.log_every, 1)
  flag("train.progress", t.progress)
  text("train.workdir", t.workdir)
  flag("rethink.enabled", r.enabled)
  integer("rethink.steps", r.steps, 0)
  integer("rethink.seed", r.seed, 0)
  text("checkpoint.dir", c.dir)
  integer("checkpoint.every", c.every, 1)
  integer("checkpoint.keep", c.keep, 1)
  integer("parallel.devices", par.devices, 0)
  flag("parallel.shard_params", par.shard_params)
  n_devices = par.devices or jax.device_count()
  if n_devices > jax.device_count():
    fail("parallel.devices", f"asks for {n_devices} devices; there are {jax.device_count()}.")
  for field, size in (
    ("data.batch_size", d.batch_size),
    ("data.eval_batch_size", d.eval_batch_size),
  ):
    if size % n_devices or size % jax.process_count():
      fail(field, f"{size} does not split evenly over {n_devices} devices.")
  choice("prune.method", p.method, (*PRUNERS, *structured.CHANNEL_METHODS, "none"))
  choice("prune.ratios", p.ratios, structured.RATIOS)
  text("prune.layers", p.layers)
  choice("regularize.method", reg.method, REGULARIZERS)
  if (
    isinstance(reg.strength, bool) or not isinstance(reg.strength, int | float) or reg.strength < 0
  ):
    fail("regularize.strength", f"must be a number >= 0, got {reg.strength!r}.")
  if isinstance(reg.groups, str) or not reg.groups or any(g not in GROUP_KINDS for g in reg.groups):
    fail("regularize.groups", f"must be a tuple of {', '.join(GROUP_KINDS)}; got {reg.groups!r}.")
  text("regularize.where", reg.where)
  if not sens.grid or any(
    isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < 1 for s in sens.grid
  ):
    fail("sensitivity.grid", f"must be sparsities in [0, 1), got {sens.grid!r}.")
  if (
    isinstance(sens.max_drop, bool)
    or not isinstance(sens.max_drop, int | float)
    or sens.max_drop < 0
  ):
    fail("sensitivity.max_drop", f"must be an accuracy drop >= 0, got {sens.max_drop!r}.")
  integer("sensitivity.examples", sens.examples, 1)
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
  choice("prune.scope", p.scope, ("layer", "global"))
  choice("prune.schedule", p.schedule, SCHEDULES)
  choice("prune.structure", p.structure, STRUCTURES)
  fraction("prune.sparsity", p.sparsity)
  integer("prune.begin", p.begin, 0)
  integer("prune.end", p.end, 0)
  integer("prune.every", p.every, 1)
  integer("prune.rounds", p.rounds, 1)
  flag("prune.dense_first", p.dense_first)
  flag("prune.dense_last", p.dense_last)
  for pattern, value in p.overrides.items():
    fraction(f"prune.overrides[{pattern!r}]", value)
  if r.enabled and p.method == "none":
    fail("rethink.enabled", "needs a pruned run to copy the masks from; prune.method is 'none'.")
  if p.method != "none" and p.schedule != "constant":
    if p.schedule == "agp" and p.end < p.begin:
      fail("prune.end", f"must not come before prune.begin ({p.begin}), got {p.end}.")
    field, last = {
      "agp": ("prune.end", p.end),
      "one_shot": ("prune.begin", p.begin),
      "iterative": ("prune.rounds", p.begin + (p.rounds - 1) * p.every),
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


def _check_patterns(config: ml_collections.ConfigDict) -> None:
  """Every regex field compiles."""
  patterns = [(f"prune.overrides[{k!r}]", k) for k in config.prune.overrides]
  patterns += [("regularize.where", config.regularize.where), ("prune.layers", config.prune.layers)]
  for field, pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"{field}: {pattern!r} is not a valid regular expression ({e}).") from e


def _check_split_sizes(config: ml_collections.ConfigDict) -> None:
  """The batch fits the training split of an embedded dataset (known without loading it)."""
  size = data.TRAIN_SIZES.get(config.data.name)
  if size is not None and config.data.batch_size > size:
    raise ConfigError(
      f"data.batch_size: {config.data.batch_size} is larger than the training split of "
      f"{config.data.name} ({size} examples)."
    )


@functools.cache
def _abstract_model(name: str, image_shape: tuple[int, ...], width: float) -> Any:
  return nnx.eval_shape(lambda: models.create(name, image_shape, 10, width=width))


def _check_against_model(config: ml_collections.ConfigDict) -> None:
  """The param and layer patterns match the model; the pruner and regularizer accept it.

  Built from shapes only (``nnx.eval_shape``), with the image shape of an embedded
  dataset, or a placeholder for a TFDS one (the param paths do not depend on it).
  """
  d, m, p, reg = config.data, config.model, config.prune, config.regularize
  shape = data.IMAGE_SHAPES.get(d.name)
  try:
    model = _abstract_model(m.name, shape or PLACEHOLDER_SHAPE, float(m.width))
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
    try:
      jax.eval_shape(regularizer.init, params)
    except ValueError as e:
      raise ConfigError(f"regularize.{'where' if reg.where else 'method'}: {e}") from e
  pruner = make_pruner(config)
  if pruner is None:
    return
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
