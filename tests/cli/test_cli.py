"""The command line as a user runs it: result contract, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ZSRE_SAMPLE
from typer.testing import CliRunner

from editdecay.cli import _register, app

_register()
runner = CliRunner()


@pytest.mark.slow
def test_eval_edits_writes_result_contract(tmp_path, embedded):
    out = tmp_path / "pre.json"
    res = runner.invoke(app, ["eval-edits", "--model", "smollm2-135m", "--data", f"zsre:{ZSRE_SAMPLE}",
                              "--limit", "6", "--seed", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "efficacy" in res.output and "neighborhood" in res.output
    r = json.loads(out.read_text())
    pre = r["metrics"]["M0"]
    assert pre["n"] == 6 and len(r["requests"]) == 6
    for k in ("efficacy", "paraphrase", "neighborhood"):
        assert 0.0 <= pre[k] <= 1.0
    assert r["model"]["fingerprint"] == embedded.identity.fingerprint
    assert r["config"]["requests"]["seed"] == 1 and r["data"]["options"]["zsre_target"] == "answers"
    assert r["environment"]["packages"]["torch"] and "evaluate" in r["timings"]
    # the same seed gives the same sample
    res2 = runner.invoke(app, ["eval-edits", "--data", f"zsre:{ZSRE_SAMPLE}", "--limit", "6", "--seed", "1",
                               "--out", str(tmp_path / "again.json")])
    assert res2.exit_code == 0, res2.output
    r2 = json.loads((tmp_path / "again.json").read_text())
    assert [x["case_id"] for x in r2["requests"]] == [x["case_id"] for x in r["requests"]]
    assert r2["metrics"] == r["metrics"]


def test_strict_alt_names_empty_alt_records():
    res = runner.invoke(app, ["eval-edits", "--data", f"zsre:{ZSRE_SAMPLE}", "--zsre-target", "alt", "--strict"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "record 54" in text and "record 103" in text and "'alt'" in text
    assert "Traceback" not in res.output


def test_unknown_data_source_is_a_clear_error():
    res = runner.invoke(app, ["eval-edits", "--data", "wikifacts"])
    assert res.exit_code == 2 and "unknown source 'wikifacts'" in " ".join(res.output.split())


def test_console_script_is_installed():
    exe = subprocess.run([sys.executable, "-m", "editdecay.cli", "--help"], capture_output=True, text=True)
    assert exe.returncode == 0 and "eval-edits" in exe.stdout and "edit" in exe.stdout
