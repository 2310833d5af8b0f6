"""`editdecay edit`: apply MEMIT or AlphaEdit edits and write the patch + result.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import ALLOW_PICKLE, TRUST_REMOTE_CODE  # shared options
from editdecay.cli.common import console, guard, metrics_table, set_threads


@app.command("edit")
@guard
def edit(
    model: str = typer.Option("smollm2-135m", help="embedded 'smollm2-135m', a local HF model directory, or a hub id"),
    editor: str = typer.Option("memit", help="memit | alphaedit"),
    data: str = typer.Option("worldfacts", help="worldfacts | counterfact:PATH | zsre:PATH"),
    n: Optional[int] = typer.Option(None, help="number of edits (first N, or a seeded sample with --seed)"),
    seed: Optional[int] = typer.Option(None, help="seed for the sample of N requests"),
    layers: Optional[str] = typer.Option(None, help="edited layers, e.g. 4,5,6,7,8 or 4-8 (default: the preset's)"),
    batch_size: Optional[int] = typer.Option(None, help="sequential batches of this many edits (default: one batch)"),
    stats_corpus: Optional[str] = typer.Option(None, help="E1 corpus: generated | PATH | hf:NAME[:CONFIG]"),
    stats_tokens: Optional[int] = typer.Option(None, help="tokens for the E1 statistics (the cap with --stats-tolerance)"),
    stats_tolerance: Optional[float] = typer.Option(None, help="adaptive E1: doubling token counts until the edit "
                                                    "keys' solve changes by less than this (e.g. 0.01)"),
    mom2_update_weight: Optional[float] = typer.Option(None, help="MEMIT lambda"),
    nullspace_threshold: Optional[float] = typer.Option(None, help="AlphaEdit null-space eigenvalue threshold"),
    v_lr: Optional[float] = typer.Option(None, help="E3 learning rate"),
    v_num_grad_steps: Optional[int] = typer.Option(None, help="E3 steps"),
    clamp_norm_factor: Optional[float] = typer.Option(None, help="E3 clamp"),
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    zsre_target: str = typer.Option("answers", help="zsRE edit target: 'answers' (MEMIT/AlphaEdit) or 'alt' (EasyEdit)"),
    strict: bool = typer.Option(False, help="fail on any rejected record, and on a subject that does not end on a "
                                "token boundary of its prompt (otherwise a warning)"),
    dtype: str = typer.Option("float32", help="model dtype: float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ... or auto: spread the model over the visible GPUs (accelerate device map)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    memory: Optional[str] = typer.Option(None, help="device memory to plan for, e.g. 80GB (default: a CUDA "
                                                    "device's own; on the CPU no check)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the memory plan of every stage and exit: "
                                                          "nothing is loaded but config.json"),
    out: Optional[Path] = typer.Option(None, help="patch directory to write (patch.safetensors, patch.json, "
                                                  "result.json); required unless --dry-run"),
) -> None:
    """Edit a model (ALGORITHMS.md E1-E5); print efficacy/paraphrase/neighbourhood before and after."""
    from editdecay.core.errors import ConfigError
    from editdecay.edit.workflow import parse_layers, run_edit

    set_threads(threads)
    if seed is not None and n is None:
        raise ConfigError(f"--seed {seed} draws a sample of --n requests; without --n every request is edited and "
                          f"the seed would do nothing: give --n N, or drop --seed")
    # An editor's setting given to the other editor is an error, not silently dropped.
    for flag, value, owner in (("--mom2-update-weight", mom2_update_weight, "memit"),
                               ("--nullspace-threshold", nullspace_threshold, "alphaedit")):
        if value is not None and editor.lower() != owner:
            raise ConfigError(f"{flag} {value} is a setting of --editor {owner}; --editor {editor} does not use it")
    overrides = {"layers": parse_layers(layers), "stats_corpus": stats_corpus, "stats_tokens": stats_tokens,
                 "stats_tolerance": stats_tolerance,
                 "mom2_update_weight": mom2_update_weight, "nullspace_threshold": nullspace_threshold,
                 "v_lr": v_lr, "v_num_grad_steps": v_num_grad_steps, "clamp_norm_factor": clamp_norm_factor}
    if dry_run or memory is not None or device.startswith("cuda") or device == "auto":
        from editdecay.cli.common import memory_plan_gate
        from editdecay.data import load_edit_data
        from editdecay.grid.memory import editor_config, meta_model, plan_edit

        def make_plan(budget: int):
            meta = meta_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
            count = len(load_edit_data(data, zsre_target=zsre_target, limit=n, seed=seed).requests)
            return plan_edit(meta, editor_config(editor, meta, overrides), count, budget)

        if memory_plan_gate(make_plan, memory, device, dry_run, f"edit with {editor} on {model}"):
            return
    if out is None:
        raise ConfigError("--out is required (the patch directory to write), unless --dry-run")
    result = run_edit(model=model, editor=editor, data=data, n=n, seed=seed, out=out, overrides=overrides,
                      batch_size=batch_size, zsre_target=zsre_target, strict=strict, dtype=dtype, device=device,
                      allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    console.print(metrics_table(f"{editor} on {result['model']['name']}, {result['data']['name']}", result["metrics"]))
    t = result["timings"]
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    for w in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"patch and result written to {out}")
