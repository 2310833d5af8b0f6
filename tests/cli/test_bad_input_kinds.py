"""Kinds of bad input, each tested as a kind through the command line where a user meets it.

Every case checks what the user sees and what is left on disk: exit 2 (1 for a run-time failure), a message
naming the value, no traceback, and nothing written or deleted. Cases that must fail before a model loads run
with model loading replaced by an assertion (`no_model`), so a check that moved after the load fails the test.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from support.grids import grid_dict, write_grid
from support.results import build_results_dir, tree
from typer.testing import CliRunner

from editdecay.cli import _register, app

_register()
runner = CliRunner(env={"COLUMNS": "1000"})      # no wrapping inside paths in messages


def _text(res) -> str:
    return " ".join(res.output.split())


def refused(args, *, code: int = 2, match: str | tuple = (), untouched: Path | None = None) -> str:
    """Invoke the CLI with `args`; assert exit `code`, no traceback, every `match` in the message and `untouched`
    unchanged. Returns the message."""
    before = tree(untouched) if untouched is not None and untouched.exists() else None
    res = runner.invoke(app, [str(a) for a in args])
    text = _text(res)
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    for m in (match,) if isinstance(match, str) else match:
        assert m in text, text
    if before is not None:
        assert tree(untouched) == before
    return text


def finished_run(directory: Path, kind: str = "finetune") -> Path:
    """A directory as a finished run of `kind` leaves it (what output checks look at: result.json and its files)."""
    directory.mkdir(parents=True)
    (directory / "result.json").write_text(json.dumps({"kind": kind, "status": "done"}))
    (directory / "train_log.jsonl").write_text('{"step": 1}\n')
    (directory / "adapter").mkdir()
    (directory / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return directory


def save_patch(directory: Path, *, layers=(1, 2), modules=None, editor="memit", n_requests=2, deltas=None) -> Path:
    """A patch directory for the tiny Llama: deltas on the MLP output of `layers` (or `modules`)."""
    from editdecay.data import load_edit_data
    from editdecay.edit.patch import EditPatch

    modules = modules or [f"model.layers.{i}.mlp.down_proj" for i in layers]
    deltas = deltas or {m: torch.full((32, 64), 0.01) for m in modules}
    reqs = load_edit_data("worldfacts", limit=n_requests).requests if n_requests else ()
    EditPatch(deltas, tuple(layers), editor, {}, tuple(reqs), {"fingerprint": "x"}).save(directory)
    return directory


def edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "patch.json").read_text())
    meta.update(changes)
    (directory / "patch.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- 1: the result says what ran


@pytest.mark.parametrize("args, match", [
    (["edit", "--n", "100000"], ("n=100000 asks for more requests than worldfacts has", "usable")),
    (["eval-edits", "--limit", "100000"], "n=100000 asks for more requests than worldfacts has"),
    (["finetune", "--requests", "worldfacts", "--limit", "100000"], "--limit 100000 asks for more requests"),
    (["finetune", "--requests", "worldfacts", "--limit", "-1"], "--limit -1 is not a number of requests"),
    (["finetune", "--requests", "worldfacts", "--limit", "0"], "--limit 0 is not a number of requests"),
])
def test_a_count_the_data_cannot_give_is_refused(world, tmp_path, no_model, args, match):
    out = tmp_path / "out"
    refused([*args, "--model", world["model"], *(["--out", out] if args[0] != "eval-edits" else [])], match=match)
    assert not out.exists()


def test_a_limit_beyond_the_patch_requests_is_refused(world, tmp_path, no_model):
    patch = save_patch(tmp_path / "p", n_requests=2)
    for args in (["finetune", "--out", tmp_path / "run"], ["eval-edits"]):
        refused([*args, "--model", world["model"], "--patch", patch, "--limit", "3"],
                match="--limit 3 asks for more requests than", untouched=patch)
    assert not (tmp_path / "run").exists()


def test_grid_n_edits_beyond_the_data_fails_its_cells_before_computing(world, tmp_path):
    from editdecay.grid.store import GridStore

    grid = write_grid(tmp_path / "g.yaml", grid_dict(world, n_edits=[100000]))
    out = tmp_path / "results"
    refused(["grid", "run", grid, "--out", out], code=1, match="n_edits=100000 asks for more requests than zsre:")
    store = GridStore(out)
    assert not any(e["event"] == "computed" for e in store.events())      # nothing ran with fewer edits


# --------------------------------------------------------------------------- 2: a patch is what it claims


def _nan_patch(d: Path) -> Path:
    from safetensors.torch import save_file

    from editdecay.core.cache import sha256_file

    save_patch(d)
    t = {f"model.layers.{i}.mlp.down_proj": torch.full((32, 64), 0.01) for i in (1, 2)}
    t["model.layers.2.mlp.down_proj"][3, 4] = float("nan")
    save_file(t, d / "patch.safetensors")
    edit_meta(d, tensors_sha256=sha256_file(d / "patch.safetensors"))     # hashes updated to match
    return d


@pytest.mark.parametrize("make, match", [
    (_nan_patch, "the delta of 'model.layers.2.mlp.down_proj' holds 1 NaN or infinite value(s)"),
    (lambda d: edit_meta(save_patch(d), layers=[0, 3]), "layers=[0, 3], but its modules sit in layers [1, 2]"),
    (lambda d: edit_meta(save_patch(d), modules=[]), "modules"),
    (lambda d: edit_meta(save_patch(d), requests=[]), "requests"),
    (lambda d: edit_meta(save_patch(d), editor="memitt"), "'memitt' is not valid (did you mean 'memit'?)"),
    (lambda d: edit_meta(save_patch(d), layers="1-x"), "'1-x' is not a layer list"),
    (lambda d: edit_meta(save_patch(d), modules="model.layers.1.mlp.down_proj"), "modules"),
])
@pytest.mark.parametrize("command", ["eval-edits", "finetune"])
def test_a_patch_that_is_not_what_it_claims_is_refused(world, tmp_path, no_model, make, match, command):
    d = tmp_path / "patch"
    make(d)
    extra = ["--out", tmp_path / "run", "--layers", "edited"] if command == "finetune" else []
    refused([command, "--model", world["model"], "--patch", d, *extra], match=(str(d), match), untouched=d)
    assert not (tmp_path / "run").exists()


def test_a_patch_with_layers_written_as_text_is_read(tmp_path):
    from editdecay.edit.patch import EditPatch

    d = save_patch(tmp_path / "p")
    edit_meta(d, layers="1,2")
    assert EditPatch.load(d).layers == (1, 2)


def test_a_diverged_edit_is_never_saved(tmp_path):
    from editdecay.core.errors import NonFiniteError
    from editdecay.edit.patch import EditPatch

    delta = torch.zeros(32, 64)
    delta[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="'model.layers.1.mlp.down_proj' holds 1 NaN or infinite"):
        EditPatch({"model.layers.1.mlp.down_proj": delta}, (1,), "memit", {}).save(tmp_path / "p")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_a_patch_module_that_is_missing_or_has_no_weight_is_named(world, tmp_path):
    from editdecay.core.errors import ConfigError
    from editdecay.core.models import load_model
    from editdecay.edit.patch import EditPatch

    lm = load_model(str(world["model"]), device="cpu")
    for name, match in (("model.layers.9.mlp.down_proj", "has no such module; the patch was made for another"),
                        ("model.layers.1.mlp.act_fn", "is a SiLUActivation, which has no weight")):
        with pytest.raises(ConfigError, match=match):
            EditPatch({name: torch.zeros(32, 64)}, (1,), "memit", {}).apply(lm.model)


# --------------------------------------------------------------------------- 3: a run that did nothing is named


def test_an_edit_that_changed_no_weight_is_named(tokenizer, tmp_path, monkeypatch):
    """Targets already met (a zero residual R in E4) give an all-zero delta: the run says so."""
    import editdecay.edit.memit as memit
    from editdecay.core.cache import Cache
    from editdecay.edit import api
    from editdecay.edit.solve import memit_delta
    from support.edits import REQUESTS, small_edit_config, write_corpus
    from support.models import make_tiny

    monkeypatch.setattr(memit, "memit_delta", lambda K, R, C, lam, **kw: memit_delta(K, torch.zeros_like(R), C, lam,
                                                                                      **kw))
    corpus = write_corpus(tmp_path / "text.txt")
    cfg = small_edit_config("memit", layers=(1, 2), v_num_grad_steps=2, n_context_templates=1, context_length=4,
                            stats_corpus=str(corpus), stats_tokens=200)
    patch, run = api.edit_model(make_tiny("llama", tokenizer), "memit", cfg, REQUESTS[:2], cache=Cache(tmp_path / "c"),
                                progress=False)
    assert all(n == 0 for n in patch.norms().values())
    assert any("changed nothing: every weight delta is zero" in w for w in run.warnings)
    assert any("changed nothing" in w for w in patch.extra["warnings"])


def test_a_run_that_never_leaves_warm_up_is_named(world, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        refused(["finetune", "--model", world["model"], "--preset", "study", "--data", "embedded", "--steps", "2",
                 "--batch-size", "2", "--cutoff", "64", "--task-train", "8", "--task-test", "4", "--no-task-eval",
                 "--train-dtype", "float32", "--eval-every", "0", "--save", "none", "--no-progress", "--out", out],
                code=0)
    assert "never leaves warm-up: 100 warm-up step(s) for a run of 2" in caplog.text
    assert "never leaves warm-up" in json.loads((out / "result.json").read_text())["warnings"][0]


# --------------------------------------------------------------------------- 4: reporting what is there


def test_the_embedded_task_is_not_reported_for_a_run_trained_on_other_data(world, tmp_path):
    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": w} for w in "abcdefgh"]))
    common = ["finetune", "--model", world["model"], "--data", f"instructions:{data}", "--steps", "1", "--batch-size",
              "2", "--eval-every", "0", "--save", "none", "--no-progress", "--task-train", "8", "--task-test", "4"]
    text = refused([*common, "--out", tmp_path / "a"], code=0)
    assert "task exact match" not in text
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert "task_accuracy" not in result["metrics"]["M_f"] or result["metrics"]["M_f"]["task_accuracy"] is None
    assert "weights.safetensors" not in result["measured_model"] and "adapter/" not in result["measured_model"]
    text = refused([*common, "--task-eval", "--out", tmp_path / "b"], code=0)      # asked: scored, and said so
    assert "embedded (held out; this run trained on other data) task exact match" in text


def test_a_cell_result_cut_short_or_of_another_schema_is_invalid_not_done(tmp_path):
    from editdecay.grid.store import GridStore

    root = tmp_path / "results"
    cells = build_results_dir(root)
    store = GridStore(root)
    a, c = store.result_path(cells["A"].id), store.result_path(cells["C"].id)
    a.write_bytes(a.read_bytes()[:200])                                       # cut short
    c.write_text(json.dumps({"kind": "grid-cell", "schema_version": 99}))    # a schema this version cannot read
    res = runner.invoke(app, ["grid", "status", str(root), "--json"])
    assert res.exit_code == 0, res.output
    states = {x["id"]: x for x in json.loads(res.output)["cells"]}
    assert states[cells["A"].id]["state"] == "invalid" and "cut short" in states[cells["A"].id]["error"]
    assert states[cells["C"].id]["state"] == "invalid"
    assert states[cells["B"].id]["state"] == "done"
    text = refused(["grid", "status", root], code=0, match="invalid")
    assert "2 invalid" in text
    refused(["report", root, "--out", tmp_path / "report", "--no-frequencies"], code=0)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "invalid" in md


# --------------------------------------------------------------------------- 5: no lost runs


@pytest.mark.parametrize("command, holds", [
    (["edit"], "finetune"), (["edit"], "eval-edits"), (["finetune"], "edit"), (["finetune", "--overwrite"], "edit"),
    (["edit", "--overwrite"], "finetune"), (["finetune"], "grid"),
])
def test_an_output_directory_holding_another_kind_of_run_is_refused(world, tmp_path, no_model, command, holds):
    run = tmp_path / "run"
    if holds == "edit":
        save_patch(run)
        (run / "result.json").write_text(json.dumps({"kind": "edit"}))
    elif holds == "grid":
        run.mkdir()
        (run / "plan.json").write_text("{}")
    else:
        finished_run(run, holds)
    refused([*command, "--model", world["model"], "--out", run], match=(str(run), "holds", "choose another directory"),
            untouched=run)


def test_a_run_of_the_same_kind_needs_overwrite(world, tmp_path, no_model):
    run = finished_run(tmp_path / "run")
    refused(["finetune", "--model", world["model"], "--out", run], match="pass --overwrite", untouched=run)
    patch = save_patch(tmp_path / "patch")
    refused(["edit", "--model", world["model"], "--out", patch], match="already holds a patch directory",
            untouched=patch)


@pytest.mark.parametrize("bad", [["--layers", "99"], ["--targets", "mlp.nothing"]])
def test_overwrite_deletes_nothing_until_every_setting_is_valid(world, tmp_path, bad):
    run = finished_run(tmp_path / "run")
    refused(["finetune", "--model", world["model"], "--overwrite", *bad, "--out", run], untouched=run)


def test_eval_edits_never_replaces_a_file_that_is_not_its_result(world, tmp_path, no_model):
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    refused(["eval-edits", "--model", world["model"], "--out", other], match="is not an editdecay result",
            untouched=tmp_path)
    patch_result = finished_run(tmp_path / "ft") / "result.json"
    refused(["eval-edits", "--model", world["model"], "--out", patch_result], match="a fine-tuning run",
            untouched=tmp_path)


# --------------------------------------------------------------------------- 6: a live lock is kept


def test_non_positive_stale_ages_are_refused(tmp_path):
    root = tmp_path / "results"
    build_results_dir(root)
    for command in ("status", "unlock"):
        for age in ("0", "-1", "inf"):
            refused(["grid", command, root, "--stale-after", age], match="--stale-after", untouched=root)


# --------------------------------------------------------------------------- 7: named errors, not tracebacks


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
@pytest.mark.parametrize("command", [["edit", "--n", "1"], ["eval-edits", "--limit", "1"], ["finetune"]])
def test_a_device_this_machine_lacks_is_refused_before_loading(world, tmp_path, no_model, device, command):
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if torch.cuda.is_available() and device != "cuda:7":
        pytest.skip("this machine has the device")
    out = [] if command[0] == "eval-edits" else ["--out", tmp_path / "out"]
    refused([*command, "--model", world["model"], "--device", device, *out], match=f"--device={device!r}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("place, match", [
    ("file", "is a file, not a directory"), ("child", "a part of its path"), ("devnull", "is a character device"),
])
@pytest.mark.parametrize("command", [["edit", "--n", "1"], ["finetune"], ["report", "RESULTS"]])
def test_an_output_path_that_cannot_be_a_directory_is_refused_first(world, tmp_path, no_model, place, match, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = {"file": afile, "child": afile / "run", "devnull": Path("/dev/null")}[place]
    if command[0] == "report":
        root = tmp_path / "results"
        build_results_dir(root)
        args = ["report", root, "--no-frequencies"]
    else:
        args = [*command, "--model", world["model"]]
    refused([*args, "--out", out], match=(str(out), match))
    assert afile.read_text() == "x"


def test_eval_edits_output_that_is_a_directory_or_under_a_file_is_refused(world, tmp_path, no_model):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(["eval-edits", "--model", world["model"], "--out", tmp_path], match="is a directory, not a file")
    refused(["eval-edits", "--model", world["model"], "--out", afile / "r.json"], match="a part of its path")


def test_status_reads_a_results_directory_it_cannot_write(tmp_path, monkeypatch):
    """A lock file that cannot be opened for writing (a read-only copy of a results directory) is asked about through
    a read-only descriptor: a held lock is still seen as held."""
    import fcntl

    import editdecay.grid.store.locks as locks
    from editdecay.grid.store import GridStore

    class ReadOnlyLock:
        def __init__(self, *a, **k):
            pass

        def acquire(self):
            raise PermissionError(13, "Permission denied")

    root = tmp_path / "results"
    cells = build_results_dir(root)
    store = GridStore(root)
    sid = cells["E"].stages["cell"]
    lock_file = store.beside(sid, locks.LOCK)
    lock_file.touch()
    monkeypatch.setattr(locks, "FileLock", ReadOnlyLock)
    assert not store.is_locked(sid)
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # another holder
        assert store.is_locked(sid)
        refused(["grid", "status", root], code=0, match="running")
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_is_refused_first(world, tmp_path, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    refused(["finetune", "--model", world["model"], "--out", ro / "run"], match="is not writable")


def test_grid_files_and_model_configs_of_the_wrong_shape_are_named(world, tmp_path):
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text(json.dumps(grid_dict(world)), encoding="utf-16")
    refused(["grid", "plan", utf16], match="is UTF-16 text")
    refused(["grid", "run", utf16, "--out", tmp_path / "o"], match="is UTF-16 text")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    g = write_grid(tmp_path / "g.yaml", grid_dict(world, models=[{"name": str(listed), "label": "l"}]))
    refused(["grid", "plan", g], match="holds a JSON list, not an object")
    gpu = grid_dict(world)
    gpu["shared"]["device"] = "gpu"
    refused(["grid", "plan", write_grid(tmp_path / "gpu.yaml", gpu)], match="shared.device='gpu' is not valid")
    refused(["grid", "plan", tmp_path], match="is a directory, not a regular file")
    refused(["grid", "plan", "/dev/null"], match="is a character device")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p.write_text(p.read_text()[:100]), "cut short"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "stages": None})), "stages"),
    (lambda p: p.write_text(json.dumps({"format": 2, "name": "hand"})), "stages"),
    (lambda p: p.write_text("[]"), "not an object"),
])
@pytest.mark.parametrize("command", [["grid", "status"], ["grid", "gather"], ["grid", "unlock"], ["report"]])
def test_a_damaged_plan_is_named_by_every_command_that_reads_it(tmp_path, mutate, match, command):
    root = tmp_path / "results"
    build_results_dir(root)
    mutate(root / "plan.json")
    extra = ["--out", tmp_path / "report", "--no-frequencies"] if command == ["report"] else []
    refused([*command, root, *extra], match=("plan.json", match), untouched=root)


def test_deeply_nested_data_is_a_named_error(world, tmp_path, no_model):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused(["eval-edits", "--model", world["model"], "--data", f"counterfact:{deep}"], match="too deeply")
    refused(["finetune", "--model", world["model"], "--data", f"instructions:{deep}", "--out", tmp_path / "o"],
            match="too deeply")
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"instruction": "a", "input": "", "output": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(["finetune", "--model", world["model"], "--data", f"instructions:{lines}", "--out", tmp_path / "o"],
            match="too deeply")


# --------------------------------------------------------------------------- 8: the wrong loader for a file


def test_a_file_for_another_loader_is_named_and_the_list_is_capped(world, tmp_path, no_model):
    from support import ZSRE_SAMPLE

    records = tmp_path / "commonsense.json"
    records.write_text(json.dumps([{"instruction": f"Q{i}?", "input": "", "output": "A"} for i in range(100)]))
    text = refused(["eval-edits", "--model", world["model"], "--data", f"counterfact:{records}"],
                   match=("100 record(s) rejected (300 problems); the problems of the first 5 of them",
                          f"`instructions:{records}`"))
    assert "record 4:" in text and "record 5:" not in text
    refused(["eval-edits", "--model", world["model"], "--data", f"counterfact:{ZSRE_SAMPLE}"],
            match=f"`zsre:{ZSRE_SAMPLE}`")


# --------------------------------------------------------------------------- 9: messages about the value given


def test_messages_say_what_is_wrong_with_the_value(world, tmp_path, no_model):
    refused(["finetune", "--model", world["model"], "--layers", "3-1", "--out", tmp_path / "o"],
            match="'3-1', which runs backwards: write it low-high, 1-3")
    two = grid_dict(world, models=[{"name": str(world["model"]), "label": "a"},
                                   {"name": str(world["model"]), "label": "b"}])
    text = refused(["grid", "plan", write_grid(tmp_path / "two.yaml", two)], match="listed twice")
    assert "distinct label" not in text and "same weights" in text
    bogus = grid_dict(world)
    bogus["shared"]["statistics"]["bogus"] = 1
    text = refused(["grid", "plan", write_grid(tmp_path / "bogus.yaml", bogus)],
                   match="shared.statistics.bogus: unknown field")
    assert "gpus" not in text
    refused(["eval-edits", "--model", world["model"], "--data", "counterfact:/dev/null"],
            match="'/dev/null' is a character device")


# --------------------------------------------------------------------------- 10: bounded, regular reads


@pytest.mark.parametrize("target", ["result", "stage.json", "plan.json"])
@pytest.mark.parametrize("command", [["grid", "status"], ["report"]])
def test_a_results_file_linked_to_a_device_is_not_read(tmp_path, target, command):
    root = tmp_path / "results"
    cells = build_results_dir(root)
    from editdecay.grid.store import GridStore

    store = GridStore(root)
    path = {"result": store.result_path(cells["A"].id), "plan.json": root / "plan.json",
            "stage.json": store.stage_dir(cells["A"].stages["cell"]) / "stage.json"}[target]
    path.unlink()
    path.symlink_to("/dev/zero")
    extra = ["--out", tmp_path / "report", "--no-frequencies"] if command == ["report"] else []
    res = runner.invoke(app, [*map(str, command), str(root), *extra])
    assert res.exit_code in (0, 2) and "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    if target == "plan.json":
        assert res.exit_code == 2 and "is a character device" in _text(res)


@pytest.mark.parametrize("name", ["patch.json", "patch.safetensors"])
def test_a_patch_file_linked_to_a_device_is_not_read(world, tmp_path, no_model, name):
    d = save_patch(tmp_path / "p")
    (d / name).unlink()
    (d / name).symlink_to("/dev/zero")
    refused(["eval-edits", "--model", world["model"], "--patch", d], match="is a character device")


def test_oversized_and_alias_bomb_files_are_refused(world, tmp_path):
    from editdecay.core.files import MAX_GRID_BYTES, MAX_RESULT_BYTES

    root = tmp_path / "results"
    cells = build_results_dir(root)
    with open(root / "plan.json", "r+b") as f:           # sparse: no disk used, and never read
        f.truncate(MAX_RESULT_BYTES + 1)
    refused(["grid", "status", root], match=("plan.json", "more than the 512.0 MiB"))
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_GRID_BYTES + 1)
    refused(["grid", "plan", big], match="more than the 16.0 MiB")
    bomb = grid_dict(world)
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    bomb_file = tmp_path / "bomb.yaml"
    bomb_file.write_text(text + write_grid(tmp_path / "plain.yaml", bomb).read_text())
    refused(["grid", "plan", bomb_file], match="alias bomb")
    assert cells


def test_long_prompts_are_rejected_by_field(world, tmp_path, no_model):
    rec = {"case_id": 0, "requested_rewrite": {"prompt": "{} is " + "x" * 2_000_000, "subject": "A",
                                               "target_new": {"str": "B"}, "target_true": {"str": "C"}},
           "paraphrase_prompts": [], "neighborhood_prompts": []}
    data = tmp_path / "long.json"
    data.write_text(json.dumps([rec]))
    refused(["eval-edits", "--model", world["model"], "--data", f"counterfact:{data}"],
            match="'requested_rewrite.prompt': 2,000,006 characters long, more than the 20,000")
    text = tmp_path / "long.txt"
    text.write_text("word " * 300_000)
    refused(["finetune", "--model", world["model"], "--data", f"text:{text}", "--out", tmp_path / "o"],
            match="1,500,000 characters long, more than 1,000,000")


# --------------------------------------------------------------------------- 11: an interrupted run


def test_partial_logs_of_an_interrupted_run_are_cleared_with_a_warning(world, tmp_path, caplog):
    # An interrupted run leaves logs and a curve but no result.json: the rerun (no --overwrite) says which files it
    # removes and trains; a directory holding a finished run is still refused without --overwrite.
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"step": 1, "interrupted": true}\n')
    (out / "curve.jsonl").write_text('{"step": 0}\n')
    args = ["finetune", "--model", world["model"], "--data", "embedded", "--steps", "1", "--batch-size", "2",
            "--cutoff", "64", "--task-train", "8", "--task-test", "4", "--no-task-eval", "--eval-every", "0",
            "--save", "none", "--no-progress", "--out", out]
    with caplog.at_level("WARNING"):
        refused(args, code=0)
    assert "interrupted" in caplog.text and "train_log.jsonl, curve.jsonl" in caplog.text
    assert "interrupted" not in (out / "train_log.jsonl").read_text()          # this run's log, not the old one
    assert json.loads((out / "result.json").read_text())["kind"] == "finetune"
    refused(args, code=2, match="--overwrite", untouched=out)


# --------------------------------------------------------------------------- 12: results readable by the group


def test_results_are_written_with_ordinary_permissions(tmp_path):
    from editdecay.core.cache import atomic_dir
    from editdecay.finetune.run import _publish
    from editdecay.grid.store import GridStore

    old = os.umask(0o022)
    try:
        patch = save_patch(tmp_path / "p")
        root = tmp_path / "results"
        build_results_dir(root)
        table = GridStore(root).gather(GridStore(root).read_plan())
        with atomic_dir(tmp_path / "stage") as tmp:
            (tmp / "x").write_text("x")
        from safetensors.torch import save_file

        _publish(tmp_path / "w.safetensors", lambda p: save_file({"w": torch.zeros(2)}, p))     # 0600 by itself
        _publish(tmp_path / "adapter", lambda p: save_file({"a": torch.zeros(2)}, Path(p) / "a.safetensors"),
                 directory=True)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)          # noqa: E731
    assert mode(patch / "patch.safetensors") == mode(patch / "patch.json") == 0o644
    assert mode(table) == mode(root / "results.csv") == 0o644
    assert mode(tmp_path / "stage") == mode(tmp_path / "adapter") == 0o755
    assert mode(tmp_path / "w.safetensors") == mode(tmp_path / "adapter" / "a.safetensors") == 0o644
