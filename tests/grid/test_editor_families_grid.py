"""FT-M, GRACE and MEND through a tiny grid (plan, edit, fine-tuning with LoRA and full, cell results, report):
the grid, its stages and the report run every family with no editor-specific code; GRACE's codebook travels
as a module-state patch from the patch stage to the fine-tuning stages and stays frozen there."""

from __future__ import annotations

import pytest
import yaml
from support import ZSRE_SAMPLE
from support.edits import small_edit_config
from support.models import save_tiny_model

from editdecay.grid.plan import build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import load_grid


@pytest.mark.parametrize("methods", [["lora", "full"]])
def test_every_family_runs_through_a_grid(methods, tmp_path, monkeypatch):
    from editdecay.core.models import load_model
    from editdecay.report.build import build_report
    from editdecay.report.records import load_results

    model_dir = save_tiny_model(tmp_path / "tiny")        # before the private cache: the tokenizer is the embedded one
    monkeypatch.setenv("EDITDECAY_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(model_dir))
    mend = small_edit_config("mend", lm, layers=(2, 3))             # a network trained for this model
    grid = {
        "name": "families", "models": [{"name": str(model_dir), "label": "tiny"}],
        "editors": [{"name": "ft", "overrides": {"layers": [2], "num_steps": 5, "learning_rate": 1e-2}},
                    {"name": "grace", "overrides": {"layers": [2], "value_steps": 5}},
                    {"name": "mend", "overrides": {"layers": [2, 3], "hypernetwork": mend.hypernetwork}}],
        "edit_data": [f"zsre:{ZSRE_SAMPLE}"], "n_edits": [3],
        "recipes": [{"method": methods, "layers": "all", "preset": "embedded",
                     "overrides": {"max_steps": 1, "batch_size": 4, "warmup_steps": 0, "lora_r": 4,
                                   "lora_alpha": 8.0, "cutoff_len": 32}}],
        "finetune_data": ["embedded"],
        "shared": {"downstream": [], "evaluation": {"eval_every": 1}, "embedded_task": {"n_train": 8, "n_test": 4},
                   "device": "cpu", "threads": 1, "cache_dir": str(tmp_path / "cache")},
    }
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    plan = build_plan(load_grid(tmp_path / "g.yaml"))
    assert "stats" not in {s.kind for s in plan.stages.values()}       # none of them needs E1 statistics
    summary = run_grid(plan, tmp_path / "out", threads=1)
    assert summary.cells == {"done": 6, "running": 0, "failed": 0, "pending": 0}, summary.failed

    results = load_results(tmp_path / "out")
    by_editor = {}
    for cell in results.edited_done:
        by_editor.setdefault(cell.result["config"]["editor"]["name"], []).append(cell)
        assert cell.metrics("M_e")["n"] == 3
    assert sorted(by_editor) == ["ft", "grace", "mend"] and all(len(c) == 2 for c in by_editor.values())
    for cell in by_editor["grace"]:
        assert cell.result["training"]["edited"]["module_edits"] == {"model.layers.2.mlp.down_proj.module_edit":
                                                                     "frozen"}
    assert by_editor["ft"][0].result["training"]["edited"]["module_edits"] == {}
    report = build_report(tmp_path / "out", tmp_path / "report", frequencies=False, progress=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert report.tables and all(e in text for e in ("ft", "grace", "mend"))
