"""Target frequency by wordfreq (the report's default method) on the hand-built results directory of
support/results.py: targets with a known English frequency order, survival worked out by hand.

Per-request outcomes (support.results.OUTCOMES): erased (cell, request) pairs are A/r2, B/r1, B/r2;
survivors A/r1, A/r3, B/r3, C/r1..r4 (r4 failed after editing in A and B).
"""

from __future__ import annotations

import json
from statistics import mean

import pytest
from support.results import build_results_dir
from wordfreq import zipf_frequency

from editdecay.core.errors import ConfigError
from editdecay.grid.store import GridStore
from editdecay.report import build_report, load_results
from editdecay.report.analysis import analyse
from editdecay.report.frequency import TargetFrequencies
from editdecay.report.survival import request_frame, survival_requests, survival_summary

# English frequency order, without doubt: "the" > "Paris" > "Ulaanbaatar"; r4 a common word too.
TARGETS = {"r1": " Paris", "r2": " Ulaanbaatar", "r3": " the", "r4": " water"}


@pytest.fixture()
def freq_dir(tmp_path):
    cells = build_results_dir(tmp_path)
    store = GridStore(tmp_path)
    for name in ("A", "B", "C"):
        cell = cells[name]
        path = store.result_path(cell.id)
        r = json.loads(path.read_text())
        r["stages"] = {"patch": {"id": cell.stages["patch"]}}
        path.write_text(json.dumps(r))
        patch = tmp_path / "stages" / cell.stages["patch"] / "patch" / "patch.json"
        patch.parent.mkdir(parents=True, exist_ok=True)
        patch.write_text(json.dumps({"requests": [{"case_id": c, "target_new": t} for c, t in TARGETS.items()]}))
    return tmp_path


def test_wordfreq_orders_targets_and_compares_survivors_with_erased(freq_dir):
    freq = TargetFrequencies(freq_dir)
    assert freq.method == "wordfreq"
    frame = request_frame(analyse(load_results(freq_dir)), freq)
    table = survival_requests(frame, freq)
    zipf = {r["request"]: r["Zipf frequency"] for r in table.records()}
    assert zipf == {c: pytest.approx(zipf_frequency(t.strip(), "en")) for c, t in TARGETS.items()}
    assert zipf["r3"] > zipf["r1"] > zipf["r2"] > 0
    assert all(r["count in ft data"] is None for r in table.records())      # no corpus counting
    assert table.notes[0].startswith("target frequency: wordfreq") and "Zipf" in table.notes[0]
    summary = {r["quantity"]: r for r in survival_summary(frame, freq).records()}
    assert set(summary) == {"margin after editing (M_e)", "target Zipf frequency (wordfreq, English)"}
    row = summary["target Zipf frequency (wordfreq, English)"]
    survived = [zipf[c] for c in ("r1", "r3", "r3", "r1", "r2", "r3", "r4")]
    erased = [zipf[c] for c in ("r2", "r1", "r2")]
    assert (row["n survived"], row["n erased"]) == (7, 3)
    assert row["survived mean"] == pytest.approx(mean(survived)) and row["erased mean"] == pytest.approx(mean(erased))
    # U of the survivors: pairs (survived, erased) where the survivor is more frequent, ties half
    u = sum((s > e) + 0.5 * (s == e) for s in survived for e in erased)
    assert row["U"] == pytest.approx(u) and 0 < row["p"] <= 1


def test_the_report_says_which_method_it_used(freq_dir, tmp_path):
    md = (build_report(freq_dir, tmp_path / "w", progress=False).files["report.md"]).read_text()
    assert "target frequency: wordfreq" in md and "Zipf frequency" in md
    corpus = build_report(freq_dir, tmp_path / "c", frequency_method="corpus", progress=False)
    text = corpus.files["report.md"].read_text()
    assert "target frequency: occurrences of the target's tokens" in text
    assert "target per million fine-tuning tokens" in text and "target Zipf frequency" not in text
    with pytest.raises(ConfigError, match="frequency method 'zipf' is not valid; use one of wordfreq, corpus"):
        build_report(freq_dir, tmp_path / "x", frequency_method="zipf", progress=False)
    assert not (tmp_path / "x").exists()
