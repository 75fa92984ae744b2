"""Shared helpers for the benchmark scripts: interleaved timing and markdown output.

The machines these run on are noisy (other processes share the cores), so every
benchmark times its variants side by side in one process, interleaved round by round
with the order rotated each round, and reports medians and ratios rather than absolute
times.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from jaxprune import fileio

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each run, timed round by round in a rotating order.

  Each callable must block until its work is done (``jax.block_until_ready``). Round
  ``r`` starts with the ``r``-th run, so no variant always follows the same neighbour.
  """
  names = list(runs)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)
  return times


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
  """Median over rounds of ``a[r] / b[r]``: robust to load that drifts between rounds."""
  return statistics.median(x / y for x, y in zip(a, b, strict=True))


def verdict(by_median: bool, by_best: bool) -> str:
  """A target is met only when the median and the best-rounds estimates both meet it.

  On a loaded machine the two disagree: contention slows multi-threaded work (matmuls)
  more than single-threaded work, so medians are biased; the best rounds are closest
  to an idle machine.
  """
  if by_median and by_best:
    return "met"
  if by_median or by_best:
    return "unclear (median and best rounds disagree: rerun on an idle machine)"
  return "MISSED"


def ms(seconds: float) -> str:
  return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def machine() -> str:
  """One line naming the software and hardware the numbers came from, and the load."""
  device = jax.devices()[0]
  return (
    f"jax {jax.__version__}, {device.platform} ({device.device_kind}), "
    f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}), "
    f"Python {platform.python_version()}"
  )


def report(name: str, title: str, body: str, write: bool) -> None:
  """Prints the result and, if ``write``, saves it to ``benchmarks/results/<name>.md``."""
  command = " ".join(["python", f"benchmarks/{name}.py", *sys.argv[1:]])
  text = f"## {title}\n\n{body}\n\n_{machine()}; `{command}`._\n"
  print(text)
  if write:
    RESULTS.mkdir(exist_ok=True)
    fileio.write_text(RESULTS / f"{name}.md", text)
    print(f"Written to {RESULTS / f'{name}.md'}")
