"""`editdecay report RESULTS_DIR --out REPORT_DIR`: tables, tests, figures, report.md and report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import console, guard, set_threads


@app.command("report")
@guard
def report_cmd(
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
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                             help="editdecay cache (default: the grid's, else $EDITDECAY_CACHE)"),
    device: str = typer.Option("cpu", "--device", help="device for --activation-shift"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="let --activation-shift run the models' own Python code (never "
                                                "taken from the results directory)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """Report a grid's results: the study's tables, paired tests, figures and per-request survival.

    Computed from the cells' per-request rows; cells that failed or never ran are listed and marked.
    """
    from editdecay.report import build_report

    set_threads(threads)
    report = build_report(results_dir, out, frequencies=frequencies, frequency_method=frequency_method,
                          activation_shift=activation_shift,
                          activation_cells=activation_cells, cache_dir=cache_dir, device=device,
                          trust_remote_code=trust_remote_code)
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
