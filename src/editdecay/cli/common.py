"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from editdecay.core.errors import EditDecayError

console = Console()


# Options several commands share that belong to no configuration record (those are generated: cli/options.py).
ALLOW_FOREIGN_PATCH = typer.Option(False, "--allow-foreign-patch",
                                   help="apply a patch computed on other weights than --model's "
                                        "(refused by default; both fingerprints are recorded)")


def fail(err: Exception) -> None:
    """Print a user-actionable error without a traceback and exit with status 2."""
    from rich.markup import escape

    # The message quotes user data (prompts, paths, field names like 'prompts[0]'): never rich markup.
    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
    raise typer.Exit(2)


def set_threads(threads: int | None) -> None:
    """core.devices.set_threads, imported when a command runs (so `editdecay --help` does not load torch)."""
    from editdecay.core.devices import set_threads as pin

    pin(threads)


def check_run(settings) -> str:
    """Apply --threads and check that this machine has --device (core.placement.resolve_device), before a model
    loads or an output is touched; returns the device. ConfigError naming --device otherwise."""
    from editdecay.core.placement import resolve_device

    set_threads(settings.threads)
    return resolve_device(settings.device, field="--device")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def model_label(model: str) -> str:
    """'M_e (edited)': a model's name with what it is (core/schema.py MODEL_NAMES); other keys unchanged."""
    from editdecay.core.schema import MODEL_NAMES

    return f"{model} ({MODEL_NAMES[model]})" if model in MODEL_NAMES else model


def metrics_table(title: str, stages: dict[str, dict]) -> Table:
    """Rows: models (M0, M_e, M_f, M_ef); columns: ES, PS, NS with n."""
    t = Table(title=title)
    for col in ("model", "n", "efficacy (ES)", "paraphrase (PS)", "neighborhood (NS)", "harmonic mean"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for stage, m in stages.items():
        t.add_row(model_label(stage), str(m["n"]), pct(m["efficacy"]), pct(m["paraphrase"]), pct(m["neighborhood"]),
                  pct(m.get("harmonic_mean")))
    return t


def memory_plan_gate(make_plan, memory: str | None, device: str, dry_run: bool, what: str) -> bool:
    """Before a model is loaded: with --dry-run print the memory plan (against --memory, the CUDA device's
    memory, or 80 GB) and return True (the command stops); else refuse a plan that does not fit
    (MemoryPlanError, exit 2) when the device's size is known. `make_plan(device_bytes)` builds the plan."""
    from editdecay.core.memory_plan import device_memory, parse_memory, render

    budget = device_memory(device, memory)
    if dry_run:
        plan = make_plan(budget if budget is not None else parse_memory("80GB"))
        for line in render(plan):
            console.print(line, highlight=False, markup=False)
        console.print(("everything fits" if plan.fits else f"{len(plan.failing())} stage(s) do not fit")
                      + f" ({what}; dry run: nothing was loaded)", highlight=False)
        return True
    if budget is not None:
        make_plan(budget).check(what)
    return False


def guard(fn):
    """Turn EditDecayError into a clean message (exit 2); other exceptions keep their traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except EditDecayError as e:
            fail(e)
    return wrapper


__all__ = ["ALLOW_FOREIGN_PATCH", "check_run", "console", "fail", "guard", "memory_plan_gate", "metrics_table",
           "model_label", "pct", "set_threads", "sys"]
