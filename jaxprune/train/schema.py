"""Every config field of the training pipeline, once: its default, its check and its help.

:data:`FIELDS` is the schema: ``{group: {name: Field}}``. :func:`defaults` builds the
``ml_collections.ConfigDict`` of :func:`jaxprune.train.config.default_config` from it
and :func:`check` validates each field's type and range against it; what depends on
several fields (the pruning steps against ``train.steps``, a channel method's
regularizer, the model) is :func:`jaxprune.train.config.validate_config`'s. The choices
of a field are named here (or, for ``prune.method``, taken from the code that
implements them), nowhere else.

Examples:
  >>> from jaxprune.train import schema
  >>> schema.FIELDS["train"]["optimizer"].help
  'adam | sgd (Nesterov momentum 0.9)'
  >>> schema.check_field("train.optimizer", "rmsprop")
  "must be one of 'adam', 'sgd'; got 'rmsprop'."
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxprune.regularizers import GROUP_KINDS
from jaxprune.train import models, optim, structured
from jaxprune.train.config_type import Config

Check = Callable[[Any], str | None]  # a value -> the error message, or None when it is fine


def _is_number(value: Any) -> bool:
  """A finite ``int`` or ``float`` (not a bool, NaN or an infinity)."""
  return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def integer(low: int) -> Check:
  """An ``int`` ``>= low``."""

  def check(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      return f"must be an integer >= {low}, got {value!r}."
    return None

  return check


def positive(value: Any) -> str | None:
  """A number ``> 0``."""
  return None if _is_number(value) and value > 0 else f"must be a number > 0, got {value!r}."


def at_least_zero(what: str) -> Check:
  """A number ``>= 0``, named ``what`` in the message."""

  def check(value):
    return None if _is_number(value) and value >= 0 else f"must be {what} >= 0, got {value!r}."

  return check


def fraction(value: Any) -> str | None:
  """A fraction of weights removed, in ``[0, 1)``."""
  if _is_number(value) and 0 <= value < 1:
    return None
  return f"must be in [0, 1) (the fraction of weights removed), got {value!r}."


def keep_fraction(value: Any) -> str | None:
  """A fraction of channels kept, in ``(0, 1]``."""
  if _is_number(value) and 0 < value <= 1:
    return None
  return f"must be in (0, 1] (the fraction of channels kept), got {value!r}."


def drop_fraction(value: Any) -> str | None:
  """A fraction of active weights dropped and regrown, in ``(0, 1]`` (0: masks never move)."""
  if _is_number(value) and 0 < value <= 1:
    return None
  return f"must be in (0, 1] (the fraction of active weights moved; 0 moves none), got {value!r}."


def flag(value: Any) -> str | None:
  """``True`` or ``False``."""
  return None if isinstance(value, bool) else f"must be True or False, got {value!r}."


def text(value: Any) -> str | None:
  """A string."""
  return None if isinstance(value, str) else f"must be a string, got {value!r}."


def choice(*options: str) -> Check:
  """One of ``options``."""

  def check(value):
    if value in options:
      return None
    return f"must be one of {', '.join(map(repr, options))}; got {value!r}."

  return check


def sparsities(value: Any) -> str | None:
  """A non-empty sequence of sparsities in ``[0, 1)``."""
  if value and all(_is_number(s) and 0 <= s < 1 for s in value):
    return None
  return f"must be sparsities in [0, 1), got {value!r}."


def group_kinds(value: Any) -> str | None:
  """A tuple of :data:`jaxprune.regularizers.GROUP_KINDS`."""
  if isinstance(value, str) or not value or any(g not in GROUP_KINDS for g in value):
    return f"must be a tuple of {', '.join(GROUP_KINDS)}; got {value!r}."
  return None


def widths(value: Any) -> str | None:
  """A non-empty sequence of channel counts ``>= 1``."""
  if isinstance(value, str) or not value or any(integer(1)(w) for w in value):
    return f"must be a tuple of channel counts >= 1, got {value!r}."
  return None


def nm_or_unstructured(value: Any) -> str | None:
  """``"unstructured"`` or ``"N:M"`` with integers ``0 < N <= M``."""
  if value == "unstructured":
    return None
  n, sep, m = str(value).partition(":") if isinstance(value, str) else ("", "", "")
  if sep and n.isdigit() and m.isdigit() and 0 < int(n) <= int(m):
    return None
  return f"must be 'unstructured' or 'N:M' with 0 < N <= M (e.g. '2:4'), got {value!r}."


def free_form(value: Any) -> str | None:
  """A group whose keys the user chooses (checked by :func:`jaxprune.train.config`)."""
  del value
  return None


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  Attributes:
    default: its value in :func:`defaults`, or a function of the config being built
      (``ml_collections`` references: ``prune.begin`` follows ``train.steps``).
    check: ``value -> error message or None``.
    help: what it means and the values it takes.
  """

  default: Any
  check: Check
  help: str


PRUNE_METHODS = (
  *optim.PRUNERS,
  *optim.SPARSE_TRAINERS,
  *structured.CHANNEL_METHODS,
  "autopruner",
  "none",
)

FIELDS: dict[str, dict[str, Field]] = {
  "data": {
    "name": Field(
      "mnist5k",
      text,
      "mnist5k | digits (embedded) | any TFDS name (mnist, cifar10, ...) | pydoc_topics "
      "(CPython's help texts, characters: for charlm)",
    ),
    "seq_len": Field(128, integer(2), "pydoc_topics: characters per sequence"),
    "batch_size": Field(128, integer(1), "the global batch, split over devices and processes"),
    "eval_batch_size": Field(512, integer(1), "the evaluation batch (the last one is padded)"),
    "data_dir": Field("", text, 'TFDS data_dir ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)'),
    "download": Field(False, flag, "let TFDS download a missing dataset (needs network)"),
    "train_split": Field("train", text, "the TFDS split to train on (e.g. train[:90%])"),
    "test_split": Field("test", text, "the TFDS split to evaluate on"),
    "augment": Field(
      "none", choice("none", "flip_crop"), "none | flip_crop (random crop + flip, for CIFAR)"
    ),
  },
  "model": {
    "name": Field("lenet300", choice(*models.names()), "a model of jaxprune.train.models"),
    "width": Field(1.0, positive, "channel multiplier of the conv nets"),
    "dim": Field(128, integer(1), "charlm: the residual stream's width (d_model)"),
    "depth": Field(4, integer(1), "charlm: transformer blocks"),
    "heads": Field(4, integer(1), "charlm: query heads per block"),
    "kv_heads": Field(2, integer(1), "charlm: key/value heads per block (divides heads)"),
    "mlp_dim": Field(384, integer(1), "charlm: the gated MLP's hidden width"),
  },
  "train": {
    "steps": Field(3000, integer(1), "optimizer steps (autopruner: of gate training)"),
    "optimizer": Field("adam", choice("adam", "sgd"), "adam | sgd (Nesterov momentum 0.9)"),
    "learning_rate": Field(1e-3, positive, "the peak learning rate"),
    "lr_schedule": Field(
      "constant", choice("constant", "cosine"), "constant | cosine (to 0 at train.steps)"
    ),
    "warmup_steps": Field(0, integer(0), "linear warm-up from 0"),
    "seed": Field(0, integer(0), "seeds the model, the data order and the pruner"),
    "eval_every": Field(500, integer(1), "steps between test evaluations"),
    "log_every": Field(50, integer(1), "steps between logged (averaged) metrics"),
    "progress": Field(True, flag, "show a progress bar"),
    "workdir": Field("", text, 'metrics.csv, TensorBoard events, params.npz, report.md ("": none)'),
  },
  "prune": {
    "method": Field(
      "magnitude",
      choice(*PRUNE_METHODS),
      "magnitude | random | saliency | none, sparse training from the start (fixed "
      "sparsity, prune.schedule unused): static | set | rigl, or a channel method "
      "(jaxprune.train.structured, at prune.begin): l1_filter | slimming | apoz | ssl, or "
      "autopruner (its own runner, jaxprune.train.autopruner)",
    ),
    "scope": Field(
      "layer", choice("layer", "global"), "layer | global (slimming: one |gamma| threshold)"
    ),
    "schedule": Field(
      "agp",
      choice("agp", "one_shot", "iterative", "constant", "acdc", "lottery"),
      "agp | one_shot | iterative | constant | acdc (dense until prune.begin, sparse and "
      "dense phases of prune.every steps, sparse from prune.end) | lottery (iterative "
      "rounds, each rewinding the survivors to step prune.rewind: jaxprune.sparse.lottery)",
    ),  # fmt: skip
    "structure": Field(
      "unstructured",
      choice("unstructured", "neurons", "filters", "channels"),
      "unstructured | neurons | filters | channels",
    ),
    "sparsity": Field(0.9, fraction, "the final fraction of weights removed"),
    "begin": Field(
      lambda c: c.train.get_ref("steps") // 3,
      integer(0),
      "agp: first update; one_shot: the step; iterative, lottery: first round (train.steps // 3)",
    ),
    "end": Field(
      lambda c: c.train.get_ref("steps") * 2 // 3,
      integer(0),
      "agp: last update, where the final sparsity is reached (2 * train.steps // 3)",
    ),
    "every": Field(
      lambda c: (c.train.get_ref("steps") + 29) // 30,
      integer(1),
      "agp: steps between updates; iterative, lottery: between rounds (ceil(train.steps / 30))",
    ),
    "rounds": Field(
      3, integer(1), "iterative, lottery: rounds, each removing the same fraction left"
    ),
    "rewind": Field(
      0,
      integer(0),
      "lottery: the step whose weights and optimizer state the survivors return to after "
      "each round (0: the initial weights); before prune.begin",
    ),
    "overrides": Field(
      lambda c: ml_collections.ConfigDict(),
      free_form,
      '{path regex: sparsity}, e.g. {"fc3": 0.5}',
    ),
    "distribution": Field(
      "uniform",
      choice("uniform", "erk"),
      "uniform | erk: how prune.sparsity is spread over the layers (jaxprune.sparse.erk)",
    ),
    "drop_fraction": Field(
      0.3,
      drop_fraction,
      "set / rigl: f0 of the cosine drop fraction (to 0 at prune.end), in (0, 1]",
    ),
    "dense_first": Field(False, flag, "never prune the first layer"),
    "dense_last": Field(False, flag, "never prune the last layer"),
    "ratios": Field(
      "uniform",
      choice(*structured.RATIOS),
      "l1_filter: uniform (prune.sparsity) | sensitivity (per-group sweep)",
    ),
    "layers": Field("", text, "apoz: regex of the modules whose ReLU outputs are counted"),
  },
  "regularize": {
    "method": Field(
      "none",
      choice("none", "group_lasso", "l1"),
      "none | group_lasso (SSL) | l1 (slimming: BatchNorm scales)",
    ),
    "strength": Field(
      0.0, at_least_zero("a number"), "lambda; until prune.begin for the channel methods"
    ),
    "groups": Field(("channel",), group_kinds, "group_lasso: filter | channel | shape | depth"),
    "where": Field("", text, 'regex of the params ("": kernels for group_lasso, BN scales for l1)'),
  },
  "sensitivity": {
    "grid": Field((0.0, 0.25, 0.5, 0.75), sparsities, "sparsities tried per layer / group"),
    "max_drop": Field(
      0.01,
      at_least_zero("an accuracy drop"),
      "l1_filter ratios: the largest sparsity within this accuracy drop",
    ),
    "examples": Field(1000, integer(1), "the validation slice: the last training examples"),
  },
  "rethink": {
    "enabled": Field(False, flag, "also train the pruned net from scratch (Liu et al. 2019)"),
    "steps": Field(0, integer(0), "0: as many steps as train.steps"),
    "seed": Field(1, integer(0), "seeds the re-initialisation"),
  },
  "checkpoint": {
    "dir": Field("", text, '"": <train.workdir>/checkpoints, or no checkpoints without a workdir'),
    "every": Field(500, integer(1), "steps between checkpoints (and one at each phase's end)"),
    "keep": Field(3, integer(1), "the newest checkpoints kept"),
  },
  "parallel": {
    "devices": Field(0, integer(0), "devices of the data-parallel mesh (0: all)"),
    "shard_params": Field(
      False, flag, "FSDP: shard each kernel's largest divisible axis over devices"
    ),
  },
  "posttrain": {
    "method": Field(
      "sparsegpt",
      choice("magnitude", "wanda", "sparsegpt", "flap", "taylor", "shortgpt"),
      "jaxprune prune: magnitude (per layer) | wanda | sparsegpt (jaxprune.posttrain) | "
      "flap | taylor: heads and MLP neurons removed, a smaller model "
      "(jaxprune.train.lm_structured) | shortgpt: the blocks of lowest Block Influence "
      "removed, a shallower model (jaxprune.train.lm_depth)",
    ),
    "sparsity": Field(0.5, fraction, "unstructured: the fraction removed (per layer / output)"),
    "structure": Field("unstructured", nm_or_unstructured, "unstructured | N:M, e.g. 2:4, 4:8"),
    "calibration": Field(128, integer(1), "calibration sequences, from the training text"),
    "sequential": Field(
      True, flag, "block by block on the pruned blocks' outputs (the papers) | one pass"
    ),
    "layers": Field(r"^blocks/", text, "regex of the pruned kernels (embeddings, head dense)"),
    "blocks": Field(r"^blocks/(\d+)/", text, "sequential: regex whose group names the block"),
    "blocksize": Field(128, integer(1), "sparsegpt: columns per lazy-update block"),
    "dampening": Field(0.01, positive, "sparsegpt: of the mean diagonal of H"),
    "one_pass": Field(
      True,
      flag,
      "sequential: one pass per block from cached hidden states (embed -> blocks -> head) | "
      "the traced model up to each block, blocks grouped by posttrain.blocks",
    ),
    "owl": Field(
      False, flag, "wanda | sparsegpt: OWL block sparsities from outlier ratios, mean sparsity"
    ),
    "owl_threshold": Field(5.0, positive, "owl: M, outliers above M x a block's mean Wanda score"),
    "owl_lambda": Field(
      0.08, at_least_zero("a number"), "owl: block densities span 1 - sparsity +- lambda"
    ),
    "out": Field("", text, '"": <train.workdir>/<method>_<target>; the pruned checkpoint'),
    "heads": Field(
      0.25, fraction, "flap | taylor: query heads removed (from every KV group, over all blocks)"
    ),
    "neurons": Field(0.25, fraction, "flap | taylor: MLP neurons removed (over all blocks)"),
    "drop_blocks": Field(1, integer(1), "shortgpt: blocks removed (lowest Block Influence)"),
    "finetune_steps": Field(100, integer(0), "flap | taylor: Adam steps of the smaller model"),
    "finetune_learning_rate": Field(1e-3, positive, "flap | taylor: cosine-decayed from this"),
    "latency_rounds": Field(20, integer(1), "flap | taylor: interleaved timing rounds"),
  },
  "autopruner": {
    "widths": Field((16, 32), widths, "output channels of the gated convs"),
    "init_std": Field(
      0.0, at_least_zero("a number"), "gate FC init std (0: the paper's 10 sqrt(2 / C))"
    ),
    "keep_ratio": Field(0.5, keep_fraction, "target r: the fraction of channels each gate keeps"),
    "lambda_scale": Field(
      100.0, positive, "adaptive lambda = lambda_scale * |r_b - r| (the paper: 100)"
    ),
    "alpha_start": Field(1.0, at_least_zero("a number"), "the gates' sigmoid scale at first"),
    "alpha_end": Field(100.0, positive, "... and from train.steps on"),
    "alpha_every": Field(1, integer(1), "steps per stage of alpha's growth"),
    "alpha_mode": Field(
      "linear", choice("linear", "geometric"), "how alpha grows (jaxprune.nn.alpha_schedule)"
    ),
    "pretrain_steps": Field(0, integer(0), "steps with alpha = 0 (gates 0.5) before gating"),
    "gate_learning_rate": Field(3e-3, positive, "the gates' FCs' learning rate"),
    "finetune_steps": Field(0, integer(0), "steps of the gate-free model, pruned channels 0"),
    "finetune_learning_rate": Field(1e-3, positive, "the fine-tuning learning rate"),
  },
}

FREE_FORM = tuple(
  f"{group}.{name}"
  for group, fields in FIELDS.items()
  for name, field in fields.items()
  if field.check is free_form
)


def defaults() -> Config:
  """A config holding every field's default (see :func:`jaxprune.train.config.default_config`)."""
  config: Config = ml_collections.ConfigDict()
  for group, fields in FIELDS.items():
    config[group] = ml_collections.ConfigDict()
    for name, field in fields.items():
      config[group][name] = field.default(config) if callable(field.default) else field.default
  return config


def check_field(field: str, value: Any) -> str | None:
  """The error message of ``value`` for ``field`` (``"group.name"``), or ``None``."""
  group, name = field.split(".")
  return FIELDS[group][name].check(value)


def check(config: Config) -> tuple[str, str] | None:
  """``(field, message)`` of the first field whose value its :class:`Field` rejects.

  A field computed from others (an ``ml_collections`` reference: the lottery recipe's
  ``prune.every`` divides by ``prune.rounds``) that cannot be computed is reported
  after the fields it may follow, so ``prune.rounds=0`` names ``prune.rounds``.
  """
  unresolved = None
  for group, fields in FIELDS.items():
    for name, field in fields.items():
      try:
        value = config[group][name]
      except (ArithmeticError, TypeError, ValueError) as e:
        unresolved = unresolved or (
          f"{group}.{name}",
          f"cannot be computed from the fields it follows ({type(e).__name__}: {e}).",
        )
        continue
      message = field.check(value)
      if message is not None:
        return f"{group}.{name}", message
  return unresolved
