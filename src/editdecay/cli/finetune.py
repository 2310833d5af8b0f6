"""`editdecay finetune`: fine-tune a (patched) model and measure what is left of the edits (ALGORITHMS.md E7)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import ALLOW_FOREIGN_PATCH, ALLOW_PICKLE, TRUST_REMOTE_CODE  # shared options
from editdecay.cli.common import console, guard, metrics_table, pct, set_threads
from editdecay.finetune.recipe import LAYER_CHOICES, METHODS

log = logging.getLogger(__name__)


@app.command("finetune")
@guard
def finetune(
    model: str = typer.Option("smollm2-135m", help="embedded 'smollm2-135m', a local HF model directory, or a hub id"),
    patch: Optional[Path] = typer.Option(None, help="patch directory (from `editdecay edit --out`): applied before "
                                                     "fine-tuning; its requests are measured and its layers are "
                                                     "what --layers edited/non-edited refer to"),
    allow_foreign_patch: bool = ALLOW_FOREIGN_PATCH,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
    method: str = typer.Option("lora", help=" | ".join(METHODS)),
    layers: str = typer.Option("all", help=" | ".join(LAYER_CHOICES) + " | 4,5,6 | 4-8"),
    targets: Optional[str] = typer.Option(None, help="attention | mlp | all-linear | all (full only) | comma list of "
                                                     "block-relative names (mlp.down_proj,...); default all-linear "
                                                     "(the study preset's full fine-tuning: all)"),
    data: str = typer.Option("embedded", help="embedded | chatterbot[:DIR] (human-written Q/A, BSD-3) | "
                                              "instructions:PATH (.json/.jsonl) | text:PATH | hf:NAME[:SPLIT]"),
    preset: Optional[str] = typer.Option(None, help="study | embedded (default: embedded for --data embedded, "
                                                    "else study)"),
    steps: Optional[int] = typer.Option(None, help="optimiser steps (replaces the preset's epochs)"),
    epochs: Optional[float] = typer.Option(None, help="epochs (replaces the preset's steps)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate"),
    scheduler: Optional[str] = typer.Option(None, help="linear | cosine | constant | constant_with_warmup | ..."),
    warmup_steps: Optional[int] = typer.Option(None, help="warm-up steps"),
    batch_size: Optional[int] = typer.Option(None, help="examples per micro-batch"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimiser step"),
    cutoff: Optional[int] = typer.Option(None, help="maximum tokens per example"),
    template: Optional[str] = typer.Option(None, help="prompt template: alpaca | compact"),
    rank: Optional[int] = typer.Option(None, help="LoRA/DoRA rank"),
    alpha: Optional[float] = typer.Option(None, help="LoRA/DoRA alpha"),
    dropout: Optional[float] = typer.Option(None, help="LoRA/DoRA dropout"),
    train_dtype: Optional[str] = typer.Option(None, help="compute dtype: float32 | bfloat16"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="recompute activations in backward"),
    seed: Optional[int] = typer.Option(None, help="training seed"),
    eval_every: int = typer.Option(50, help="measure edits and task accuracy every K steps (0: first and last only)"),
    requests: Optional[str] = typer.Option(None, help="edit data to measure instead of the patch's requests "
                                                      "(worldfacts | counterfact:PATH | zsre:PATH), e.g. for the "
                                                      "base model fine-tuned without a patch (M_f)"),
    limit: Optional[int] = typer.Option(None, help="measure only the first N requests"),
    task_eval: bool = typer.Option(True, "--task-eval/--no-task-eval",
                                   help="score a held-out split: the chatterbot corpus' (150 records) with --data "
                                        "chatterbot, else the embedded task's"),
    task_test: int = typer.Option(100, help="held-out size of the embedded task"),
    chatterbot_format: str = typer.Option("reply", help="with --data chatterbot: reply (the corpus' reply is the "
                                                        "response) | choice (pick it among 3 replies; answer "
                                                        "'the correct answer is answerK', Commonsense170K style)"),
    task_train: int = typer.Option(2000, help="training size of the embedded task"),
    downstream: Optional[str] = typer.Option(None, help="lm-eval tasks scored before and after fine-tuning, comma "
                                                        "separated: everyday (ours, offline) | boolq | piqa | siqa | "
                                                        "hellaswag | winogrande | arc-e | arc-c | obqa | "
                                                        "lm-eval:NAME | local:DIR | ppl:FILE"),
    downstream_limit: Optional[int] = typer.Option(None, help="documents per downstream task (default: all)"),
    save: str = typer.Option("auto", help="auto | adapter | merged | both | none (auto: adapter for lora/dora, "
                                          "merged weights for full)"),
    dtype: str = typer.Option("float32", help="model dtype: float32 | bfloat16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ... or auto: spread the model over the visible GPUs (accelerate device map)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    overwrite: bool = typer.Option(False, help="replace a previous run in --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    optimizer: Optional[str] = typer.Option(None, help="adamw | adamw8bit (torchao; 2 bytes of state per parameter)"),
    master_weights: Optional[bool] = typer.Option(None, "--master-weights/--no-master-weights",
                                                  help="float32 master weights for bfloat16 models (default: on "
                                                       "for bfloat16 weights with adamw)"),
    devices: int = typer.Option(1, help="shard full fine-tuning over N GPUs of this node (FSDP; N processes)"),
    memory: Optional[str] = typer.Option(None, help="device memory to plan for, e.g. 80GB (default: a CUDA "
                                                    "device's own; on the CPU no check)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the memory plan of training and exit: nothing "
                                                          "is loaded but config.json"),
    out: Optional[Path] = typer.Option(None, help="output directory (result.json, train_log.jsonl, curve.jsonl, "
                                                  "adapter/ ...); required unless --dry-run"),
) -> None:
    """Fine-tune (full, LoRA, DoRA; selective layers) and print edit metrics before/after editing and after
    fine-tuning, with a decay curve every --eval-every steps."""
    from editdecay.edit.workflow import parse_layers
    from editdecay.finetune import EmbeddedTask, load_source, run_finetune
    from editdecay.finetune import preset as make_preset

    set_threads(threads)
    # Recipe and data first: both fail in milliseconds, before a model is loaded.
    overrides = {k: v for k, v in {
        "layers": layers if layers in LAYER_CHOICES else parse_layers(layers),
        "targets": _targets(targets), "max_steps": steps, "epochs": epochs, "learning_rate": lr,
        "lr_scheduler": scheduler, "warmup_steps": warmup_steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "cutoff_len": cutoff, "template": template, "lora_r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "dtype": train_dtype, "gradient_checkpointing": gradient_checkpointing, "seed": seed,
        "optimizer": optimizer, "master_weights": master_weights,
    }.items() if v is not None}
    recipe = make_preset(preset or ("embedded" if data == "embedded" else "study"), method, **overrides)
    ds_spec = _downstream(downstream, downstream_limit)
    if data.partition(":")[0] == "chatterbot":
        from editdecay.data.chatterbot import ChatterbotCorpus

        task = ChatterbotCorpus(root=data.partition(":")[2] or None, format=chatterbot_format)
    else:
        task = EmbeddedTask(n_train=task_train, n_test=task_test) if (task_eval or data == "embedded") else None
    source = load_source(data, task=task)
    patch_obj = _load_patch(patch) if patch else None
    reqs = _requests(requests, patch_obj, limit)
    from editdecay.cli.common import memory_plan_gate
    from editdecay.core.errors import ConfigError

    if devices < 1:
        raise ConfigError(f"--devices {devices}: give 1 or more")
    if dry_run or memory is not None or device.startswith("cuda") or device == "auto" or devices > 1:
        from editdecay.grid.memory import meta_model, plan_finetune

        def make_plan(budget: int):
            return plan_finetune(meta_model(model, dtype=dtype, trust_remote_code=trust_remote_code), recipe, budget,
                                 devices=devices)

        if memory_plan_gate(make_plan, memory, device, dry_run, f"{recipe.method} fine-tuning of {model}"):
            return
    if out is None:
        raise ConfigError("--out is required (the run directory), unless --dry-run")
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
        if device.startswith("cuda"):
            device = str(dist.device)

    from editdecay.core.models import load_model

    lm = load_model(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code)
    extra = {}
    if patch_obj is not None:
        # The rule every entry point shares: a patch made on other weights is refused unless allowed.
        check = patch_obj.check_model(lm.identity, allow_foreign=allow_foreign_patch, where=f"patch {patch}")
        extra["patch"] = {"dir": str(patch), "editor": patch_obj.editor, "layers": list(patch_obj.layers),
                          "modules": list(patch_obj.module_names), "model_identity": patch_obj.model_identity,
                          "n_requests": len(patch_obj.requests), **check}
    if requests:
        extra["requests_source"] = requests
    run = run_finetune(
        lm, recipe, source, out, requests=reqs, edited_layers=patch_obj.layers if patch_obj else None,
        apply_edit=patch_obj.apply if patch_obj else None, task=task if task_eval else None,
        eval_every=eval_every, save=save, overwrite=overwrite, progress=progress, extra=extra, downstream=ds_spec,
        dist=dist,
    )
    if dist is None or dist.main:
        _report(run.result, out)


def _downstream(text: Optional[str], limit: Optional[int]):
    from editdecay.core.errors import ConfigError
    from editdecay.measure.downstream import DownstreamSpec

    if not text:
        if limit is not None:
            raise ConfigError(f"--downstream-limit {limit} needs --downstream TASK[,TASK]")
        return None
    if "embedded" in [t.strip() for t in text.split(",")]:
        raise ConfigError("--downstream: the embedded task is scored by --task-eval (on by default); list lm-eval "
                          "tasks here, e.g. --downstream everyday")
    return DownstreamSpec.parse(text, limit=limit)


def _targets(text: Optional[str]):
    if text is None or text in ("attention", "mlp", "all-linear", "all"):
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _load_patch(path: Path):
    from editdecay.edit.patch import EditPatch

    return EditPatch.load(path)


def _requests(spec: Optional[str], patch_obj, limit: Optional[int]) -> tuple:
    if spec:
        from editdecay.data import load_edit_data

        reqs = load_edit_data(spec).requests
    else:
        reqs = patch_obj.requests if patch_obj is not None else ()
    return tuple(reqs[:limit]) if limit else tuple(reqs)


def _score(values: dict) -> str:
    """acc (%) for multiple choice, word perplexity for ppl: tasks, else the first metric."""
    if values.get("acc") is not None:
        return f"acc {pct(values['acc'])}%"
    if values.get("word_perplexity") is not None:
        return f"word ppl {values['word_perplexity']:.2f}"
    first = next((k for k in values if k != "n" and not k.endswith("_stderr")), None)
    return f"{first} {values[first]}" if first else "-"


def _report(result: dict, out: Path) -> None:
    from rich.markup import escape

    stages = {{"pre": "before edit", "post": "after edit", "finetuned": "after fine-tuning"}.get(k, k): v
              for k, v in result["metrics"].items()}
    if any(m["n"] for m in stages.values()):
        console.print(metrics_table(f"{result['recipe']['method']} fine-tuning of {result['model']['name']}", stages))
    task = {k: pct(v.get("task_accuracy")) for k, v in stages.items()}
    if any(v != "-" for v in task.values()):
        name = next((v.get("task_name") for v in stages.values() if v.get("task_name")), None) or "embedded"
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
