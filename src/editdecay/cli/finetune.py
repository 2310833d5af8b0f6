"""`editdecay finetune`: fine-tune a (patched) model and measure what is left of the edits (docs/METHODS.md E7).

The model, recipe, evaluation, data and run settings are options generated from their records (cli/options.py),
named like the keys of a grid file: every Recipe field has one (`--learning-rate`, `--train-on-prompt`, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import (
    ALLOW_FOREIGN_PATCH,
    check_run,
    console,
    guard,
    memory_plan_gate,
    metrics_table,
    model_label,
    pct,
    set_threads,
)
from editdecay.cli.options import Fields, config_options
from editdecay.core.errors import ConfigError
from editdecay.core.model_ref import ModelRef
from editdecay.data import sources as data_sources
from editdecay.finetune.recipe import Recipe
from editdecay.grid.spec import EvaluationSettings, SharedSettings
from editdecay.measure.downstream.spec import DownstreamSpec

log = logging.getLogger(__name__)

# The records `finetune` takes its settings from: one option per field, named like the grid's keys.
MODEL = Fields(ModelRef, into="model", names={"name": "model"}, panel="Model (grid: models[])")
RECIPE = Fields(Recipe, into="recipe", names={"dtype": "train-dtype"},
                aliases={"max_steps": ("--steps",), "learning_rate": ("--lr",), "lr_scheduler": ("--scheduler",),
                         "cutoff_len": ("--cutoff",), "lora_r": ("--rank",), "lora_alpha": ("--alpha",),
                         "lora_dropout": ("--dropout",)},
                default="from --preset", defaults={"method": "lora"},
                panel="Recipe (grid: recipes[].method, layers, targets, overrides)")
EVALUATION = Fields(EvaluationSettings, into="evaluation", only=("eval_every",),
                    panel="Evaluation (grid: shared.evaluation)")
# One group per data source with settings of its own (data/source.py `settings`), from the registry: a new
# source's settings become options here by themselves, named like the keys of its grid section.
SOURCES = tuple(Fields(s.settings, into="sources", section=s.settings_key,
                       prefix=s.settings_key.replace("_", "-") + "-", aliases=s.option_aliases,
                       panel=f"Data source {s.prefix} (grid: shared.{s.settings_key})")
                for s in data_sources.sources_with_settings().values())
DOWNSTREAM = Fields(DownstreamSpec, into="downstream", prefix="downstream-", names={"tasks": "downstream"},
                    defaults={"tasks": "none"}, panel="Downstream tasks (grid: shared.downstream, downstream_limit)")
RUN = Fields(SharedSettings, into="run", only=("device", "threads", "cache_dir", "finetune_devices"),
             names={"finetune_devices": "devices"}, panel="Run (grid: shared)")


@app.command("finetune")
@guard
@config_options(MODEL, RECIPE, EVALUATION, *SOURCES, DOWNSTREAM, RUN)
def finetune(
    model: dict,
    recipe: dict,
    evaluation: dict,
    sources: dict,
    downstream: dict,
    run: dict,
    patch: Optional[Path] = typer.Option(None, help="patch directory (from `editdecay edit --out`): applied before "
                                                     "fine-tuning; its requests are measured and its layers are "
                                                     "what --layers edited/non-edited refer to"),
    allow_foreign_patch: bool = ALLOW_FOREIGN_PATCH,
    data: str = typer.Option("embedded", help="embedded | chatterbot[:DIR] (human-written Q/A, BSD-3) | "
                                              "instructions:PATH (.json/.jsonl) | text:PATH | hf:NAME[:SPLIT]"),
    preset: Optional[str] = typer.Option(None, help="study | embedded (default: embedded for --data embedded, "
                                                    "else study)"),
    requests: Optional[str] = typer.Option(None, help="edit data to measure instead of the patch's requests "
                                                      "(worldfacts | counterfact:PATH | zsre:PATH), e.g. for the "
                                                      "base model fine-tuned without a patch (M_f)"),
    limit: Optional[int] = typer.Option(None, help="measure only the first N requests"),
    task_eval: Optional[bool] = typer.Option(None, "--task-eval/--no-task-eval",
                                             help="score a held-out split: the fine-tuning data's own (--data "
                                                  "embedded, chatterbot; on by default), else the embedded task's, "
                                                  "which the run never trains on (off unless asked)"),
    save: str = typer.Option("auto", help="auto | adapter | merged | both | none (auto: adapter for lora/dora, "
                                          "merged weights for full)"),
    overwrite: bool = typer.Option(False, help="replace a previous run in --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    memory: Optional[str] = typer.Option(None, help="device memory to plan for, e.g. 80GB (default: a CUDA "
                                                    "device's own; on the CPU no check)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the memory plan of training and exit: nothing "
                                                          "is loaded but config.json"),
    out: Optional[Path] = typer.Option(None, help="output directory (result.json, train_log.jsonl, curve.jsonl, "
                                                  "adapter/ ...); required unless --dry-run"),
) -> None:
    """Fine-tune (full, LoRA, DoRA; selective layers) and print edit metrics before/after editing and after
    fine-tuning, with a decay curve every --eval-every steps."""
    from editdecay.core.cache import Cache
    from editdecay.core.outputs import check_output_dir
    from editdecay.data.source import FINETUNE, HELD_OUT
    from editdecay.finetune import EditsUnderTest, Measures, load_source, run_finetune
    from editdecay.finetune import preset as make_preset

    # Every setting is validated before a model is loaded or --out is touched: each fails in milliseconds.
    ref = ModelRef(**model)
    method = recipe.pop("method", "lora")
    recipe = make_preset(preset or ("embedded" if data == "embedded" else "study"), method, **recipe)
    ev = EvaluationSettings(**evaluation)
    settings = SharedSettings(**run)
    ds_spec = _downstream(downstream)
    # Each source's settings as a grid's `shared.<settings_key>` section holds them: the options given over the
    # record's defaults, all validated (an option of a source not used here is checked too, never ignored unread).
    sections = {key: s.settings(**sources.get(key, {})) for key, s in data_sources.sources_with_settings().items()}
    # The held-out task: the fine-tuning data's own split where it has one, else the embedded task's.
    spec = data_sources.parse_spec(data, FINETUNE)
    held = spec.text if HELD_OUT in data_sources.source_of(spec).roles else "embedded"
    key = data_sources.source_of(held).settings_key
    task = data_sources.held_out_task(held, sections[key].model_dump() if key else None)
    source = load_source(data, task=task if held == spec.text else None)
    patch_obj = _load_patch(patch) if patch else None
    reqs = _requests(requests, patch_obj, limit)
    devices, device = settings.finetune_devices, settings.device
    # --device must exist here, unless this is a dry run (a plan may be made for another machine).
    if dry_run:
        set_threads(settings.threads)
    else:
        check_run(settings)
    # The memory plan reads config.json only; it refuses a run that cannot fit before the model loads.
    from editdecay.grid.memory import meta_model, plan_finetune

    def make_plan(budget: int):
        return plan_finetune(meta_model(ref), recipe, budget, devices=devices, device=device)

    if memory_plan_gate(make_plan, memory, device, dry_run, f"{recipe.method} fine-tuning of {ref.name}"):
        return
    if out is None:
        raise ConfigError("--out is required (the run directory), unless --dry-run")
    check_output_dir(out, kind="finetune", overwrite=overwrite)
    dist = None
    if devices > 1:
        import os
        import sys

        from editdecay.finetune.distributed import init_from_env, launch

        if "WORLD_SIZE" not in os.environ:         # this process launches the N workers and waits for them
            code = launch(devices, sys.argv[1:])
            if code:
                raise ConfigError(f"--devices {devices}: a worker process failed (exit code {code}); its error is "
                                  f"printed above")
            return
        dist = init_from_env()
        if str(device).startswith("cuda") or device == "auto":
            device = str(dist.device)

    lm = ref.load(device=device, cache=Cache(Path(settings.cache_dir)) if settings.cache_dir else None)
    extra = {}
    if patch_obj is not None:
        # The rule every entry point shares: a patch made on other weights is refused unless allowed.
        check = patch_obj.check_model(lm.identity, allow_foreign=allow_foreign_patch, where=f"patch {patch}")
        extra["patch"] = {"dir": str(patch), "editor": patch_obj.editor, "layers": list(patch_obj.layers),
                          "modules": list(patch_obj.module_names), "model_identity": patch_obj.model_identity,
                          "n_requests": len(patch_obj.requests), **check}
    if requests:
        extra["requests_source"] = requests
    # The mechanism measure needs the edit's deltas and the requests it wrote: only with the patch's own requests.
    with_deltas = patch_obj is not None and [r.case_id for r in reqs] == [r.case_id for r in patch_obj.requests]
    edits = EditsUnderTest(requests=reqs, layers=patch_obj.layers if patch_obj else None,
                           apply=patch_obj.apply if patch_obj else None,
                           deltas=patch_obj.deltas if with_deltas else None)
    # A held-out split the run never trains on scores near 0 whatever fine-tuning did: scored only when asked.
    own = held == spec.text
    if task_eval is None and not own:
        log.info("--data %s has no held-out split of its own; the embedded task is not scored (--task-eval scores "
                 "it anyway, as a task this run never trains on)", data)
    measures = Measures(task=task if (task_eval if task_eval is not None else own) else None,
                        eval_every=ev.eval_every, downstream=ds_spec)
    run_ = run_finetune(lm, recipe, source, out, edits=edits, measures=measures, save=save, overwrite=overwrite,
                        progress=progress, extra=extra, dist=dist)
    if dist is None or dist.main:
        _report(run_.result, out, own_task=own)


def _downstream(given: dict):
    """The lm-eval tasks scored before and after fine-tuning (a DownstreamSpec), or None."""
    if "tasks" not in given:
        if given:
            first = next(iter(given))
            raise ConfigError(f"{DOWNSTREAM.option(first)} {given[first]} needs --downstream TASK[,TASK]")
        return None
    if "embedded" in given["tasks"]:
        raise ConfigError("--downstream: the embedded task is scored by --task-eval (on by default); list lm-eval "
                          "tasks here, e.g. --downstream everyday")
    return DownstreamSpec(**given)


def _load_patch(path: Path):
    from editdecay.edit.registry import load_patch

    return load_patch(path)


def _requests(spec: Optional[str], patch_obj, limit: Optional[int]) -> tuple:
    """The requests measured: --requests' data, else the patch's; the first --limit of them (`subset`: a limit
    below 1 or above what there is is an error naming --limit, never a Python slice)."""
    from editdecay.data.common import EditDataset
    from editdecay.data.sources import load_edit_data, subset

    if spec:
        return tuple(load_edit_data(spec, limit=limit, field="--limit").requests)
    if patch_obj is None:
        if limit is not None:
            raise ConfigError(f"--limit {limit} limits the requests measured, but there are none: give --patch DIR "
                              f"or --requests DATA")
        return ()
    ds = EditDataset("the patch's requests", tuple(patch_obj.requests), len(patch_obj.requests))
    return tuple(subset(ds, limit, None, field="--limit").requests)


def _score(values: dict) -> str:
    """acc (%) for multiple choice, word perplexity for ppl: tasks, else the first metric."""
    if values.get("acc") is not None:
        return f"acc {pct(values['acc'])}%"
    if values.get("word_perplexity") is not None:
        return f"word ppl {values['word_perplexity']:.2f}"
    first = next((k for k in values if k != "n" and not k.endswith("_stderr")), None)
    return f"{first} {values[first]}" if first else "-"


def _report(result: dict, out: Path, own_task: bool = True) -> None:
    from rich.markup import escape

    stages = {model_label(k): v for k, v in result["metrics"].items()}
    if any(m["n"] for m in stages.values()):
        console.print(metrics_table(f"{result['recipe']['method']} fine-tuning of {result['model']['name']}", stages))
    task = {k: pct(v.get("task_accuracy")) for k, v in stages.items()}
    if any(v != "-" for v in task.values()):
        name = next((v.get("task_name") for v in stages.values() if v.get("task_name")), None) or "embedded"
        if not own_task:
            name += " (held out; this run trained on other data)"
        console.print(f"{name} task exact match (%): " + ", ".join(f"{k} {v}" for k, v in task.items()))
        tok = {k: pct(v.get("task_token_accuracy")) for k, v in stages.items()}
        if any(v != "-" for v in tok.values()):
            console.print(f"{name} task token accuracy (%): " + ", ".join(f"{k} {v}" for k, v in tok.items()))
    ds = {k: v["downstream"] for k, v in stages.items() if v.get("downstream") is not None}
    for name in (next(iter(ds.values())) if ds else {}):
        values = ", ".join(f"{k} {_score(v[name])}" for k, v in ds.items())
        console.print(f"downstream {name} (n={next(iter(ds.values()))[name]['n']}): {values}", highlight=False)
    if result.get("decay"):
        efr = result["decay"]["edit_flip_ratio"]
        console.print(f"Edit Flip Ratio: {pct(efr['value'])}% ({efr['n_flipped']} of {efr['n_success_edited']} "
                      f"successful edits flipped)")
    curve = "; ".join(f"{p['step']}: ES {pct(p['efficacy'])} PS {pct(p['paraphrase'])} NS {pct(p['neighborhood'])} "
                      f"task {pct(p['task_accuracy'])}" for p in result["curve"])
    console.print(f"decay curve (step: %): {curve}", highlight=False)
    t = result["training"]
    console.print(f"{t['steps']} steps, {t['train_seconds']:.1f} s training, {t['tokens_per_second']:.0f} tokens/s, "
                  f"final loss {t['final_loss']:.4f}; {result['n_trainable_parameters']:,} trainable parameters")
    check = result.get("merge_check") or {}
    if check.get("warning"):
        console.print(f"[yellow]warning:[/] {escape(check['warning'])}", highlight=False)
    console.print(f"result written to {out / 'result.json'}")
