"""`build_report`: a grid results directory in, tables, figures, report.md and report.html out.

Output layout (REPORT_DIR):

    report.md            tables as markdown, figures linked from figures/
    report.html          self-contained: figures embedded, opens offline
    report.json          every table's raw values, the checks and the cell states
    tables/<key>.csv     one file per table (raw values; missing cells as their state)
    figures/<key>.png    one file per figure

Nothing here loads a model unless `activation_shift` is asked for: the tables and
figures come from the result files (and, for target frequencies, from wordfreq's English word
lists or, with the corpus method, the tokenizer and the regenerated fine-tuning data / cached
statistics corpus).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from editdecay.report.analysis import Analysis, analyse
from editdecay.report.document import Report
from editdecay.report.figures import (
    decay_curves,
    downstream_bars,
    editor_decay_by_n,
    request_survival,
    survival_heatmap,
)
from editdecay.report.protocol import protocol_figures, protocol_tables
from editdecay.report.records import load_results
from editdecay.report.render import render_html, render_markdown, report_json
from editdecay.report.significance import paired_comparisons, significance_table
from editdecay.report.survival import request_frame, survival_requests, survival_summary
from editdecay.report.table import Column, Table, make_table
from editdecay.report.tables import all_tables

log = logging.getLogger(__name__)


def missing_table(a: Analysis) -> Table:
    cols = [Column("cell"), Column("state"), Column("failed stage kind"), Column("failed stage"), Column("error")]
    rows = [[c.label, c.state, c.failed_kind, c.failed_stage, c.error or ("not run yet" if c.state == "pending"
                                                                          else None)]
            for c in a.results.not_done]
    return make_table("missing_cells", "Cells without a result",
                      "Planned cells that have no usable result: failed (a stage they need failed; its error), "
                      "running, pending (never run) or invalid (a result file that cannot be read). Their numbers "
                      "are marked with this state in every table.", cols, rows)


def _summary(a: Analysis, frame) -> tuple[str, ...]:
    lines = []
    done = [c for c in a.edited_cells if a.m(c)]
    if done:
        succ = sum(a.m(c).efr.n_success_edited for c in done)
        flipped = sum(a.m(c).efr.n_flipped for c in done)
        lines.append(f"{len(done)} cells with edits have results, {sum(a.m(c).n for c in done)} (cell, request) "
                     f"rows; {succ} edits succeeded after editing and {flipped} of them flipped after fine-tuning "
                     f"(pooled EFR {100 * flipped / succ:.1f}%)" if succ else
                     f"{len(done)} cells with edits have results; no edit succeeded after editing")
    fine_tune_only = [c for c in a.results.done if not c.has_edits]
    if fine_tune_only:
        lines.append(f"{len(fine_tune_only)} fine-tune-only cells (n_edits = 0) have results (downstream only)")
    return tuple(lines)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("editdecay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_report(results_dir: str | Path, out_dir: str | Path, *, frequencies: bool = True,
                 frequency_method: str = "wordfreq", activation_shift: bool = False, activation_cells: int | None = None,
                 cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
                 trust_remote_code: bool = False) -> Report:
    """Read `results_dir`, write the report into `out_dir` (created), return what was written.

    `frequency_method`: wordfreq (English Zipf frequency, the default) | corpus (counts in the cell's fine-tuning
    data and statistics corpus); see report/frequency.py. ConfigError for another value.
    `trust_remote_code` (for `activation_shift`): the caller's decision only; the results directory's
    `trust_remote_code` is never followed."""
    from editdecay.core.cache import atomic_write_bytes
    from editdecay.core.errors import ConfigError
    from editdecay.report.frequency import (
        METHODS,
        TargetFrequencies,
        method_description,
    )

    if frequency_method not in METHODS:       # before anything is written
        raise ConfigError(f"frequency method {frequency_method!r} is not valid; use one of {', '.join(METHODS)}")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    results = load_results(results_dir)
    a = analyse(results)
    for w in a.warnings:
        log.warning("%s", w)
    steps = tqdm(total=5 + activation_shift, desc="report", disable=not progress, leave=False)
    tables = all_tables(a)
    steps.update()
    freq = TargetFrequencies(results.root, cache_dir or results.runtime.get("cache_dir"),
                             method=frequency_method) if frequencies else None
    frame = request_frame(a, freq)
    tables += [survival_requests(frame, freq), survival_summary(frame, freq)]
    steps.update()
    tables.append(significance_table(paired_comparisons(a)))
    tables += protocol_tables(a)
    steps.update()
    fig_dir = out / "figures"
    figures = [decay_curves(a, fig_dir / "decay_curves.png"), survival_heatmap(a, fig_dir / "survival_heatmap.png"),
               editor_decay_by_n(a, fig_dir / "editor_decay_by_n.png"),
               request_survival(frame, fig_dir / "request_survival.png"),
               downstream_bars(a, fig_dir / "downstream.png"), *protocol_figures(a, fig_dir)]
    steps.update()
    if activation_shift:
        from editdecay.report.activation import (
            activation_figure,
            activation_shift_table,
            measure_activation_shift,
        )

        shifts = measure_activation_shift(a, cache_dir=cache_dir or results.runtime.get("cache_dir"),
                                          device=device, max_cells=activation_cells, progress=progress,
                                          trust_remote_code=trust_remote_code)
        tables.append(activation_shift_table(shifts))
        figures.append(activation_figure(shifts, fig_dir / "activation_shift.png"))
        steps.update()
    summary = _summary(a, frame) + ((method_description(freq.method),) if freq is not None else ())
    report = Report(a, tuple(tables), tuple(figures), missing_table(a), summary,
                    _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), _version())
    files = {}
    for t in (report.missing, *report.tables):
        path = out / "tables" / f"{t.key}.csv"
        atomic_write_bytes(path, t.to_frame().to_csv(index=False).encode())
        files[f"tables/{t.key}.csv"] = path
    for name, text in (("report.md", render_markdown(report)), ("report.html", render_html(report)),
                       ("report.json", report_json(report))):
        atomic_write_bytes(out / name, text.encode("utf-8"))
        files[name] = out / name
    files.update({f"figures/{f.path.name}": f.path for f in figures})
    steps.update()
    steps.close()
    return replace(report, files=files)


__all__ = ["Report", "build_report", "missing_table"]
