"""`editdecay grid plan|run|status|unlock|gather`: the whole study from one grid file (see editdecay.grid)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import console, guard
from editdecay.cli.options import Fields, config_options
from editdecay.core.errors import ConfigError
from editdecay.grid.spec import SharedSettings

RUN = Fields(SharedSettings, into="run", only=("threads",), default="the grid file's shared.threads",
             panel="Run (grid: shared)")

grid_app = typer.Typer(name="grid", no_args_is_help=True, add_completion=False,
                       help="Plan, run and follow a grid of experiments (models x editors x data x edits x recipes).")
app.add_typer(grid_app, name="grid")


def _wide():
    """The shared console in a terminal; a wide one when piped, so cell ids are never cut."""
    from rich.console import Console

    return console if sys.stdout.isatty() else Console(width=250)


def _print_json(obj) -> None:
    from editdecay.core.cache import dumps_json

    sys.stdout.write(dumps_json(obj, indent=2) + "\n")     # strict JSON: NaN -> null + status


def _load(grid_file: Path):
    from editdecay.grid.plan import build_plan
    from editdecay.grid.spec import load_grid

    return build_plan(load_grid(grid_file))


@grid_app.command("plan")
@guard
def plan_cmd(
    grid_file: Path = typer.Argument(..., help="grid YAML file"),
    as_json: bool = typer.Option(False, "--json", help="print {cells, stages, summary} as JSON"),
    memory: Optional[str] = typer.Option(None, help="also plan the memory of every edit and fine-tuning stage on a "
                                                    "device of this size, e.g. 80GB (reads config.json only)"),
) -> None:
    """List the cells of a grid and the stages they need, and how many stages are shared. Runs nothing."""
    from rich.table import Table

    from editdecay.grid.plan import missing_files

    plan = _load(grid_file)
    missing = missing_files(plan)
    mem_rows = _memory_rows(plan, memory) if memory is not None else None
    if as_json:
        d = plan.to_dict()
        extra = {"memory": [{"what": r["what"], "plan": r["plan"].to_dict() if r["plan"] else None,
                             "note": r.get("note")} for r in mem_rows]} if mem_rows is not None else {}
        _print_json({"name": d["name"], "summary": d["summary"], "cells": d["cells"], "stages": d["stages"],
                     "missing_files": missing, **extra})
        return
    out = _wide()
    t = Table(title=f"grid {plan.name!r}: {len(plan.cells)} cells")
    for col in ("model", "editor", "data", "n", "recipe", "ft data", "seed", "stages", "cell id"):
        t.add_column(col, no_wrap=True)
    for c in plan.cells:
        a = c.axes
        t.add_row(a["model_label"], a["editor"] or "-", a["edit_data_label"] or "-", str(a["n_edits"]), a["recipe"],
                  a["finetune_data_label"], str(a["seed"]), str(len(plan.closure(c.stages.values()))), c.id)
    out.print(t)
    s = plan.summary()
    k = Table(title="stages")
    for col in ("kind", "stages", "used by cells", "shared (used by > 1 cell)"):
        k.add_column(col, justify="right" if col != "kind" else "left")
    for kind, v in s["by_kind"].items():
        k.add_row(kind, str(v["stages"]), str(v["uses"]), str(v["shared"]))
    out.print(k)
    out.print(f"{s['cells']} cells need {s['stage_uses']} stage uses; {s['stages']} distinct stages are computed "
              f"({s['shared_stages']} shared by several cells, {s['uses_saved_by_sharing']} computations saved)")
    for line in missing:
        out.print(f"[yellow]warning:[/] {line} (needed when the grid runs)", highlight=False)
    if mem_rows is not None:
        from editdecay.core.memory_plan import render

        bad = 0
        for r in mem_rows:
            if r["plan"] is None:
                out.print(f"{r['what']}: not planned ({r['note']})", highlight=False, markup=False)
                continue
            bad += not r["plan"].fits
            out.print(f"{r['what']}:", highlight=False, markup=False)
            for line in render(r["plan"])[1:]:
                out.print(line, highlight=False, markup=False)
        out.print(f"memory plan on {memory}: {len(mem_rows) - bad} of {len(mem_rows)} planned runs fit", highlight=False)


def _memory_rows(plan, memory: str) -> list[dict]:
    from editdecay.core.memory_plan import parse_memory
    from editdecay.grid.memory import plan_grid

    return plan_grid(plan, parse_memory(memory))


@grid_app.command("run")
@guard
@config_options(RUN)
def run_cmd(
    run: dict,
    grid_file: Path = typer.Argument(..., help="grid YAML file"),
    out: Path = typer.Option(..., help="output directory (created; re-run with the same --out to resume)"),
    backend: str = typer.Option("local", help="local (in-process) | ray | slurm"),
    workers: int = typer.Option(1, help="local backend: independent stages computed at once, each in a process of "
                                        "its own with one torch thread (default 1: one after another, in-process)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: the grid's, else a local cluster)"),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of a local Ray cluster started here"),
    slurm_cluster: str = typer.Option("auto", help="submitit executor: auto | slurm | local"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="run only the cells that failed before"),
    cell: Optional[List[str]] = typer.Option(None, help="run only this cell id (repeatable)"),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="progress bars inside stages"),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
) -> None:
    """Run (or resume) a grid. Finished stages are reused; failed cells are recorded and the rest goes on."""
    from editdecay.core.files import MAX_GRID_BYTES, read_text
    from editdecay.core.outputs import check_output_dir
    from editdecay.grid.runner import run_grid

    threads = SharedSettings(**run).threads
    if workers != 1 and backend != "local":
        raise ConfigError(f"--workers {workers} is an option of the local backend; --backend {backend} places stages "
                          f"itself (ray: resources.*.cpus, slurm: array_parallelism)")
    plan = _load(grid_file)
    if cell:
        plan.check_cells(cell)                               # before the output directory is touched
    check_output_dir(out, kind="grid", overwrite=True)      # resumable in place; never over another kind of run
    grid_text = read_text(grid_file, "grid file", limit=MAX_GRID_BYTES)
    options = {"workers": workers} if backend == "local" else {}
    if backend == "ray":
        options = {"address": address, "num_cpus": num_cpus}
    elif backend == "slurm":
        options = {"cluster": slurm_cluster}
    from rich.console import Console

    err = Console(stderr=True)

    def echo(line: str) -> None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    echo(f"grid {plan.name!r}: {len(plan.cells)} cells, {len(plan.stages)} stages -> {out} ({backend})")
    summary = run_grid(plan, out, backend=backend, grid_text=grid_text, retry_failed=retry_failed,
                       cells=cell or None, threads=threads, progress=progress, echo=echo, **options)
    if as_json:
        _print_json(summary.to_dict())
    else:
        st = summary.stages
        console.print(f"stages: {st['computed']} computed, {st['reused']} reused, {st['failed']} failed, "
                      f"{st['blocked']} blocked; {summary.seconds:.1f} s"
                      + (f" ({summary.already_done} cells were already done)" if summary.already_done else ""))
        c = summary.cells
        console.print(f"cells: {c['done']} done, {c['failed']} failed, {c['pending']} pending, "
                      f"{c['running']} running (elsewhere)" + (f", {c['invalid']} invalid" if c.get("invalid") else ""))
        if summary.skipped_failed:
            console.print(f"{len(summary.skipped_failed)} cell(s) failed earlier and were left alone; "
                          f"rerun them with --retry-failed")
        for f in summary.failed:
            console.print(f"[red]failed[/] {f['cell']}: {f['error']}", highlight=False)
        _print_results(Path(out), plan)
        console.print(f"results: {Path(out) / 'results'}" + (f", table {summary.results_table}"
                                                            if summary.results_table else ""))
    if summary.cells["failed"]:
        raise typer.Exit(1)


def _print_results(out: Path, plan, limit: int = 40) -> None:
    """Efficacy of M0 / M_e / M_f / M_ef, Edit Flip Ratio and task accuracy, one row per finished cell."""
    from rich.table import Table

    from editdecay.cli.common import pct
    from editdecay.grid.store import GridStore

    store = GridStore(out)
    rows = [(c, r) for c in plan.cells if (r := store.read_result(c.id)) is not None][:limit]
    if not rows:
        return
    from editdecay.core.schema import MODELS
    from editdecay.report.downstream import headline_key

    t = Table(title="efficacy (%) before / after editing, after fine-tuning; Edit Flip Ratio; held-out task score (%): "
                    "exact match (embedded task, chatterbot-choice) or token accuracy (chatterbot)")
    for col in ("cell", "n", "ES M0", "ES M_e", "ES M_f", "ES M_ef", "EFR", "task M0", "task M_ef / M_f"):
        t.add_column(col, justify="left" if col == "cell" else "right")
    for c, r in rows:
        m = r["metrics"]
        es = [pct((m.get(k) or {}).get("efficacy")) for k in MODELS]
        efr = ((r.get("decay") or {}).get("edit_flip_ratio") or {}).get("value")
        key = headline_key(m.get("M_ef") or m.get("M_f"))
        after = (m.get("M_ef") or m.get("M_f") or {}).get(key)
        t.add_row(c.label, str(c.axes["n_edits"]), *es, pct(efr), pct(m["M0"].get(key)), pct(after))
    _wide().print(t)


@grid_app.command("status")
@guard
def status_cmd(
    out: Path = typer.Argument(..., help="grid output directory (the --out of `grid run`)"),
    as_json: bool = typer.Option(False, "--json", help='print {"cells": [{"id", "state", ...}], "locks": [...]}'),
    errors: bool = typer.Option(False, "--errors", help="print the traceback of each failed cell"),
    stale_after: Optional[float] = typer.Option(None, help="seconds without a heartbeat after which a held lock "
                                                           "is shown as stale (its holder hangs); default 900"),
) -> None:
    """Done / running / failed / pending, per cell; held locks with their holder, stale ones marked."""
    from rich.table import Table

    from editdecay.grid.store import STALE_AFTER_S, GridStore, state_counts

    store = GridStore(out)
    plan = store.read_plan()
    stale_after = STALE_AFTER_S if stale_after is None else stale_after
    cells = store.cell_states(plan, stale_after=stale_after)
    locks = store.locks(stale_after)
    counts = state_counts(cells)
    if as_json:
        _print_json({"grid": plan.name, "counts": counts, "cells": cells, "locks": locks})
        return
    colour = {"done": "green", "running": "yellow", "failed": "red", "pending": "dim", "invalid": "red"}
    con = _wide()
    t = Table(title=f"grid {plan.name!r} in {out}")
    for col in ("cell", "state", "detail"):
        t.add_column(col)
    for c in cells:
        detail = ""
        if c["state"] == "failed":
            detail = f"{c['failed_kind']}: {c['error']}"
        elif c["state"] == "invalid":
            detail = f"{c['error']} (`editdecay grid run` publishes it again from its cell stage)"
        elif c["state"] == "running":
            r = c["running"][0]
            detail = f"{r['kind']} on {r.get('host', '?')} pid {r.get('pid', '?')} since {r.get('started', '?')}"
            if r.get("stale"):
                detail += f" [red]STALE[/]: {r['why']}"
            elif r.get("why"):
                detail += f" [yellow]no heartbeat[/]: {r['why']}"
        t.add_row(c["id"], f"[{colour[c['state']]}]{c['state']}[/]", detail)
    con.print(t)
    con.print(", ".join(f"{v} {k}" for k, v in counts.items()))
    stale = [k for k in locks if k["stale"]]
    for k in locks:
        if not k["stale"] and k.get("why"):         # alive on this host, silent: only --force clears it
            con.print(f"[yellow]silent lock[/] {k['stage']}: {k['why']}", highlight=False)
    for k in stale:
        con.print(f"[red]stale lock[/] {k['stage']}: held by pid {k.get('pid', '?')} on {k.get('host', '?')} since "
                  f"{k.get('started', '?')}; {k['why']}", highlight=False)
    if stale:
        con.print(f"`editdecay grid unlock {out}` clears stale locks (kill their holders if they still run)",
                  highlight=False, markup=False)
    if errors:
        for c in cells:
            if c["state"] == "failed":
                con.rule(c["id"])
                con.print(c["traceback"], highlight=False, markup=False)


@grid_app.command("unlock")
@guard
def unlock_cmd(
    out: Path = typer.Argument(..., help="grid output directory (the --out of `grid run`)"),
    stage: Optional[List[str]] = typer.Option(None, help="only this stage id (repeatable; default: every stale lock)"),
    stale_after: Optional[float] = typer.Option(None, help="seconds without a heartbeat after which a lock is "
                                                           "stale; default 900"),
    force: bool = typer.Option(False, "--force", help="also clear the named --stage locks that are not stale"),
) -> None:
    """Clear stale stage locks: held by a process that is gone or shows no heartbeat (it hangs), which would
    block every other runner of the stage forever. The holder (pid, host) is printed: kill it if it still runs."""
    from editdecay.core.errors import ConfigError
    from editdecay.grid.store import STALE_AFTER_S, STATES, GridStore

    store = GridStore(out)
    plan = store.read_plan()
    stale_after = STALE_AFTER_S if stale_after is None else stale_after
    held = {k["stage"]: k for k in store.locks(stale_after)}
    for sid in stage or []:
        if sid not in plan.stages:
            raise ConfigError(f"--stage {sid!r} is not a stage of grid {plan.name!r} in {out}")
        if sid not in held:
            raise ConfigError(f"--stage {sid}: its lock is not held by anyone; nothing to clear")
        if not held[sid]["stale"] and not force:
            k = held[sid]
            raise ConfigError(f"--stage {sid}: its lock is held by pid {k.get('pid')} on {k.get('host')}, which "
                              f"showed a heartbeat {k.get('heartbeat_age_s')} s ago (not stale: less than "
                              f"--stale-after {stale_after:g} s); pass --force to clear it anyway")
    chosen = [held[s] for s in stage] if stage else [k for k in held.values() if k["stale"]]
    if not chosen:
        console.print(f"no stale lock in {out} ({len(held)} held, with a heartbeat in the last {stale_after:g} s)")
        return
    for k in chosen:
        if store.unlock(k["stage"], k):
            console.print(f"unlocked {k['stage']} ({plan.stages[k['stage']].kind}): it was held by pid "
                          f"{k.get('pid', '?')} on {k.get('host', '?')} since {k.get('started', '?')}; "
                          f"{k['why'] or 'cleared with --force'}", highlight=False)
        else:
            console.print(f"left {k['stage']}: it changed hands while being cleared", highlight=False)


@grid_app.command("gather")
@guard
def gather_cmd(out: Path = typer.Argument(..., help="grid output directory")) -> None:
    """Write results.parquet and results.csv (one row per finished cell) from results/*.json."""
    from editdecay.grid.store import GridStore

    store = GridStore(out)
    path = store.gather(store.read_plan())
    console.print(f"wrote {path} and {Path(out) / 'results.csv'}" if path else "no finished cells yet")
