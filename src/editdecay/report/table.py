"""The report's table type: raw values plus how to show them.

Rows keep the raw numbers (fractions, counts, p-values), so tests and the CSV files
see exact values; formatting happens only when rendering (percent with one decimal,
as the study prints scores). Two kinds of empty cell are kept apart:
- `None`: the number is undefined (a relative decrease with S(M_e) = 0, a test with no pairs), shown "n/a";
- `Missing(state)`: the cell of the grid has no usable result (failed, pending, running, invalid), shown as
  its state, so a reader sees which configurations are absent rather than a blank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

KINDS = ("text", "int", "pct", "num", "stat", "p")


@dataclass(frozen=True)
class Missing:
    """A value that is absent because its grid cell has no usable result."""

    state: str          # failed | pending | running | invalid | missing

    def __str__(self) -> str:
        return self.state


@dataclass(frozen=True)
class Column:
    name: str
    kind: str = "text"        # text | int | pct (fraction shown as percent) | num | stat | p
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind={self.kind!r}; use one of {', '.join(KINDS)}")


def format_value(value: Any, kind: str) -> str:
    """The text shown for one value (markdown and HTML use the same text)."""
    if isinstance(value, Missing):
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "int":
        return str(int(value))
    if kind == "num":
        return f"{value:.2f}"
    if kind == "stat":
        return f"{value:.4g}"
    if kind == "p":
        return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"
    return str(value)


@dataclass(frozen=True)
class Table:
    """A titled table. `rows` hold raw values in column order."""

    key: str                  # file name and HTML id
    title: str
    description: str          # what the numbers are, and their n
    columns: tuple[Column, ...]
    rows: tuple[tuple, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.key}: row {i} has {len(row)} values for {len(self.columns)} columns")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> list:
        i = self.names.index(name)
        return [r[i] for r in self.rows]

    def records(self) -> list[dict]:
        return [dict(zip(self.names, r)) for r in self.rows]

    def formatted(self) -> list[list[str]]:
        return [[format_value(v, c.kind) for v, c in zip(r, self.columns)] for r in self.rows]

    def to_frame(self):
        """A pandas DataFrame of the raw values (Missing as its state string)."""
        import pandas as pd

        rows = [[str(v) if isinstance(v, Missing) else v for v in r] for r in self.rows]
        return pd.DataFrame(rows, columns=self.names)


def make_table(key: str, title: str, description: str, columns: Sequence[Column], rows: Sequence[Sequence],
               notes: Sequence[str] = ()) -> Table:
    return Table(key, title, description, tuple(columns), tuple(tuple(r) for r in rows), tuple(notes))


__all__ = ["Column", "KINDS", "Missing", "Table", "format_value", "make_table"]
