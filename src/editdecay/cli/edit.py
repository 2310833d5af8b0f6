"""`editdecay edit`: apply a registered editor's edits (MEMIT, AlphaEdit, ...) and write the patch + result.json.

Editor, model, evaluation and run settings are options generated from their records (cli/options.py), named
like the keys of a grid file: every field of every registered editor's config has one (`--v-lr`,
`--mom2-update-weight`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import check_run, console, guard, memory_plan_gate, metrics_table, set_threads
from editdecay.cli.options import Fields, config_options, option_of
from editdecay.core.model_ref import ModelRef
from editdecay.edit.config import EditorConfig
from editdecay.edit.registry import editor_class, editor_names
from editdecay.grid.spec import EvaluationSettings, SharedSettings

_PRESET = "the editor's preset for the model"
MODEL = Fields(ModelRef, into="model", names={"name": "model"}, panel="Model (grid: models[])")
# The editor's own `seed` seeds its context prefixes; `--seed` here draws the sample of --n requests.
EDITOR = Fields(EditorConfig, into="editor_fields", names={"seed": "context-seed"}, default=_PRESET,
                panel="Editor (grid: editors[].overrides)")


def _own_fields() -> tuple[Fields, ...]:
    """One group per registered editor with the fields its config adds to EditorConfig (a field two editors add
    is listed under the first): a new editor's settings become options here by themselves. A field name with
    capitals (`L2`) is also accepted in lower case (`--l2`)."""
    groups, seen = [], set(EditorConfig.model_fields)
    for name in editor_names():
        config = editor_class(name).config_class
        own = tuple(f for f in config.model_fields if f not in seen)
        seen.update(own)
        if own:
            groups.append(Fields(config, into="editor_fields", only=own, default=_PRESET,
                                 aliases={f: ("--" + f.lower().replace("_", "-"),) for f in own if f != f.lower()},
                                 panel=f"{name} only (grid: editors[].overrides)"))
    return tuple(groups)


OWN = _own_fields()
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
    editor: str = typer.Option("memit", help="a registered editor (edit/registry.py): " + " | ".join(editor_names())),
    data: str = typer.Option("worldfacts", help="worldfacts | counterfact:PATH | zsre:PATH"),
    n: Optional[int] = typer.Option(None, help="number of edits (first N, or a seeded sample with --seed)"),
    seed: Optional[int] = typer.Option(None, help="seed for the sample of N requests"),
    memory: Optional[str] = typer.Option(None, help="device memory to plan for, e.g. 80GB (default: a CUDA "
                                                    "device's own; on the CPU no check)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the memory plan of every stage and exit: "
                                                          "nothing is loaded but config.json"),
    out: Optional[Path] = typer.Option(None, help="patch directory to write (patch.safetensors, patch.json, "
                                                  "result.json); required unless --dry-run"),
    overwrite: bool = typer.Option(False, help="replace a patch already in --out"),
) -> None:
    """Edit a model (docs/METHODS.md E1-E5); print efficacy/paraphrase/neighbourhood before and after."""
    from editdecay.core.cache import Cache
    from editdecay.core.config import check_choice
    from editdecay.core.errors import ConfigError
    from editdecay.core.outputs import check_output_dir
    from editdecay.data.sources import EditSelection
    from editdecay.edit.registry import field_owners, make_config
    from editdecay.edit.workflow import EditJob, run_edit

    ref = ModelRef(**model)
    ev = EvaluationSettings(**evaluation)
    settings = SharedSettings(**run)
    name = check_choice("--editor", editor.lower(), editor_names())
    if seed is not None and n is None:
        raise ConfigError(f"--seed {seed} draws a sample of --n requests; without --n every request is edited and "
                          f"the seed would do nothing: give --n N, or drop --seed")
    # An editor's setting given to another editor is an error, not silently dropped.
    for field, value in editor_fields.items():
        owners = field_owners(field)
        if name not in owners:
            raise ConfigError(f"{option_of(OWN, 'editor_fields', field)} {value} is a setting of --editor "
                              f"{' and '.join(owners)}; --editor {editor} does not use it")
    # Validated now, before the model loads; the layers stand in for the preset's, which needs the model.
    checked = make_config(name, **{"layers": (0,), **editor_fields})
    job = EditJob(model=ref, editor=name, overrides={k: getattr(checked, k) for k in editor_fields},
                  requests=EditSelection(data=data, n=n, seed=seed, zsre_target=ev.zsre_target, strict=ev.strict),
                  batch_size=ev.edit_batch_size)
    # --device must exist here, unless this is a dry run (a plan may be made for another machine).
    if dry_run:
        set_threads(settings.threads)
    else:
        check_run(settings)
    # The memory plan reads config.json only; it refuses an edit that cannot fit before the model loads.
    from editdecay.grid.memory import editor_config, meta_model, plan_edit

    def make_plan(budget: int):
        meta = meta_model(ref)
        return plan_edit(meta, editor_config(name, meta, job.overrides), len(job.requests.load().requests), budget)

    if memory_plan_gate(make_plan, memory, settings.device, dry_run, f"edit with {name} on {ref.name}"):
        return
    if out is None:
        raise ConfigError("--out is required (the patch directory to write), unless --dry-run")
    check_output_dir(out, kind="edit", overwrite=overwrite)     # before hours of editing, not after
    result = run_edit(job, out=out, device=settings.device,
                      cache=Cache(Path(settings.cache_dir)) if settings.cache_dir else None)
    console.print(metrics_table(f"{name} on {result['model']['name']}, {result['data']['name']}", result["metrics"]))
    t = result["timings"]
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    for w in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"patch and result written to {out}")
