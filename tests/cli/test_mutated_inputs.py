"""Property: whatever is done to a file editdecay reads, every command that reads it ends with a named error or a
result, never a traceback, and changes nothing it was given.

The files are those of a results directory (plan, cell results, stage manifests and results, failure records,
archived plans), of a patch directory and a grid file; the mutations are the kinds a copied, cut or tampered
file has: cut short (at a seeded random point, or to nothing), a JSON value of the wrong type in place of the
whole file or of one of its fields, a non-regular file in its place (a link to /dev/zero, a FIFO, a directory),
a file larger than its kind's limit (sparse: nothing is written or read), UTF-16 text. Every file is combined
with every mutation (an exhaustive product, seeded where a choice is made), and fed to every command that reads
it. Model loading is replaced by an assertion: a mutated patch must be refused before a model loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from support.grids import grid_dict, write_grid
from support.results import build_results_dir, tree
from typer.testing import CliRunner

from editdecay.cli import _register, app
from editdecay.core.files import MAX_GRID_BYTES, MAX_RESULT_BYTES

_register()
runner = CliRunner(env={"COLUMNS": "1000"})


def _cut(p: Path, rng: random.Random) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:rng.randrange(1, max(2, len(data)))])


def _empty(p: Path, rng: random.Random) -> None:
    p.write_bytes(b"")


def _wrong_whole_type(p: Path, rng: random.Random) -> None:
    p.write_text(json.dumps(rng.choice([[], "text", None, 7, [{"kind": "grid-cell"}]])))


def _wrong_field_type(p: Path, rng: random.Random) -> None:
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or not data:
        return _wrong_whole_type(p, rng)
    key = rng.choice(sorted(data))
    data[key] = {"unexpected": [1]} if isinstance(data[key], list) else [{"unexpected": 1}]
    p.write_text(json.dumps(data))


def _to_device(p: Path, rng: random.Random) -> None:
    p.unlink()
    p.symlink_to("/dev/zero")


def _fifo(p: Path, rng: random.Random) -> None:
    p.unlink()
    os.mkfifo(p)


def _directory(p: Path, rng: random.Random) -> None:
    p.unlink()
    p.mkdir()


def _oversized(p: Path, rng: random.Random) -> None:
    limit = MAX_GRID_BYTES if p.suffix in (".yaml", ".yml") else MAX_RESULT_BYTES
    with open(p, "r+b") as f:           # sparse: the size is what is checked, nothing is read
        f.truncate(limit + 1)


def _utf16(p: Path, rng: random.Random) -> None:
    p.write_text(p.read_text(), encoding="utf-16")


JSON_MUTATIONS = (_cut, _empty, _wrong_whole_type, _wrong_field_type, _to_device, _fifo, _directory, _oversized,
                  _utf16)


def check(args: list, *, given: Path, writes: tuple[str, ...] = ()) -> None:
    """The property: exit 0, 1 or 2, no traceback, and `given` unchanged (apart from the outputs `writes`)."""
    before = {k: v for k, v in tree(given).items() if not k.startswith(writes) or not writes}
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code in (0, 1, 2), f"{args}: exit {res.exit_code}\n{res.output}"
    # An exception that escaped the command (CliRunner keeps it instead of printing its traceback).
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{args}: {res.exception!r}"
    after = {k: v for k, v in tree(given).items() if not k.startswith(writes) or not writes}
    assert after == before, f"{args} changed what it was given"
    return res


def _mutants(files, mutations, seed: int):
    return [pytest.param(f, m, seed + i, id=f"{f}-{m.__name__.strip('_')}")
            for i, (f, m) in enumerate((f, m) for f in files for m in mutations)]


# --------------------------------------------------------------------------- results directories


@pytest.fixture(scope="module")
def results_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "results"
    build_results_dir(root)
    return root


RESULT_FILES = ("plan.json", "results/cell-A-id.json", "stages/cell-A/stage.json", "stages/cell-A/result.json",
                "stages/finetune-D.failed.json", "PLANS")


@pytest.mark.parametrize("name, mutation, seed", _mutants(RESULT_FILES, JSON_MUTATIONS, 100))
def test_a_mutated_results_directory(results_template, tmp_path, name, mutation, seed):
    root = tmp_path / "results"
    shutil.copytree(results_template, root, symlinks=True)
    if name == "PLANS":          # the archived plan a worker reads (one per plan id)
        name = str(next((root / "plans").glob("*.json")).relative_to(root))
    mutation(root / name, random.Random(seed))
    for command in (["grid", "status"], ["grid", "status", "--json"], ["grid", "unlock"]):
        check([*command, root], given=root)
    check(["grid", "gather", root], given=root, writes=("results.csv", "results.parquet", ".results"))
    # The report is the slowest reader (seconds): every file, cut short and replaced by a device.
    if mutation in (_cut, _to_device):
        check(["report", root, "--out", tmp_path / "report", "--no-frequencies"], given=root)


# --------------------------------------------------------------------------- patch directories


@pytest.fixture(scope="module")
def patch_template(tmp_path_factory) -> Path:
    import torch

    from editdecay.data import load_edit_data
    from editdecay.edit.patch import EditPatch

    d = tmp_path_factory.mktemp("patch") / "patch"
    deltas = {f"model.layers.{i}.mlp.down_proj": torch.full((32, 64), 0.01) for i in (1, 2)}
    EditPatch(deltas, (1, 2), "memit", {}, load_edit_data("worldfacts", limit=2).requests,
              {"fingerprint": "x"}).save(d)
    return d


def _patch_cases():
    cases = []
    for name in ("patch.json", "patch.safetensors"):
        for i, m in enumerate(JSON_MUTATIONS):
            if name == "patch.safetensors" and m in (_wrong_whole_type, _wrong_field_type, _utf16):
                continue            # not JSON: cutting it and replacing it are what can happen to it
            cases.append(pytest.param(name, m, 300 + i, id=f"{name}-{m.__name__.strip('_')}"))
    return cases


def _every_field(template: Path) -> list[str]:
    return sorted(json.loads((template / "patch.json").read_text()))


@pytest.mark.parametrize("name, mutation, seed", _patch_cases())
@pytest.mark.parametrize("command", ["eval-edits", "finetune"])
def test_a_mutated_patch_directory(world, patch_template, tmp_path, no_model, name, mutation, seed, command):
    d = tmp_path / "patch"
    shutil.copytree(patch_template, d, symlinks=True)
    mutation(d / name, random.Random(seed))
    out = ["--out", tmp_path / "run"] if command == "finetune" else []
    res = check([command, "--model", world["model"], "--patch", d, *out], given=d)
    assert res.exit_code == 2 and str(d) in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()


def test_every_field_of_patch_json_of_the_wrong_type_is_refused(world, patch_template, tmp_path, no_model):
    fields = _every_field(patch_template)
    assert {"modules", "layers", "requests", "editor", "config"} <= set(fields)
    for key in fields:
        d = tmp_path / key
        shutil.copytree(patch_template, d, symlinks=True)
        meta = json.loads((d / "patch.json").read_text())
        meta[key] = {"unexpected": [1]} if isinstance(meta[key], list) else [{"unexpected": 1}]
        (d / "patch.json").write_text(json.dumps(meta))
        res = check(["eval-edits", "--model", world["model"], "--patch", d], given=d)
        assert res.exit_code == 2, (key, res.output)


# --------------------------------------------------------------------------- grid files


GRID_MUTATIONS = (_cut, _empty, _wrong_field_type, _to_device, _fifo, _directory, _oversized, _utf16)


@pytest.mark.parametrize("mutation, seed", [pytest.param(m, 500 + i, id=m.__name__.strip("_"))
                                            for i, m in enumerate(GRID_MUTATIONS)])
def test_a_mutated_grid_file(world, tmp_path, mutation, seed):
    import yaml

    (tmp_path / "grid").mkdir()
    grid = write_grid(tmp_path / "grid" / "g.yaml", grid_dict(world))
    if mutation is _wrong_field_type:           # the grid as YAML, one top-level key of the wrong type
        rng = random.Random(seed)
        for _ in range(5):
            d = grid_dict(world)
            key = rng.choice(sorted(d))
            d[key] = {"unexpected": [1]} if isinstance(d[key], list) else [{"unexpected": 1}]
            grid.write_text(yaml.safe_dump(d))
            res = check(["grid", "plan", grid], given=tmp_path / "grid")
            assert res.exit_code == 2 and key in res.output, res.output
        return
    mutation(grid, random.Random(seed))
    check(["grid", "plan", grid], given=tmp_path / "grid")
    if mutation is not _cut:                    # a grid cut short may still be a (smaller) valid grid, and run
        res = check(["grid", "run", grid, "--out", tmp_path / "out"], given=tmp_path / "grid")
        assert res.exit_code == 2 and not (tmp_path / "out").exists()
