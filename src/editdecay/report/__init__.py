"""`editdecay report`: the study's tables, tests and figures from a grid results directory.

Modules, in reading order: records (load and validate the results directory), measures (E7 recomputed
from per-request rows, checked against the stored numbers), analysis (both together), tables, significance
(paired tests), frequency + survival (which edits survive), figures, render (report.md / report.html),
build (`build_report`), activation (optional, loads models).
"""

from editdecay.report.build import Report, build_report
from editdecay.report.records import CellRecord, RequestRecord, ResultsSet, load_results

__all__ = ["CellRecord", "Report", "RequestRecord", "ResultsSet", "build_report", "load_results"]
