"""The data-source registry (data/sources.py): every registered source keeps the contract of data/source.py,
so a new source is checked here without a test of its own; specs are parsed in one place."""

from __future__ import annotations

import pytest

from editdecay.core.errors import ConfigError
from editdecay.data import sources
from editdecay.data.source import ROLES


def _example(source) -> str:
    """A syntactically valid spec of the source (a path argument that does not exist)."""
    if source.argument is None or not source.argument_required:
        return source.prefix
    return f"{source.prefix}:/nonexistent/editdecay-test/data.json"


@pytest.mark.parametrize("source", sources.sources(), ids=lambda s: s.prefix)
def test_every_source_keeps_the_contract(source):
    assert source.roles and set(source.roles) <= set(ROLES)
    assert source.description and source.usage().startswith(source.prefix)
    spec = sources.parse_spec(_example(source))
    assert sources.source_of(spec) is source and spec.kind == source.prefix
    for role in source.roles:
        assert sources.parse_spec(_example(source), role) == spec
    for alias in source.aliases:
        assert sources.source_of(alias) is source
    assert isinstance(source.label(spec), str) and source.label(spec)
    if source.local_path and spec.argument:
        assert source.digest(spec) == "missing"          # planned before the data exists: a stage id all the same
        assert sources.resolve_paths(f"{source.prefix}:rel/x.json", sources.Path("/base")) == \
            f"{source.prefix}:/base/rel/x.json"
    if source.argument is not None and source.argument_required:
        with pytest.raises(ConfigError, match=f"data '{source.prefix}': give"):
            sources.parse_spec(source.prefix)
    if source.argument is None:
        with pytest.raises(ConfigError, match="takes nothing after the prefix"):
            sources.parse_spec(f"{source.prefix}:x")
    for name in source.task_names:
        assert sources.held_out_names()[name] in ("accuracy", "prefix_accuracy", "token_accuracy")
    if source.settings is not None:
        # Its settings are a grid section of that record, built with the record's defaults when left out.
        from editdecay.grid.spec import SharedSettings

        assert SharedSettings.model_fields[source.settings_key].annotation is source.settings
        assert getattr(SharedSettings(), source.settings_key) == source.settings()


def test_specs_name_the_role_and_suggest_the_source():
    with pytest.raises(ConfigError, match=r"unknown source 'counterfac' \(did you mean 'counterfact'\?\)"):
        sources.parse_spec("counterfac:x.json", "edit")
    with pytest.raises(ConfigError, match="text is not edit data; edit data is one of: worldfacts"):
        sources.parse_spec("text:a.txt", "edit")
    with pytest.raises(ConfigError, match="worldfacts is not fine-tuning data"):
        sources.parse_spec("worldfacts", "finetune")
    assert sources.split_spec("hf:a/b:train") == ("hf", "a/b:train") and sources.split_spec("x") == ("x", "")
    assert sources.labels(["zsre:/d/a.json", "zsre:/d/b.json", "instructions:/d/c.jsonl"]) == {
        "zsre:/d/a.json": "zsre-a", "zsre:/d/b.json": "zsre-b", "instructions:/d/c.jsonl": "c"}


def test_the_one_spec_parser():
    """`partition(":")` appears once in the package: data/source.py `split_spec`."""
    import editdecay

    root = sources.Path(editdecay.__file__).parent
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py") if 'partition(":")' in p.read_text()]
    assert hits == ["data/source.py"], hits


def test_edit_selection_checks_the_planned_digest(tmp_path):
    from editdecay.core.errors import DataError
    from editdecay.data.sources import EditSelection

    data = tmp_path / "cf.json"
    data.write_text("[]")
    sel = EditSelection(data=f"counterfact:{data}", n=2, seed=0, digest=sources.digest(f"counterfact:{data}"))
    data.write_text("[1]")
    with pytest.raises(DataError, match="changed since this grid was planned"):
        sel.load()
