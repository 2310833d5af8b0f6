"""The edit step (docs/METHODS.md E1-E5): statistics, keys, targets, the MEMIT and AlphaEdit solves, patches.

Public API (imported lazily, so `editdecay.edit.config` can be read without torch):
- `edit_model(lm, editor, cfg, requests)` -> (EditPatch, EditingRun)   (edit/api.py)
- `make_config(name, **fields)`, `EDITOR_NAMES`, the config classes      (edit/config.py)
- `editor_class(name)`, `EDITORS`: the solver classes by name            (here)
- `EditPatch`, `EditingRun`, `validate_requests`
"""

from __future__ import annotations

import importlib

from editdecay.core.config import check_choice
from editdecay.edit.config import (
    CONFIGS,
    EDITOR_NAMES,
    AlphaEditConfig,
    EditorConfig,
    MemitConfig,
    make_config,
)

_LAZY = {
    "EditingRun": "editdecay.edit.run", "validate_requests": "editdecay.edit.run",
    "Memit": "editdecay.edit.memit", "AlphaEdit": "editdecay.edit.alphaedit",
    "EditPatch": "editdecay.edit.patch", "edit_model": "editdecay.edit.api", "build_run": "editdecay.edit.api",
}


def __getattr__(name: str):
    if name == "EDITORS":
        return editors()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editdecay.edit' has no attribute {name!r}")


def editors() -> dict:
    """Editor name -> solver class (imports the solvers, and so torch)."""
    from editdecay.edit.alphaedit import AlphaEdit
    from editdecay.edit.memit import Memit

    found = {"memit": Memit, "alphaedit": AlphaEdit}
    assert tuple(found) == EDITOR_NAMES, "every editor has a config (edit/config.py CONFIGS) and a solver"
    return found


def editor_class(name: str):
    """The editor class registered under `name` (case-insensitive). Raises ConfigError with the valid names."""
    return editors()[check_choice("editor", name.lower(), CONFIGS)]


__all__ = ["CONFIGS", "EDITORS", "EDITOR_NAMES", "AlphaEdit", "AlphaEditConfig", "EditPatch", "EditingRun",
           "EditorConfig", "Memit", "MemitConfig", "build_run", "edit_model", "editor_class", "editors", "make_config",
           "validate_requests"]
