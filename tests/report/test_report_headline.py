"""The headline `editdecay report` prints last (ES after editing, ES after fine-tuning, EFR, each with n), on the
hand-built results directory of support/results.py (numbers worked out from its OUTCOMES)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.results import build_results_dir, cell_label

from editdecay.report import load_results
from editdecay.report.analysis import analyse
from editdecay.report.headline import headline, headline_lines


def test_pooled_numbers_and_counts(tmp_path):
    build_results_dir(tmp_path)
    total, per_cell = headline(analyse(load_results(tmp_path)))
    # done cells with edits: A, B (memit: M_e ES 3/4), C (alphaedit: M_e ES 4/4); D failed, E pending, F no edits
    assert [label for label, _ in per_cell] == [cell_label("A"), cell_label("B"), cell_label("C")]
    assert (total.n_cells, total.n_rows) == (3, 12)
    assert total.es_edited == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    assert total.es_finetuned == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    # flipped: A r2; B r1, r2; C none -- of 3 + 3 + 4 edits that succeeded after editing
    assert (total.n_flipped, total.n_success_edited) == (3, 10) and total.efr == pytest.approx(0.3)
    lines = headline_lines(analyse(load_results(tmp_path)))
    assert lines[0] == ("ES after editing (M_e): 83.3%   ES after fine-tuning (M_ef): 66.7%   "
                        "(n = 12 (cell, request) rows in 3 cells)")
    assert lines[1].startswith("Edit Flip Ratio: 30.0% (3 of 10 edits")
    assert f"  {cell_label('B')}: ES 75.0% -> 25.0% (n=4), EFR 66.7% (2/3)" in lines


def test_the_report_command_ends_with_the_headline_and_the_html_path(tmp_path):
    build_results_dir(tmp_path / "res")
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "-m", "editdecay.cli", "report", str(tmp_path / "res"), "--out", str(out),
                           "--no-frequencies"], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "COLUMNS": "60", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout.strip().splitlines()
    assert tail[-1] == f"open {out / 'report.html'}"
    assert any(line.startswith("ES after editing (M_e): 83.3%") and line.endswith("in 3 cells)") for line in tail)
    assert any(line.startswith("Edit Flip Ratio: 30.0%") for line in tail)
