"""The ``jaxprune`` command line: ``train``, ``eval``, ``sensitivity``, ``shrink``, ``export``, ``prune``, ``report``.

  jaxprune train --config configs/lenet300_agp.py --config.train.steps=600
  python -m jaxprune train --config configs/lenet300_agp.py --dry-run
  jaxprune eval --workdir runs/agp          # test accuracy of the newest checkpoint
  jaxprune sensitivity --config configs/l1_filter.py  # per-layer sweep: PNG + CSV
  jaxprune shrink --workdir runs/filters    # cut out pruned channels: a smaller model
  jaxprune export --workdir runs/han        # compact file (kept values only), size table
  jaxprune prune --config configs/charlm_wanda.py  # one-shot Wanda / SparseGPT / magnitude
  jaxprune prune --config configs/charlm_structured.py  # heads + neurons out: a smaller LM
  jaxprune prune --checkpoint llama --text wiki.txt --method wanda --sparsity 0.5 --out pruned
  jaxprune prune --config configs/hf_prune.py --config.method=sparsegpt  # the same, from a file
  jaxprune report runs/agp                  # regenerate runs/agp/report.md and plots

Any config field can be overridden with ``--config.FIELD=VALUE`` (or ``--config.FIELD
VALUE``); unknown fields and bad values stop the command, naming the field, before any
data is loaded. ``train`` with a ``train.workdir`` (or ``checkpoint.dir``) resumes from
the newest checkpoint there: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jaxprune.train import config as config_lib  # says which extra is missing, if one is
from jaxprune.train import errors, hf_prune
from jaxprune.train.config_type import Config

OVERRIDE_HELP = """\
config overrides:
  --config.FIELD=VALUE  set any field of the config, e.g. --config.train.steps=600,
                        --config.prune.sparsity=0.8, --config.data.name=digits,
                        --config.prune.overrides="{'fc3': 0.5}",
                        --config.train.workdir=runs/agp; VALUE is read as a
                        Python literal and must fit the field's type
"""

CONFIG_HELP = "a Python file defining get_config() -> Config (e.g. configs/lenet300_agp.py)"


def _add_run_source(command: argparse.ArgumentParser) -> None:
  """``--config FILE | --workdir DIR`` naming a run, and ``--step`` for its checkpoint."""
  source = command.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
  source.add_argument(
    "--workdir", metavar="DIR", help="the train.workdir of a run (reads its config.json)"
  )
  command.add_argument("--step", type=int, help="the checkpoint's step (default: newest)")


def build_parser() -> argparse.ArgumentParser:
  """The argument parser: one subcommand per task (``train``, ``eval``, ``shrink``, ...)."""
  parser = argparse.ArgumentParser(
    prog="jaxprune", description="Neural-network pruning for JAX, Flax and Optax."
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  debug = argparse.ArgumentParser(add_help=False)
  debug.add_argument(
    "--debug", action="store_true", help="on an error, show the full traceback, not one line"
  )
  common = {
    "epilog": OVERRIDE_HELP,
    "formatter_class": argparse.RawDescriptionHelpFormatter,
    "allow_abbrev": False,
    "parents": [debug],
  }
  train = commands.add_parser(
    "train",
    help="train, prune and fine-tune a model from a config file",
    description="Train a model, prune it as config.prune says, fine-tune it, and print "
    "the dense and final test accuracy and the per-layer sparsity. With "
    "train.workdir set, write metrics (CSV, TensorBoard), checkpoints, params.npz and "
    "report.md there, and resume from its newest checkpoint when run again.",
    **common,
  )
  train.add_argument("--config", required=True, metavar="FILE", help=CONFIG_HELP)
  train.add_argument(
    "--dry-run", action="store_true", help="validate and print the config, then stop"
  )
  eval_cmd = commands.add_parser(
    "eval",
    help="test accuracy and sparsity of a run's checkpoint",
    description="Restore a checkpoint of a run (the newest by default) and print its "
    "test accuracy and per-layer sparsity. Name the run by its workdir, or by the "
    "config (with overrides) that trained it.",
    **common,
  )
  _add_run_source(eval_cmd)
  sweep = commands.add_parser(
    "sensitivity",
    help="prune one layer at a time over a sparsity grid: table, PNG and CSV",
    description="Sweep the sensitivity of a recipe's model (Li et al. 2017): prune each "
    "layer alone (whole channel groups for the channel methods and structured "
    "recipes) at every sparsity of sensitivity.grid, measure accuracy on the "
    "validation slice (the last sensitivity.examples training examples), print the "
    "table and the largest ratio per layer within sensitivity.max_drop, and write "
    "sensitivity.csv and sensitivity.png. The model is the run's newest checkpoint "
    "(or --step), or, when the run has none, trained here dense for prune.begin steps.",
    **common,
  )
  sweep.add_argument("--config", required=True, metavar="FILE", help=CONFIG_HELP)
  sweep.add_argument("--step", type=int, help="the checkpoint's step (default: newest)")
  sweep.add_argument(
    "--out", metavar="DIR", help="where to write the CSV and PNG (default: the workdir, or .)"
  )
  shrink = commands.add_parser(
    "shrink",
    help="cut the pruned channels out of a run's checkpoint: a smaller model",
    description="Restore a checkpoint of a run (the newest by default), remove every "
    "channel whose producing weights are all zero under the masks in its optimizer state "
    "(structured pruning: prune.structure=neurons or filters), check that the smaller "
    "model computes what the masked one does, and print channels per layer and params, "
    "FLOPs, sizes and test accuracy before and after. Writes shrunk.npz, shrunk.json "
    "(the new widths) and shrink.md into the run's workdir, or --out DIR.",
    **common,
  )
  _add_run_source(shrink)
  shrink.add_argument(
    "--out", metavar="DIR", help="where to write the shrunk model (default: the workdir)"
  )
  shrink.add_argument(
    "--keep",
    metavar="REGEX",
    action="append",
    default=[],
    help="never shrink the outputs of layers whose param paths match (repeatable)",
  )
  shrink.add_argument(
    "--multiple-of",
    type=int,
    default=1,
    metavar="N",
    help="round every new width up to a multiple of N (8 for GPU tensor cores)",
  )
  export_cmd = commands.add_parser(
    "export",
    help="write a run's checkpoint as a compact file (kept values only) and print its sizes",
    description="Restore a checkpoint of a run (the newest by default), take the masks "
    "from its optimizer state, write export.jxp (float32 kept values, positions as a "
    "bitmask or delta-coded indices per layer), export-int8.jxp (int8 weight matrices "
    "and kernels) and export-shared{4,5,6}.jxp (k-means weight sharing), load them back "
    "and print their sizes next to dense float32 and "
    ".npz + gzip, with the test accuracy of each loaded model. Writes into the run's "
    "workdir, or --out DIR (with export.md).",
    **common,
  )
  _add_run_source(export_cmd)
  export_cmd.add_argument(
    "--out", metavar="DIR", help="where to write the files (default: the workdir)"
  )
  prune_cmd = commands.add_parser(
    "prune",
    help="one-shot pruning of a trained run from calibration data (Wanda, SparseGPT)",
    description="Restore a checkpoint of a trained run (the newest by default), calibrate "
    "on posttrain.calibration training sequences, prune the kernels matching "
    "posttrain.layers with posttrain.method (magnitude | wanda | sparsegpt) to "
    "posttrain.sparsity or the N:M posttrain.structure, block by block "
    "(posttrain.sequential), print the validation perplexity (accuracy) before and "
    "after with the per-layer sparsity, and save the pruned checkpoint, masks.npz and "
    "prune.md in posttrain.out (default <train.workdir>/<method>_<target>). With "
    "posttrain.method flap | taylor: remove posttrain.heads of the query heads and "
    "posttrain.neurons of the MLP neurons, shrink, fine-tune and compare perplexity, "
    "params, FLOPs and latency with the dense model (jaxprune.train.lm_structured). With "
    "posttrain.method shortgpt: remove the posttrain.drop_blocks blocks of lowest Block "
    "Influence, a shallower model (jaxprune.train.lm_depth). "
    "With --checkpoint DIR instead: prune a Hugging Face checkpoint (Llama, Mistral, Qwen2, "
    "Qwen3) calibrated on --text with its tokenizer, print the dense and pruned "
    "perplexity and the per-layer sparsity, and write it to --out in the same format "
    "(jaxprune.train.hf_prune).",
    **common,
  )
  prune_source = prune_cmd.add_mutually_exclusive_group(required=True)
  prune_source.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
  prune_source.add_argument(
    "--checkpoint", metavar="DIR", help="a Hugging Face checkpoint directory (needs jaxprune[llm])"
  )
  hf_prune.add_arguments(prune_cmd)
  prune_cmd.add_argument("--step", type=int, help="the checkpoint's step (default: newest)")
  report = commands.add_parser(
    "report",
    help="regenerate the markdown report of a finished run",
    description="Write WORKDIR/report.md and its PNG plots from the run's metrics.csv "
    "and summary.json.",
    allow_abbrev=False,
    parents=[debug],
  )
  report.add_argument("workdir", metavar="WORKDIR", help="the train.workdir of a run")
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


def describe(config: Config) -> str:
  """One line saying what a run will do."""
  from jaxprune.train.optim import SPARSE_TRAINERS

  p = config.prune
  spread = f" ({p.distribution})" if p.distribution != "uniform" else ""
  if p.method == "none":
    pruning = "none"
  elif p.method == "autopruner":
    pruning = f"autopruner gates keeping {config.autopruner.keep_ratio:.0%} of the channels"
  elif p.method in SPARSE_TRAINERS:
    pruning = f"{p.method} sparse training at {p.sparsity:.0%}{spread} from step 0" + (
      "" if p.method == "static" else f", masks moved every {p.every} steps until {p.end}"
    )
  else:
    schedule = p.schedule
    if schedule == "lottery":
      schedule = f"lottery ({p.rounds} rounds from {p.begin}, rewinding to step {p.rewind})"
    pruning = f"{p.method} ({p.scope}), {schedule} to {p.sparsity:.0%}{spread}" + (
      f", overrides {dict(p.overrides)}" if p.overrides else ""
    )
  rethink = ", then from scratch (rethinking)" if config.rethink.enabled else ""
  if config.rethink.enabled and p.schedule == "lottery" and p.method not in SPARSE_TRAINERS:
    rethink = ", then its final masks from a random re-init"
  return (
    f"jaxprune: {config.model.name} on {config.data.name}, {config.train.steps} steps, "
    f"pruning: {pruning}{rethink}"
  )


def _one_line(error: BaseException) -> str:
  """The error's message on one line (a user error is one line on stderr)."""
  return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (errors exit with status 2).

  A user's error (a bad config field or argument, a missing or damaged file of a run)
  is one line on stderr, ``jaxprune COMMAND: error: ...``, exit status 2, no traceback
  (``--debug`` shows it). Paths are checked before any work, and a command that fails
  creates nothing.

  Examples:
    >>> from jaxprune import cli
    >>> cli.main(["train", "--config", "configs/lenet300_agp.py", "--config.train.steps=90",
    ...           "--dry-run"])  # doctest: +ELLIPSIS
    autopruner:
    ...
    checkpoint:
    ...
      steps: 90
    ...
    0
  """
  parser = build_parser()
  args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  overrides, unknown = split_overrides(extra)
  if unknown or (overrides and args.command == "report"):
    parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
  if getattr(args, "step", None) is not None and args.step < 0:
    parser.error(f"--step must be a checkpoint step >= 0, got {args.step}")
  if args.command == "shrink" and args.multiple_of < 1:
    parser.error(f"--multiple-of must be >= 1, got {args.multiple_of}")
  read = None
  if args.command == "prune" and args.config:
    try:
      read = config_lib.read_config(args.config)
      if hf_prune.is_config(read):
        args = _checkpoint_form(parser, args, read, overrides)
        overrides, read = [], None
    except (config_lib.ConfigError, OSError) as e:
      if args.debug:
        raise
      parser.exit(2, f"jaxprune prune: error: {_one_line(e)}\n")
  if getattr(args, "checkpoint", None):
    if overrides:
      parser.error("--config.FIELD overrides go with --config FILE, not --checkpoint")
    problem = hf_prune.check_arguments(args)
    if problem:
      parser.error(problem)
    try:
      result = hf_prune.prune_checkpoint(args, log=lambda line: print(line, flush=True))
    except (OSError, ValueError, ModuleNotFoundError) as e:
      if args.debug:
        raise
      parser.exit(2, f"jaxprune prune: error: {_one_line(e)}\n")
    print(result.report())
    return 0
  if getattr(args, "workdir", None) and overrides:
    parser.error("--config.FIELD overrides go with --config FILE, not --workdir")
  _drop_abandoned_reads_reports()
  try:
    return _run(args, overrides, read)
  except (config_lib.ConfigError, errors.RunFileError, OSError) as e:
    if args.debug:
      raise
    parser.exit(2, f"jaxprune {args.command}: error: {_one_line(e)}\n")


def _checkpoint_form(
  parser: argparse.ArgumentParser, args: argparse.Namespace, config: Config, overrides: list[str]
) -> argparse.Namespace:
  """The arguments of ``prune --checkpoint`` that a config file of its form (with overrides)
  gives, parsed by ``parser`` as if typed: the flag form's defaults, choices and checks.

  Raises:
    ConfigError: an unknown field, a bad override.
  """
  defaults = hf_prune.option_defaults()
  typed = [dest for dest, default in defaults.items() if getattr(args, dest) != default]
  if typed:
    dest = typed[0]
    parser.error(
      f"--{dest.replace('_', '-')} goes with --checkpoint; with --config set config.{dest} "
      f"in the file or --config.{dest}=VALUE"
    )
  for assignment in overrides:
    config_lib.apply_override(config, assignment)
  try:
    argv = hf_prune.config_arguments(config)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e
  return parser.parse_args(["prune", *argv, *(["--debug"] if args.debug else [])])


def _from_orbax(error: BaseException | None, obj: object = None) -> bool:
  """Whether an unreported error comes from orbax's checkpoint reads (or their event loop)."""
  code = getattr(obj, "cr_code", None)  # a coroutine collected while it raised
  if code is not None and "orbax" in code.co_filename:
    return True
  if obj is None and isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True  # a read finishing on tensorstore's thread after orbax closed its loop
  tb = getattr(error, "__traceback__", None)
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _OrbaxLeftovers(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and _from_orbax(record.exc_info[1]))


def _drop_abandoned_reads_reports() -> None:
  """Drops (once per process) what orbax's abandoned checkpoint reads report.

  Orbax reads a checkpoint's arrays in concurrent tasks; when one read fails on a
  damaged file, it raises, closes its event loop and leaves the other reads running.
  Those fail too (the same damage) and print their tracebacks later, from tensorstore's
  threads ("Event loop is closed"), from the garbage collector ("Exception ignored in
  <coroutine>") or as asyncio's "Task exception was never retrieved", after the one-line
  error that said it. Every other report goes on to the hooks there were.
  """
  global _DROPPING
  if _DROPPING:
    return
  _DROPPING = True
  previous = sys.unraisablehook

  def hook(unraisable: sys.UnraisableHookArgs) -> None:
    if not _from_orbax(unraisable.exc_value, unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_OrbaxLeftovers())


_DROPPING = False


def _run(args: argparse.Namespace, overrides: list[str], read: Config | None = None) -> int:
  """The command of ``args``, after the arguments are parsed and checked (``read``: the
  config file's ``get_config()``, when it was read already)."""
  from jaxprune.train import autopruner, evaluate, lm_depth, lm_structured, report, run, sweep
  from jaxprune.train import export as export_lib
  from jaxprune.train import prune as prune_lib
  from jaxprune.train import shrink as shrink_lib

  errors.check_out_dir(getattr(args, "out", None), "--out")  # before any work
  if args.command == "report":
    print(report.write_report(args.workdir))
    return 0
  if getattr(args, "workdir", None):
    config = evaluate.config_from_workdir(args.workdir)
  elif read is not None:
    config = config_lib.configure(read, overrides)
  else:
    config = config_lib.load_config(args.config, overrides)
  if args.command == "eval":
    print(evaluate.evaluate_checkpoint(config, step=args.step).report())
    return 0
  if args.command == "sensitivity":
    print(describe(config), flush=True)
    print(sweep.run_sweep(config, step=args.step, out=args.out).report())
    return 0
  if args.command == "shrink":
    result = shrink_lib.shrink_checkpoint(
      config, step=args.step, out=args.out, keep=args.keep, multiple_of=args.multiple_of
    )
    print(result.report())
    return 0
  if args.command == "prune" and config.posttrain.method in lm_structured.METHODS:
    print(lm_structured.prune_structured(config, step=args.step).report())
    return 0
  if args.command == "prune" and config.posttrain.method in lm_depth.METHODS:
    print(lm_depth.prune_depth(config, step=args.step).report())
    return 0
  if args.command == "prune":
    print(prune_lib.prune_checkpoint(config, step=args.step).report())
    return 0
  if args.command == "export":
    print(export_lib.export_checkpoint(config, step=args.step, out=args.out).report())
    return 0
  if args.dry_run:
    print(str(config).rstrip())
    return 0
  print(describe(config), flush=True)
  if config.prune.method == autopruner.METHOD:
    print(autopruner.train_recipe(config).report())
    return 0
  result = run.Run(config).execute()
  print(result.report())
  if config.train.workdir:
    print(f"report: {config.train.workdir}/report.md")
  return 0
