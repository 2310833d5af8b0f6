"""`make demo`: the main job on the embedded default model, with nothing to download.

Edits the embedded SmolLM2-135M with MEMIT (worldfacts, 100 edits in one batch),
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
    p.add_argument("--n", type=int, default=100, help="number of worldfacts edits")
    p.add_argument("--editor", default="memit")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-finetune", action="store_true")
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
    stages = dict(result["metrics"])
    if not args.skip_finetune:
        try:
            from .finetune.pipeline import demo_finetune
        except ImportError:
            demo_finetune = None
        if demo_finetune is not None:
            ft = demo_finetune(patch_dir=patch_dir, out=args.out / "lora-finetune")
            stages["finetuned"] = ft["metrics"]["finetuned"]
            console.print(metrics_table("edits before, after editing, after LoRA fine-tuning", stages))
    console.print(f"results in {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
