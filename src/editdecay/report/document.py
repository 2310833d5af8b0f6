"""The report as a value: its analysis, tables and figures, before it is rendered or written."""

from __future__ import annotations

from dataclasses import dataclass, field

from editdecay.report.analysis import Analysis
from editdecay.report.figures import FigureRecord
from editdecay.report.table import Table


@dataclass(frozen=True)
class Report:
    analysis: Analysis
    tables: tuple[Table, ...]
    figures: tuple[FigureRecord, ...]
    missing: Table
    summary: tuple[str, ...]
    created: str
    version: str
    files: dict = field(default_factory=dict)      # what was written: name -> path

    def table(self, key: str) -> Table:
        for t in (self.missing, *self.tables):
            if t.key == key:
                return t
        raise KeyError(f"no table {key!r}; tables: {', '.join(t.key for t in self.tables)}")
