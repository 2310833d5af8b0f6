"""Every JSON the package writes is valid JSON: NaN and infinities become null plus a status.

Python's json writes bare `NaN`/`Infinity`, which strict parsers (JavaScript, jq, Go, Rust serde)
reject. Every writer goes through `core.cache.dumps_json`.
"""

from __future__ import annotations

import ast
import io
import json
import math

import numpy as np
from support import ROOT
from typer.testing import CliRunner

from editdecay.cli import _register, app

SRC = ROOT / "src" / "editdecay"
NAN = float("nan")
PAYLOAD = {"metrics": {"post": {"efficacy": 0.5, "margin": NAN}}, "curve": [{"step": 0, "loss": float("inf")},
                                                                          {"step": 1, "loss": np.float32("-inf")}]}
WANT = {"metrics.post.margin": "nan", "curve[0].loss": "inf", "curve[1].loss": "-inf"}


def strict(text: str):
    """Parse as a strict parser does: bare NaN / Infinity / -Infinity are errors."""
    def refuse(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=refuse)


def check(obj: dict) -> None:
    assert obj["metrics"]["post"] == {"efficacy": 0.5, "margin": None}
    assert [p["loss"] for p in obj["curve"]] == [None, None, None][:len(obj["curve"])]
    assert obj["non_finite"] == WANT


def test_no_writer_encodes_json_itself():
    """The kind, statically: no file/stream write of a `json.dumps(...)` anywhere (only `dumps_json`)."""
    bad = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name not in ("write", "write_text", "write_bytes", "atomic_write_bytes", "dump"):
                continue
            if name == "dump" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "json":
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} json.dump")
                continue
            for sub in ast.walk(node):
                if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "dumps"
                        and getattr(sub.func.value, "id", "") == "json"):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not bad, f"JSON written with json.dumps (bare NaN possible): {bad}"


def test_result_and_cache_writers(tmp_path):
    """atomic_write_json: result.json (write_result), patch.json, manifests and grid records go through it."""
    from editdecay.core.cache import atomic_write_json

    atomic_write_json(tmp_path / "c.json", PAYLOAD)
    check(strict((tmp_path / "c.json").read_text()))


def test_line_and_stage_writers(tmp_path):
    from editdecay.finetune.train import _write
    from editdecay.grid.plan import Plan, Stage
    from editdecay.grid.stages import StageContext
    from editdecay.grid.store import GridStore

    buf = io.StringIO()
    _write(buf, PAYLOAD)                                   # train_log.jsonl
    check(strict(buf.getvalue()))
    store = GridStore(tmp_path / "g")
    store.event(**PAYLOAD)                                 # logs/events-*.jsonl
    [line] = [l for p in (tmp_path / "g" / "logs").iterdir() for l in p.read_text().splitlines()]
    check(strict(line))
    ctx = StageContext(Stage("s", "stats", {}, (), "s"), Plan("x", (), {}), store, tmp_path / "stage")
    ctx.out.mkdir()
    ctx.write_json("outputs.json", PAYLOAD)                # stage outputs
    check(strict((ctx.out / "outputs.json").read_text()))


def test_cli_json_output_and_report_json(tmp_path, capsys):
    """`grid ... --json` printing and `report`'s report.json, through the CLI, on results holding NaN."""
    from support.results import build_results_dir

    from editdecay.cli.grid import _print_json
    from editdecay.grid.store import GridStore

    _print_json(PAYLOAD)
    check(strict(capsys.readouterr().out))

    root = tmp_path / "results"
    cells = build_results_dir(root)
    path = GridStore(root).result_path(cells["A"].id)
    r = json.loads(path.read_text())
    r["requests"][0]["margin"]["M_ef"] = NAN              # as an old writer left it: bare NaN in the file
    r["requests"][0]["M_ef"]["margin"] = NAN
    path.write_text(json.dumps(r))
    _register()
    res = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "rep"), "--no-frequencies"])
    assert res.exit_code == 0, res.output
    rep = strict((tmp_path / "rep" / "report.json").read_text())
    assert rep["non_finite"] and set(rep["non_finite"].values()) <= {"nan", "inf", "-inf"}   # the status


def test_json_safe_keeps_finite_values_exactly():
    from editdecay.core.cache import dumps_json

    obj = {"a": 1, "b": 0.1, "c": [1e308, -0.0, True, None, "NaN"], "d": np.float64(2.5), "e": (1, 2)}
    back = strict(dumps_json(obj))
    assert back == {"a": 1, "b": 0.1, "c": [1e308, -0.0, True, None, "NaN"], "d": 2.5, "e": [1, 2]}
    assert "non_finite" not in back and not math.isnan(back["b"])
