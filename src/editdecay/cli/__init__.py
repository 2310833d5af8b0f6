"""The `editdecay` command line. One file per subcommand, each registering on `app`."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="editdecay", add_completion=False, no_args_is_help=True,
    help="Do knowledge edits survive fine-tuning? Edit, fine-tune and measure.",
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from editdecay.cli import eval_edits  # noqa: F401
    for optional in ("edit", "train_editor", "finetune", "grid", "report", "demo"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{optional}":
                raise


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # lm-eval narrates every evaluation at INFO (task building, seeds); keep its warnings only.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    _register()
    app()
