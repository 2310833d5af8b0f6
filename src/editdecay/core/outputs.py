"""Where a command writes: checked before a model loads or anything is computed or deleted (torch-free).

Every command that writes (`edit --out`, `finetune --out`, `eval-edits --out`, `report --out`) asks here first,
so the rules are the same everywhere:

- the path can be made and written: not an existing file where a directory is meant (or the reverse), no part of
  its path is a file, and the deepest existing directory on it is writable;
- an output directory that holds another kind of run (a patch directory, a fine-tuning run, a grid's results)
  is refused by every command, `--overwrite` or not: one directory, one kind of run, so nothing a command
  replaces or deletes can be another command's result;
- a directory holding a run of the same kind is refused unless the command's overwrite flag is given.

Nothing is created, written or deleted here. ConfigError names the option, the path and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from editdecay.core.errors import ConfigError
from editdecay.core.files import MAX_RESULT_BYTES, json_or_none, path_problem

RESULT_FILE = "result.json"
# What each kind of output directory is called in messages, and the file that marks it.
KINDS = {"edit": "a patch directory (editdecay edit)", "finetune": "a fine-tuning run (editdecay finetune)",
         "eval-edits": "an evaluation result (editdecay eval-edits)", "grid": "a grid's results (editdecay grid run)",
         "grid-cell": "a grid cell's result", "report": "a report (editdecay report)"}
_MARKERS = (("plan.json", "grid"), ("patch.json", "edit"), ("patch.safetensors", "edit"), ("report.html", "report"))


def held_kind(directory: str | Path) -> str | None:
    """The kind of run `directory` holds (a key of KINDS, or 'unknown' for a result.json that cannot be read or
    names no kind), or None when it holds none (missing, empty, or files of no run)."""
    d = Path(directory)
    for name, kind in _MARKERS:
        if os.path.lexists(d / name):
            return kind
    if os.path.lexists(d / RESULT_FILE):
        result = json_or_none(d / RESULT_FILE, limit=MAX_RESULT_BYTES)
        kind = (result or {}).get("kind")
        return kind if kind in KINDS else "unknown"
    return None


def _writable_place(path: Path, option: str) -> None:
    """ConfigError unless `path` could be created or written: every existing part of its path is a directory and
    the deepest existing one is writable."""
    for parent in reversed(path.parents):
        if os.path.lexists(parent) and not parent.is_dir():
            raise ConfigError(f"{option} {str(path)!r} cannot be made: a part of its path, {str(parent)!r}, is a file, "
                              f"not a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is not writable (permission "
                          f"denied); choose a directory you can write to")


def check_output_dir(out: str | Path, *, kind: str, overwrite: bool = False, option: str = "--out",
                     overwrite_flag: str = "--overwrite") -> Path:
    """`out` as a Path if the command that writes `kind` (a key of KINDS) may write there (see module rules);
    otherwise ConfigError naming `option`, the path and what it holds. Touches nothing."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        problem = "is a file, not a directory" if out.is_file() else (path_problem(out) or "is not a directory")
        raise ConfigError(f"{option} {str(out)!r} {problem}; {option} names a directory to write into")
    _writable_place(out, option)
    held = held_kind(out) if out.is_dir() else None
    if held is not None and held != kind:
        what = KINDS.get(held, "a result.json of no known kind")
        raise ConfigError(f"{option} {str(out)!r} holds {what}; {KINDS[kind].split(' (')[0]} is never written over "
                          f"another kind of run ({overwrite_flag} does not change that): choose another directory")
    if held == kind and not overwrite:
        raise ConfigError(f"{option} {str(out)!r} already holds {KINDS[kind]}; choose another directory or pass "
                          f"{overwrite_flag} to replace it")
    return out


def check_output_file(out: str | Path, *, kind: str, option: str = "--out") -> Path:
    """`out` as a Path if a result file of `kind` may be written there: not a directory or another non-regular
    file, its directory can be made and written, and an existing file is a result of the same kind (a result of
    another command, or a file that is no result, is never replaced). ConfigError otherwise. Touches nothing."""
    out = Path(out)
    if os.path.lexists(out):
        problem = path_problem(out)
        if problem is not None and problem != "cannot be read (permission denied)":
            raise ConfigError(f"{option} {str(out)!r} {problem}; {option} names a result file to write")
        existing = json_or_none(out, limit=MAX_RESULT_BYTES)
        if existing is None or existing.get("kind") != kind:
            what = KINDS.get((existing or {}).get("kind"), "a file that is not an editdecay result")
            raise ConfigError(f"{option} {str(out)!r} already exists and holds {what}; it is not replaced by "
                              f"{KINDS[kind].split(' (')[0]}: choose another path")
    _writable_place(out, option)
    return out


__all__ = ["KINDS", "check_output_dir", "check_output_file", "held_kind"]
