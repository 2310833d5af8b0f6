"""`editdecay demo` (`make demo-pipeline`): one cell of the pipeline on the embedded default model, with nothing to download.

Edits the embedded SmolLM2-135M with MEMIT (worldfacts, 50 edits in one batch by default),
then fine-tunes the edited model with LoRA on the embedded task and reports what
is left of the edits. Results go to ./runs/demo (patch, result.json, curve).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import console, guard, metrics_table, pct, set_threads


@app.command("demo")
@guard
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Directory for the patch, results and the curve."),
    n: int = typer.Option(50, "--n", min=1, help="Number of worldfacts edits (one batch)."),
    editor: str = typer.Option("memit", help="Editor, one of the registered ones (memit, ...; edit/registry.py)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    skip_finetune: bool = typer.Option(False, "--skip-finetune", help="Stop after editing."),
    steps: int = typer.Option(60, min=1, help="LoRA fine-tuning steps."),
) -> None:
    """One cell of the pipeline on the embedded model: MEMIT edits, LoRA fine-tuning, the decay curve."""
    from editdecay.data.sources import EditSelection
    from editdecay.edit.workflow import EditJob, run_edit

    set_threads(threads)
    console.rule(f"[bold]editdecay demo[/]: {editor}, {n} worldfacts edits on smollm2-135m")
    patch_dir = out / f"{editor}-patch"
    result = run_edit(EditJob(editor=editor, requests=EditSelection(data="worldfacts", n=n, seed=0)), out=patch_dir)
    console.print(metrics_table("edit metrics before and after editing", result["metrics"]))
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    if not skip_finetune:
        finetune_demo(console, patch_dir, out / f"{editor}-lora", steps=steps)
    console.print(f"results in {out.resolve()}")


def finetune_demo(console, patch_dir: Path, out: Path, *, steps: int | None = None) -> dict:
    """LoRA on the embedded task, starting from the edited model; prints the decay curve (E7)."""
    from rich.table import Table

    from editdecay.core.models import load_model
    from editdecay.edit.registry import load_patch
    from editdecay.finetune import EmbeddedTask, load_source, preset
    from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune

    patch = load_patch(patch_dir)
    lm = load_model("smollm2-135m")
    patch.check_model(lm.identity, where=f"patch {patch_dir}")
    task = EmbeddedTask(n_test=100)
    recipe = preset("embedded", "lora", **({"max_steps": steps} if steps else {}))
    console.rule("LoRA fine-tuning of the edited model on the embedded task")
    ft = run_finetune(lm, recipe, load_source("embedded", task=task), out, overwrite=True,
                      edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply),
                      measures=Measures(task=task, eval_every=20))
    r = ft.result
    curve = Table(title="decay curve (step 0 = edited model)")
    for col in ("step", "ES", "PS", "NS", "task accuracy"):
        curve.add_column(col, justify="right")
    for pt in r["curve"]:
        curve.add_row(str(pt["step"]), pct(pt["efficacy"]), pct(pt["paraphrase"]), pct(pt["neighborhood"]),
                      pct(pt.get("task_accuracy")))
    console.print(curve)
    console.print(metrics_table("edits before editing, after editing, after fine-tuning", r["metrics"]))
    efr = r["decay"]["edit_flip_ratio"]
    console.print(f"Edit Flip Ratio: {efr}")
    return r
