"""A toy editor and a toy data source, added through the registries alone (one file and one registration
each: tests/grid/plugins/), run through a grid: validation, plan, edit, fine-tuning, cell results, report.

Nothing in editdecay names either toy; if a step still branched on editor or data-source names, the grid
would refuse the names or a stage would fail.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from support.models import save_tiny_model

from editdecay.data import sources as data_sources
from editdecay.edit.registry import check_editor, editor_names, register_editor, unregister_editor
from editdecay.grid.plan import build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import load_grid

PLUGINS = Path(__file__).parent / "plugins"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"editdecay_test_{name}", PLUGINS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toys():
    """Register the toy editor and data source for one test, and remove them afterwards."""
    editor = register_editor(_module("toy_editor").Ridge)
    source = data_sources.register(_module("toy_source").ToyFacts())
    try:
        yield editor, source
    finally:
        unregister_editor(editor.name)
        data_sources.unregister(source.prefix)


def test_a_toy_editor_and_data_source_run_through_plan_edit_finetune_and_report(toys, tmp_path):
    from editdecay.report.build import build_report
    from editdecay.report.records import load_results

    editor, source = toys
    assert editor.name in editor_names() and source.prefix in data_sources.names("edit")
    save_tiny_model(tmp_path / "tiny")
    grid = {
        "name": "toys", "models": [{"name": "tiny", "label": "tiny"}],
        "editors": [editor.name], "edit_data": [source.prefix], "n_edits": [0, 3],
        "recipes": [{"method": "lora", "layers": ["all", "edited"], "preset": "embedded",
                     "overrides": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "lora_r": 4,
                                   "lora_alpha": 8.0, "cutoff_len": 32}}],
        "finetune_data": [source.prefix],
        "shared": {"downstream": [], "evaluation": {"eval_every": 1}, "device": "cpu", "threads": 1,
                   "cache_dir": str(tmp_path / "cache")},
    }
    (tmp_path / "toys.yaml").write_text(yaml.safe_dump(grid))
    plan = build_plan(load_grid(tmp_path / "toys.yaml"))
    kinds = {s.kind for s in plan.stages.values()}
    assert "stats" not in kinds and {"patch", "evaluate", "finetune", "cell"} <= kinds   # needs no E1 statistics
    edited = [c for c in plan.cells if c.axes["n_edits"]]
    assert {c.axes["editor"] for c in edited} == {editor.name} and len(edited) == 2
    # `edited` layers come from the toy editor's own preset for the model's family
    assert {tuple(c.axes["layers"]) if isinstance(c.axes["layers"], list) else c.axes["layers"]
            for c in plan.cells} == {"all", "edited"}

    summary = run_grid(plan, tmp_path / "out", threads=1)
    assert summary.cells == {"done": 4, "running": 0, "failed": 0, "pending": 0}, summary.failed

    results = load_results(tmp_path / "out")
    cells = {c.label: c for c in results.cells}
    assert all(c.state == "done" for c in cells.values())
    toy_ids = {f"toy-{country.lower()}" for country, _, _ in _module("toy_source").FACTS}
    assert len(results.edited_done) == 2
    for cell in results.edited_done:
        assert len(cell.requests) == 3 and {r.case_id for r in cell.requests} < toy_ids   # a seeded sample of 3
        assert cell.result["config"]["editor"]["name"] == editor.name
        assert cell.result["config"]["editor"]["ridge"] == 1.0
        assert cell.result["data"]["name"] == source.prefix
        assert cell.metrics("M_e")["efficacy"] >= cell.metrics("M0")["efficacy"]
        assert cell.result["training"]["edited"]["steps"] == 2
    report = build_report(tmp_path / "out", tmp_path / "report", frequencies=False, progress=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert report.tables and editor.name in text


def test_registrations_are_checked_and_removed(toys):
    from editdecay.core.errors import ConfigError

    editor, source = toys
    with pytest.raises(ConfigError, match="registered already"):
        register_editor(editor)
    with pytest.raises(ConfigError, match="registered already"):
        data_sources.register(source)
    with pytest.raises(ConfigError, match="did you mean 'toyfacts'"):
        data_sources.parse_spec("toyfact", "edit")
    unregister_editor(editor.name)
    data_sources.unregister(source.prefix)
    with pytest.raises(ConfigError, match="unknown source 'toyfacts'"):
        data_sources.parse_spec("toyfacts", "edit")
    with pytest.raises(ConfigError, match="editor='toy-ridge' is not valid"):
        check_editor(editor.name)
    register_editor(editor)                       # the fixture removes them again
    data_sources.register(source)
