"""`editdecay report RESULTS_DIR --out REPORT_DIR`: tables, tests, figures, report.md and report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import check_run, console, guard, set_threads
from editdecay.cli.options import Fields, config_options
from editdecay.core.model_ref import ModelRef
from editdecay.grid.spec import SharedSettings

# Settings of --activation-shift, which loads the grid's models again (never trusting code the results name).
MODEL = Fields(ModelRef, into="model", only=("trust_remote_code",), panel="Models of --activation-shift")
RUN = Fields(SharedSettings, into="run", only=("device", "threads", "cache_dir"),
             defaults={"cache_dir": "the grid's, else $EDITDECAY_CACHE"}, panel="Run (grid: shared)")


@app.command("report")
@guard
@config_options(MODEL, RUN)
def report_cmd(
    model: dict,
    run: dict,
    results_dir: Path = typer.Argument(..., help="a grid output directory (`editdecay grid run --out DIR`)"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for report.md, report.html, tables/, figures/"),
    activation_shift: bool = typer.Option(False, "--activation-shift",
                                          help="also measure per-layer activation shifts between M0, M_e, M_f and "
                                               "M_ef (loads the models and repeats M_ef's fine-tuning; slow)"),
    activation_cells: Optional[int] = typer.Option(None, "--activation-cells", min=1,
                                                   help="measure activation shift on at most this many cells"),
    frequencies: bool = typer.Option(True, "--frequencies/--no-frequencies",
                                     help="relate edit survival to the targets' frequency"),
    frequency_method: str = typer.Option("wordfreq", "--frequency-method",
                                         help="wordfreq: the target's Zipf frequency in English (wordfreq word "
                                              "lists; default) | corpus: counts in the cell's fine-tuning data and "
                                              "E1 statistics corpus"),
) -> None:
    """Report a grid's results: the study's tables, paired tests, figures and per-request survival.

    Computed from the cells' per-request rows; cells that failed or never ran are listed and marked.
    """
    from editdecay.report import build_report

    ref = ModelRef(**model)
    from editdecay.core.outputs import check_output_dir

    settings = SharedSettings(**run)
    if activation_shift:
        check_run(settings)         # the models load again: this machine must have --device
    else:
        set_threads(settings.threads)
    check_output_dir(out, kind="report", overwrite=True)     # a report is rebuilt in place, never over a run
    report = build_report(results_dir, out, frequencies=frequencies, frequency_method=frequency_method,
                          activation_shift=activation_shift,
                          activation_cells=activation_cells, cache_dir=settings.cache_dir, device=settings.device,
                          trust_remote_code=ref.trust_remote_code)
    counts = report.analysis.results.counts()
    console.print(f"[bold]{report.analysis.results.grid}[/]: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                  + " cells", highlight=False)
    for w in report.analysis.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"{len(report.tables) + 1} tables, {len(report.figures)} figures -> {out}", highlight=False)
    from editdecay.report.headline import headline_lines

    for line in headline_lines(report.analysis):     # the three numbers a reader wants first, with n
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"open {out / 'report.html'}", highlight=False, soft_wrap=True)     # a path stays one line
