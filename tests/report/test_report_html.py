"""`editdecay report` end to end: a real demo-shaped grid on a tiny model, the report opened in headless Chromium.

The grid has the demo's shape (2 editors x 2 methods x 2 layer choices = 8 cells) on a tiny random Llama saved to
disk (support/grids.py), the 3 usable CounterFact-style requests of tests/fixtures (probability comparisons,
so the numbers vary), 3 fine-tuning steps. One cell's result is then removed, as if it had never been assembled. The report is written by
the CLI and `report.html` is loaded by Chromium (Debian's `chromium`; `make test` installs it), whose DOM after
rendering must show every figure decoded and the numbers of the result files in the tables.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support import COUNTERFACT_SMALL
from support.grids import grid_dict, make_corpus, write_grid
from support.models import save_tiny_model

from editdecay.grid.plan import build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import load_grid
from editdecay.grid.store import GridStore

CHROMIUM = Path("/usr/bin/chromium")
COUNTERFACT = COUNTERFACT_SMALL
TARGET_DOC = "Rome is old . English is spoken in Rome and in Japan , Microsoft is not"
FIGURES = ("decay_curves", "survival_heatmap", "editor_decay_by_n", "request_survival", "downstream",
           "knowledge_vs_edits", "survival_curves")


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report-grid")
    w = {"model": root / "tiny-llama", "corpus": root / "corpus.txt", "cache": root / "cache"}
    save_tiny_model(w["model"])
    make_corpus(w["corpus"])
    # a first document with some edit targets (the statistics use the corpus's first 512 tokens)
    w["corpus"].write_text(TARGET_DOC + "\n\n" + w["corpus"].read_text())
    d = grid_dict(w, n_edits=[3], edit_data=[f"counterfact:{COUNTERFACT}"])
    edit = d["editors"][0]["overrides"]
    d["editors"] = [{"name": "memit", "overrides": edit},
                    {"name": "alphaedit", "overrides": {k: v for k, v in edit.items() if k != "mom2_update_weight"}}]
    d["recipes"] = [{"method": ["lora", "full"], "layers": ["edited", "non-edited"], "preset": "embedded",
                     "overrides": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0}}]
    plan = build_plan(load_grid(write_grid(root / "demo-shaped.yaml", d)))
    out = root / "out"
    summary = run_grid(plan, out, threads=1)
    assert summary.cells["done"] == 8
    store = GridStore(out)
    gone = plan.cells[-1]            # never assembled: no result, no cell stage
    store.result_path(gone.id).unlink()
    shutil.rmtree(store.stage_dir(gone.stages["cell"]))
    results = {c.id: store.read_result(c.id) for c in plan.cells}
    return {"root": root, "out": out, "plan": plan, "results": results, "gone": gone}


class DomTables(HTMLParser):
    """Tables (cells with text and attributes), images and <body> attributes of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.images: list[dict] = []
        self.body: dict = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id"), {"header": [], "rows": []})
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"tag": tag, "attrs": a, "text": ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row and all(c["tag"] == "th" for c in self._row):
                self._table["header"] = [c["text"] for c in self._row]
            else:
                self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def rows(self, key: str) -> list[dict]:
        t = self.tables[f"table-{key}"]
        return [dict(zip(t["header"], r)) for r in t["rows"]]


@pytest.fixture(scope="module")
def rendered(grid, tmp_path_factory) -> dict:
    assert CHROMIUM.exists(), "headless Chromium is needed: apt-get install -y chromium (`make test` installs it)"
    out = tmp_path_factory.mktemp("report")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "editdecay.cli", "report", str(grid["out"]), "--out", str(out),
                           "--threads", "1", "--frequency-method", "corpus"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    profile = out.parent / "chromium-profile"
    dom = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                          "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<table" in dom.stdout, dom.stderr[-2000:]
    parser = DomTables()
    parser.feed(dom.stdout)
    return {"out": out, "dom": parser, "cli": proc.stdout}


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_every_figure_is_written_and_decoded_by_the_browser(rendered):
    dom, out = rendered["dom"], rendered["out"]
    assert int(dom.body["data-images-total"]) == len(dom.images) == len(FIGURES)
    assert int(dom.body["data-images-decoded"]) == len(FIGURES)
    by_key = {img["data-key"]: img for img in dom.images}
    assert set(by_key) == set(FIGURES)
    for key in FIGURES:
        img = by_key[key]
        assert img["src"].startswith("data:image/png;base64,")        # embedded: the page opens offline
        w, h = png_size(out / "figures" / f"{key}.png")
        assert (int(img["data-natural-width"]), int(img["data-natural-height"])) == (w, h) and w > 100
    html = (out / "report.html").read_text()
    assert "<script src" not in html and "<link" not in html and "https://" not in html
    assert (out / "report.md").read_text().count("](figures/") == len(FIGURES)


def _num(cell: dict) -> float | None:
    v = cell["attrs"].get("data-value")
    return None if v in (None, "") else float(v)


def check(cell: dict, want: float | None, pct: bool = True) -> None:
    if want is None:
        assert cell["text"] == "n/a" and _num(cell) is None, cell
        return
    assert math.isclose(_num(cell), want, rel_tol=1e-12, abs_tol=1e-15), (cell, want)
    if pct:
        assert cell["text"] == f"{100 * want:.1f}", (cell, want)


def test_tables_hold_the_numbers_of_the_result_files(grid, rendered):
    dom = rendered["dom"]
    report = json.loads((rendered["out"] / "report.json").read_text())
    assert {f"table-{k}" for k in report["tables"]} <= set(dom.tables)
    assert report["warnings"] == []
    cells = {r["cell"]["text"]: r for r in dom.rows("cells")}
    efr_rows = dom.rows("edit_flip_ratio")
    assert len(cells) == len(efr_rows) == 8
    checked = 0
    for cell in grid["plan"].cells:
        row = cells[cell.label]
        result = grid["results"][cell.id]
        if cell.id == grid["gone"].id:
            assert result is None and row["state"]["text"] == "pending"
            assert all(c["attrs"].get("data-missing") == "pending" and c["text"] == "pending"
                       for name, c in row.items() if name not in ("cell", "state"))
            continue
        m, decay = result["metrics"], result["decay"]
        assert row["state"]["text"] == "done" and row["requests"]["text"] == str(m["M_e"]["n"]) == "3"
        for s, abbr in (("efficacy", "ES"), ("paraphrase", "PS"), ("neighborhood", "NS")):
            check(row[f"{abbr} M_e"], m["M_e"][s])
            check(row[f"{abbr} M_ef"], m["M_ef"][s])
            check(row[f"rel. decrease {abbr}"], decay["relative_decrease"][s])
        check(row["EFR"], decay["edit_flip_ratio"]["value"])
        assert row["flipped"]["text"] == str(decay["edit_flip_ratio"]["n_flipped"])
        assert row["succeeded after editing"]["text"] == str(decay["edit_flip_ratio"]["n_success_edited"])
        check(row["task acc. M_f"], m["M_f"]["task_accuracy"])
        check(row["task acc. M_ef"], m["M_ef"]["task_accuracy"])
        checked += 1
    assert checked == 7
    # the study-shaped table: one row per editor, a column group per recipe (M_ef), the missing cell marked
    scores = {r["editor"]["text"]: r for r in dom.rows("edit_scores")}
    assert set(scores) == {"memit", "alphaedit"}
    for cell in grid["plan"].cells:
        row = scores[cell.axes["editor"]]
        result = grid["results"][cell.id]
        if result is None:
            assert row[f"{cell.axes['recipe']} ES"]["attrs"]["data-missing"] == "pending"
            continue
        check(row["M_e ES"], result["metrics"]["M_e"]["efficacy"])
        check(row["M0 NS"], result["metrics"]["M0"]["neighborhood"])
        check(row[f"{cell.axes['recipe']} ES"], result["metrics"]["M_ef"]["efficacy"])
        check(row[f"{cell.axes['recipe']} PS"], result["metrics"]["M_ef"]["paraphrase"])
    # the per-cell flip table and the downstream table
    by_recipe = {(r["editor"]["text"], r["recipe"]["text"]): r for r in efr_rows}
    downstream = {(r["cell"]["text"], r["metric"]["text"]): r for r in dom.rows("downstream")
                  if r["task"]["text"] == "embedded"}
    for cell in grid["plan"].cells:
        result = grid["results"][cell.id]
        if result is None:
            continue
        efr = result["decay"]["edit_flip_ratio"]
        row = by_recipe[(cell.axes["editor"], cell.axes["recipe"])]
        assert row["flipped"]["text"] == str(efr["n_flipped"]) and row["requests"]["text"] == str(efr["n"])
        check(row["EFR"], efr["value"])
        ds = downstream[(cell.label, "accuracy")]
        for model in ("M0", "M_e", "M_f", "M_ef"):
            check(ds[model], result["metrics"][model]["task_accuracy"], pct=False)
        assert ds["n"]["text"] == str(result["metrics"]["M_ef"]["n_task"])
    missing = dom.rows("missing_cells")
    assert [(r["cell"]["text"], r["state"]["text"]) for r in missing] == [(grid["gone"].label, "pending")]


def test_protocol_tables_hold_survival_and_mechanism_and_say_where_the_control_is_missing(grid, rendered):
    dom = rendered["dom"]
    survival = dom.rows("survival_over_time")
    mechanism = dom.rows("mechanism")
    control = dom.rows("knowledge_control")
    done = [c for c in grid["plan"].cells if grid["results"][c.id] is not None]
    assert len(survival) == len(control) == 8
    by_key = {(r["editor"]["text"], r["recipe"]["text"]): r for r in survival}
    for cell in done:
        result = grid["results"][cell.id]
        row = by_key[(cell.axes["editor"], cell.axes["recipe"])]
        s = result["decay"]["survival"]
        assert row["edits at risk"]["text"] == str(s["n_at_risk"] == result["decay"]["edit_flip_ratio"][
            "n_success_edited"] and s["n_at_risk"])
        assert row["failed"]["text"] == str(s["n_failed"])
        check(row["edits surviving at end"], s["by_step"][-1]["survival"])
    # The fixture's CounterFact file has 3 usable records, all edited: no control fact is left, and the table
    # says so instead of showing zeros.
    assert all(r["KFR (M_e->M_ef)"]["attrs"].get("data-missing") in ("not measured", "pending") for r in control)
    trained = [r for r in mechanism if r["trained"]["text"] == "yes"]
    assert trained and all(_num(r["mean ratio"]) >= 0 for r in trained)
    assert {r["trained"]["text"] for r in mechanism} <= {"yes", "no (not measured)", "pending"}
    # Recipes and editors are also compared over time, on the requests at risk in both cells.
    over_time = [r for r in dom.rows("significance") if r["quantity"]["text"].startswith("failure step")]
    assert over_time and {r["comparison"]["text"] for r in over_time} <= {"recipe", "editor"}


def test_target_frequencies_come_from_the_data_and_the_corpus_file(rendered):
    """The tiny grid's statistics corpus is a local text file: targets are counted there and in the task data
    (`--frequency-method corpus`; the wordfreq default is tested in test_report_frequency.py)."""
    from editdecay.report.frequency import method_description

    report = json.loads((rendered["out"] / "report.json").read_text())
    table = report["tables"]["survival_requests"]
    names = [c["name"] for c in table["columns"]]
    rows = [dict(zip(names, r)) for r in table["rows"]]
    assert len(rows) == 3 and all(r["target"] for r in rows)
    assert table["notes"] == [method_description("corpus")]     # every source was available
    for r in rows:
        # the corpus's word list holds no target, so every occurrence is in TARGET_DOC; the task data has none
        assert r["count in stats corpus"] == TARGET_DOC.split().count(r["target"].strip()), r
        assert r["count in ft data"] == 0
    assert sum(r["count in stats corpus"] for r in rows) > 0


def test_activation_shift_rebuilds_the_models(grid, tmp_path):
    """--activation-shift on one cell (memit, LoRA on the edited layers 1-2): M_ef is re-trained exactly, and the
    hidden states after block 0, which neither the edit nor the fine-tuning touches, do not move."""
    from editdecay.report import build_report

    first = grid["plan"].cells[0]
    assert (first.axes["editor"], first.axes["recipe"]) == ("memit", "lora-edited")
    report = build_report(grid["out"], tmp_path, frequencies=False, activation_shift=True, activation_cells=1,
                          progress=False)
    t = report.table("activation_shift")
    assert t.notes == (f"{first.label}: re-trained M_ef matches the stored success of 3/3 requests, largest margin "
                       f"difference 0",)
    rows = t.records()
    assert [(r["prompts"], r["layer"]) for r in rows] == [(p, l) for p in ("edit", "task") for l in range(4)]
    for r in rows:
        moved = r["layer"] >= 1
        assert (r["L2 M_e"] > 0, r["L2 M_f"] > 0, r["L2 M_ef"] > 0) == (moved, moved, moved), r
        assert (r["cos(M_ef, M_e)"] is None) == (not moved)
    assert (tmp_path / "figures" / "activation_shift.png").is_file()
    assert 'id="table-activation_shift"' in (tmp_path / "report.html").read_text()
