"""One table formatter for every report the package prints.

Masks summaries, regularizer group counts, sensitivity sweeps and surgery reports all
print aligned text tables through :func:`text_table` (or markdown through
:func:`markdown_table`), so they look alike and none re-implements column widths.
"""

from __future__ import annotations

from collections.abc import Sequence

Row = Sequence[str]


def text_table(
  header: Row, *sections: Sequence[Row], left: int = 1, title: str | None = None
) -> str:
  """An aligned text table: the header, then each section of rows below a rule.

  Args:
    header: the column names.
    *sections: groups of rows (each a sequence of cells, as text); a rule of dashes
      separates the header and each section from the next.
    left: how many leading columns are left-aligned (the rest align right: numbers).
    title: an optional line above the table.

  Examples:
    >>> from jaxprune.table import text_table
    >>> print(text_table(("layer", "zeros"), [("fc1", "9"), ("fc2", "10")], [("total", "19")]))
    layer  zeros
    ------------
    fc1        9
    fc2       10
    ------------
    total     19
  """
  rows = [tuple(header), *(tuple(r) for section in sections for r in section)]
  for r in rows:
    if len(r) != len(header):
      raise ValueError(f"text_table: the row {r} has {len(r)} cells, the header {len(header)}.")
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

  def line(cells: Row) -> str:
    return "  ".join(
      c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()

  rule = "-" * len(line(header))
  out = [title] if title is not None else []
  out.append(line(header))
  for section in sections:
    out += [rule, *map(line, section)]
  return "\n".join(out)


def markdown_table(header: Row, rows: Sequence[Row], *, left: int = 1) -> str:
  """A markdown table; the first ``left`` columns align left, the others right.

  Examples:
    >>> from jaxprune.table import markdown_table
    >>> print(markdown_table(("", "before", "after"), [("params", "10", "4")]))
    | | before | after |
    |---|---:|---:|
    | params | 10 | 4 |
  """
  align = ["---" if i < left else "---:" for i in range(len(header))]
  lines = [f"| {' | '.join(header)} |".replace("|  |", "| |"), f"|{'|'.join(align)}|"]
  return "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows])
