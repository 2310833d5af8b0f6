"""`editdecay edit`: apply MEMIT or AlphaEdit edits and write the patch + result.json.

Editor, model, evaluation and run settings are options generated from their records (cli/options.py), named
like the keys of a grid file: every editor-config field has one (`--v-lr`, `--mom2-update-weight`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import console, guard, metrics_table, set_threads
from editdecay.cli.options import Fields, config_options
from editdecay.core.model_ref import ModelRef
from editdecay.edit.config import CONFIGS, EditorConfig
from editdecay.grid.spec import EvaluationSettings, SharedSettings

_PRESET = "the editor's preset for the model"
# `revision` is left out until the edit workflow takes a ModelRef (it loads by name, dtype and the two flags).
MODEL = Fields(ModelRef, into="model", names={"name": "model"}, exclude=("revision",), panel="Model (grid: models[])")
# The editor's own `seed` seeds its context prefixes; `--seed` here draws the sample of --n requests.
EDITOR = Fields(EditorConfig, into="editor_fields", names={"seed": "context-seed"}, default=_PRESET,
                panel="Editor (grid: editors[].overrides)")
# Fields of one editor only, from the registry: a new editor's settings become options here by themselves.
OWN = tuple(Fields(cls, into="editor_fields", only=tuple(f for f in cls.model_fields if f not in EditorConfig.model_fields),
                   aliases={"L2": ("--l2",)} if "L2" in cls.model_fields else {}, default=_PRESET,
                   panel=f"{name} only (grid: editors[].overrides)")
            for name, cls in CONFIGS.items())
EVALUATION = Fields(EvaluationSettings, into="evaluation", only=("zsre_target", "strict", "edit_batch_size"),
                    aliases={"edit_batch_size": ("--batch-size",)}, panel="Evaluation (grid: shared.evaluation)")
RUN = Fields(SharedSettings, into="run", only=("device", "threads", "cache_dir"), panel="Run (grid: shared)")


@app.command("edit")
@guard
@config_options(MODEL, EDITOR, *OWN, EVALUATION, RUN)
def edit(
    model: dict,
    editor_fields: dict,
    evaluation: dict,
    run: dict,
    editor: str = typer.Option("memit", help=" | ".join(CONFIGS)),
    data: str = typer.Option("worldfacts", help="worldfacts | counterfact:PATH | zsre:PATH"),
    n: Optional[int] = typer.Option(None, help="number of edits (first N, or a seeded sample with --seed)"),
    seed: Optional[int] = typer.Option(None, help="seed for the sample of N requests"),
    out: Path = typer.Option(..., help="patch directory to write (patch.safetensors, patch.json, result.json)"),
) -> None:
    """Edit a model (docs/METHODS.md E1-E5); print efficacy/paraphrase/neighbourhood before and after."""
    from editdecay.core.cache import Cache
    from editdecay.core.config import check_choice
    from editdecay.core.errors import ConfigError
    from editdecay.edit.config import make_config
    from editdecay.edit.workflow import run_edit

    ref = ModelRef(**model)
    ev = EvaluationSettings(**evaluation)
    settings = SharedSettings(**run)
    set_threads(settings.threads)
    name = check_choice("--editor", editor.lower(), CONFIGS)
    if seed is not None and n is None:
        raise ConfigError(f"--seed {seed} draws a sample of --n requests; without --n every request is edited and "
                          f"the seed would do nothing: give --n N, or drop --seed")
    # An editor's setting given to the other editor is an error, not silently dropped.
    for field, value in editor_fields.items():
        if field not in CONFIGS[name].model_fields:
            owner = next(e for e, cls in CONFIGS.items() if field in cls.model_fields)
            option = next(g.option(field) for g in OWN if field in g.fields())
            raise ConfigError(f"{option} {value} is a setting of --editor {owner}; --editor {editor} does not use it")
    # Validated now, before the model loads; the layers stand in for the preset's, which needs the model.
    checked = make_config(name, **{"layers": (0,), **editor_fields})
    overrides = {k: getattr(checked, k) for k in editor_fields}
    result = run_edit(model=ref.name, editor=name, data=data, n=n, seed=seed, out=out, overrides=overrides,
                      batch_size=ev.edit_batch_size, zsre_target=ev.zsre_target, strict=ev.strict, dtype=ref.dtype,
                      device=settings.device, cache=Cache(Path(settings.cache_dir)) if settings.cache_dir else None,
                      allow_pickle=ref.allow_pickle, trust_remote_code=ref.trust_remote_code)
    console.print(metrics_table(f"{editor} on {result['model']['name']}, {result['data']['name']}", result["metrics"]))
    t = result["timings"]
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    for w in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"patch and result written to {out}")
