"""`editdecay edit --dry-run/--memory`: the memory plan from config.json, before the model or --out is touched;
`--stats-tolerance` (an EditorConfig field, so a generated option) reaches the plan as adaptive statistics."""

from __future__ import annotations

from typer.testing import CliRunner

from editdecay.cli import _register, app

_register()


def _text(res) -> str:
    return " ".join(res.output.split())          # the console wraps long lines


def test_edit_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    res = CliRunner().invoke(app, ["edit", "--n", "4", "--dry-run", "--memory", "80GB"])
    text = _text(res)
    assert res.exit_code == 0, res.output
    assert "everything fits" in text and "nothing was loaded" in text and "adaptive probe" not in text
    adaptive = _text(CliRunner().invoke(app, ["edit", "--n", "4", "--dry-run", "--stats-tolerance", "0.3"]))
    assert "adaptive probe" in adaptive


def test_edit_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "patch"
    res = CliRunner().invoke(app, ["edit", "--n", "4", "--memory", "100MB", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "do not fit" in _text(res) and not out.exists()


def test_edit_without_out_needs_dry_run():
    res = CliRunner().invoke(app, ["edit", "--n", "4", "--device", "cpu"])
    assert res.exit_code == 2 and "--out is required" in _text(res)
