"""The ``jaxprune`` command line.

  jaxprune train --config configs/lenet300_agp.py --config.train.steps=600
  python -m jaxprune train --config configs/lenet300_agp.py --dry-run

Any config field can be overridden with ``--config.FIELD=VALUE`` (or ``--config.FIELD
VALUE``); unknown fields and bad values stop the command, naming the field, before any
data is loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import ml_collections

from jaxprune.train import config as config_lib
from jaxprune.train import loop

OVERRIDE_HELP = """\
config overrides:
  --config.FIELD=VALUE  set any field of the config, e.g. --config.train.steps=600,
                        --config.prune.sparsity=0.8, --config.data.name=digits,
                        --config.prune.overrides="{'fc3': 0.5}"; VALUE is read as a
                        Python literal and must fit the field's type
"""


def build_parser() -> argparse.ArgumentParser:
  """The argument parser: one subcommand per task (``train``)."""
  parser = argparse.ArgumentParser(
    prog="jaxprune", description="Neural-network pruning for JAX, Flax and Optax."
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  train = commands.add_parser(
    "train",
    help="train, prune and fine-tune a model from a config file",
    description="Train a model, prune it as config.prune says, fine-tune it, and print "
    "the dense and final test accuracy and the per-layer sparsity.",
    epilog=OVERRIDE_HELP,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  train.add_argument(
    "--config",
    required=True,
    metavar="FILE",
    help="a Python file defining get_config() -> ml_collections.ConfigDict "
    "(e.g. configs/lenet300_agp.py)",
  )
  train.add_argument(
    "--dry-run", action="store_true", help="validate and print the config, then stop"
  )
  return parser


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
  """``["--config.a.b=1", "--config.c", "2", "-x"]`` -> ``(["a.b=1", "c=2"], ["-x"])``."""
  overrides, rest, args = [], [], list(args)
  while args:
    arg = args.pop(0)
    if not arg.startswith("--config."):
      rest.append(arg)
    elif "=" in arg:
      overrides.append(arg.removeprefix("--config."))
    elif args:
      overrides.append(f"{arg.removeprefix('--config.')}={args.pop(0)}")
    else:
      overrides.append(arg.removeprefix("--config."))  # no value: load_config says so
  return overrides, rest


def describe(config: ml_collections.ConfigDict) -> str:
  """One line saying what a run will do."""
  p = config.prune
  pruning = (
    "none"
    if p.method == "none"
    else f"{p.method} ({p.scope}), {p.schedule} to {p.sparsity:.0%}"
    + (f", overrides {dict(p.overrides)}" if p.overrides else "")
  )
  return (
    f"jaxprune: {config.model.name} on {config.data.name}, {config.train.steps} steps, "
    f"pruning: {pruning}"
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (errors exit with status 2).

  Examples:
    >>> from jaxprune import cli
    >>> cli.main(["train", "--config", "configs/lenet300_agp.py", "--config.train.steps=90",
    ...           "--dry-run"])  # doctest: +ELLIPSIS
    data:
    ...
      steps: 90
    0
  """
  parser = build_parser()
  args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  overrides, unknown = split_overrides(extra)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  try:
    config = config_lib.load_config(args.config, overrides)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    parser.exit(2, f"jaxprune {args.command}: error: {e}\n")
  if args.dry_run:
    print(str(config).rstrip())
    return 0
  print(describe(config), flush=True)
  result = loop.train(config)
  print(result.report())
  return 0
