"""`make demo-pipeline`: one cell of the pipeline on the embedded default model, with nothing to download.

Edits the embedded SmolLM2-135M with MEMIT (worldfacts, 50 edits in one batch by default),
then fine-tunes the edited model with LoRA on the embedded task and reports what
is left of the edits. Results go to ./runs/demo (patch, result.json, curve).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser(prog="python -m editdecay.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--n", type=int, default=50, help="number of worldfacts edits")
    p.add_argument("--editor", default="memit")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--steps", type=int, default=60, help="LoRA fine-tuning steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    from .cli.common import metrics_table
    from .pipeline import run_edit

    console.rule(f"[bold]editdecay demo[/]: {args.editor}, {args.n} worldfacts edits on smollm2-135m")
    patch_dir = args.out / f"{args.editor}-patch"
    result = run_edit(model="smollm2-135m", editor=args.editor, data="worldfacts", n=args.n, seed=0,
                      out=patch_dir, overrides={})
    console.print(metrics_table("edit metrics before (pre) and after (post) editing", result["metrics"]))
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    if not args.skip_finetune:
        finetune_demo(console, patch_dir, args.out / f"{args.editor}-lora", steps=args.steps)
    console.print(f"results in {args.out.resolve()}")
    return 0


def finetune_demo(console, patch_dir: Path, out: Path, *, steps: int | None = None) -> dict:
    """LoRA on the embedded task, starting from the edited model; prints the decay curve (E7)."""
    from rich.table import Table

    from .cli.common import metrics_table, pct
    from .finetune import EmbeddedTask, load_source, preset, run_finetune
    from .models import load_model
    from .patch import EditPatch

    patch = EditPatch.load(patch_dir)
    lm = load_model("smollm2-135m")
    task = EmbeddedTask(n_test=100)
    recipe = preset("embedded", "lora", **({"max_steps": steps} if steps else {}))
    console.rule("LoRA fine-tuning of the edited model on the embedded task")
    ft = run_finetune(lm, recipe, load_source("embedded", task=task), out, requests=patch.requests,
                      edited_layers=patch.layers, apply_edit=patch.apply, task=task, eval_every=20, overwrite=True)
    r = ft.result
    curve = Table(title="decay curve (step 0 = edited model)")
    for col in ("step", "ES", "PS", "NS", "task accuracy"):
        curve.add_column(col, justify="right")
    for pt in r["curve"]:
        curve.add_row(str(pt["step"]), pct(pt["efficacy"]), pct(pt["paraphrase"]), pct(pt["neighborhood"]),
                      pct(pt.get("task_accuracy")))
    console.print(curve)
    console.print(metrics_table("edits before editing (pre), after editing (post), after fine-tuning", r["metrics"]))
    efr = r["decay"]["edit_flip_ratio"]
    console.print(f"Edit Flip Ratio: {efr}")
    return r


if __name__ == "__main__":
    sys.exit(main())
