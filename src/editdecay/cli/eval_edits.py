"""`editdecay eval-edits`: edit metrics (E6) of a model, optionally with a patch applied."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import ALLOW_FOREIGN_PATCH, ALLOW_PICKLE, TRUST_REMOTE_CODE  # shared options
from editdecay.cli.common import console, guard, metrics_table, set_threads


@app.command("eval-edits")
@guard
def eval_edits(
    model: str = typer.Option("smollm2-135m", help="embedded 'smollm2-135m', a local HF model directory, or a hub id"),
    data: Optional[str] = typer.Option(None, help="worldfacts | counterfact:PATH | zsre:PATH (default: the patch's own "
                                                  "requests with --patch, else worldfacts)"),
    limit: Optional[int] = typer.Option(None, help="evaluate this many requests (first N, or a seeded sample with "
                                                   "--seed), of --data or of the patch's requests"),
    seed: Optional[int] = typer.Option(None, help="seed for the --limit sample"),
    patch: Optional[Path] = typer.Option(None, help="evaluate with this patch (from `editdecay edit --out`) applied; "
                                                     "its own requests are used unless --data is given explicitly"),
    allow_foreign_patch: bool = ALLOW_FOREIGN_PATCH,
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    zsre_target: str = typer.Option("answers", help="zsRE edit target: 'answers' (MEMIT/AlphaEdit) or 'alt' (EasyEdit)"),
    strict: bool = typer.Option(False, help="fail on any rejected record instead of reporting it"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per forward pass (default: from the device's free memory; 32 on the CPU)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ... or auto: spread the model over the visible GPUs (accelerate device map)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    out: Optional[Path] = typer.Option(None, help="write the JSON result here"),
) -> None:
    """Measure efficacy, paraphrase and neighbourhood success (ALGORITHMS.md E6)."""
    from editdecay.edit.workflow import evaluate_stage_result

    from editdecay.core.errors import ConfigError

    set_threads(threads)
    if seed is not None and limit is None:
        raise ConfigError(f"--seed {seed} draws a sample of --limit requests; without --limit every request is "
                          f"evaluated and the seed would do nothing: give --limit N, or drop --seed")
    from editdecay.core.model_ref import ModelRef
    from editdecay.data.sources import EditSelection

    ref = ModelRef(name=model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    requests = None        # with --patch and no --data: the patch's own requests (--limit/--seed apply to them)
    if data is not None or patch is None:
        requests = EditSelection(data=data or "worldfacts", n=limit, seed=seed, zsre_target=zsre_target, strict=strict)
    result = evaluate_stage_result(ref, requests, patch, limit=limit, seed=seed, batch_size=batch_size, device=device,
                                   allow_foreign_patch=allow_foreign_patch)
    console.print(metrics_table(f"{result['model']['name']} on {result['data']['name']}", result["metrics"]))
    if out:
        from editdecay.core.results import write_result

        write_result(out, result)
        console.print(f"result written to {out}")
