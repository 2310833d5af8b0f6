"""`editdecay eval-edits`: edit metrics (E6) of a model, optionally with a patch applied."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import ALLOW_FOREIGN_PATCH, check_run, console, guard, metrics_table
from editdecay.cli.options import Fields, config_options
from editdecay.core.model_ref import ModelRef
from editdecay.grid.spec import EvaluationSettings, SharedSettings

MODEL = Fields(ModelRef, into="model", names={"name": "model"}, panel="Model (grid: models[])")
EVALUATION = Fields(EvaluationSettings, into="evaluation", only=("batch_size", "zsre_target", "strict"),
                    panel="Evaluation (grid: shared.evaluation)")
RUN = Fields(SharedSettings, into="run", only=("device", "threads"), panel="Run (grid: shared)")


@app.command("eval-edits")
@guard
@config_options(MODEL, EVALUATION, RUN)
def eval_edits(
    model: dict,
    evaluation: dict,
    run: dict,
    data: Optional[str] = typer.Option(None, help="worldfacts | counterfact:PATH | zsre:PATH (default: the patch's own "
                                                  "requests with --patch, else worldfacts)"),
    limit: Optional[int] = typer.Option(None, help="evaluate this many requests (first N, or a seeded sample with "
                                                   "--seed), of --data or of the patch's requests"),
    seed: Optional[int] = typer.Option(None, help="seed for the --limit sample"),
    patch: Optional[Path] = typer.Option(None, help="evaluate with this patch (from `editdecay edit --out`) applied; "
                                                     "its own requests are used unless --data is given explicitly"),
    allow_foreign_patch: bool = ALLOW_FOREIGN_PATCH,
    out: Optional[Path] = typer.Option(None, help="write the JSON result here"),
) -> None:
    """Measure efficacy, paraphrase and neighbourhood success (docs/METHODS.md E6)."""
    from editdecay.core.errors import ConfigError
    from editdecay.edit.workflow import evaluate_stage_result

    ref = ModelRef(**model)
    ev = EvaluationSettings(**evaluation)
    settings = SharedSettings(**run)
    if seed is not None and limit is None:
        raise ConfigError(f"--seed {seed} draws a sample of --limit requests; without --limit every request is "
                          f"evaluated and the seed would do nothing: give --limit N, or drop --seed")
    from editdecay.data.sources import EditSelection

    requests = None        # with --patch and no --data: the patch's own requests (--limit/--seed apply to them)
    if data is not None or patch is None:
        requests = EditSelection(data=data or "worldfacts", n=limit, seed=seed, zsre_target=ev.zsre_target,
                                 strict=ev.strict)
    check_run(settings)
    if out:
        from editdecay.core.outputs import check_output_file

        check_output_file(out, kind="eval-edits")
    result = evaluate_stage_result(ref, requests, patch, limit=limit, seed=seed, batch_size=ev.batch_size,
                                   device=settings.device, allow_foreign_patch=allow_foreign_patch)
    console.print(metrics_table(f"{result['model']['name']} on {result['data']['name']}", result["metrics"]))
    if out:
        from editdecay.core.results import write_result

        write_result(out, result)
        console.print(f"result written to {out}")
