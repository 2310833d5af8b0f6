"""The edit step (docs/METHODS.md E1-E5): statistics, keys, targets, the editors' solves, patches.

Public API (imported lazily, so `editdecay.edit.registry` can be read without torch):
- `edit_model(lm, editor, cfg, requests)` -> (EditPatch, EditingRun)        (edit/api.py)
- `editor_names()`, `editor_class(name)`, `make_config(name, **fields)`    (edit/registry.py)
- `Editor`, `LocateThenEdit`: what an editor class declares                (edit/editor.py)
- `EditPatch`, `EditingRun`, `validate_requests`
"""

from __future__ import annotations

import importlib

_LAZY = {
    "EditingRun": "editdecay.edit.run", "validate_requests": "editdecay.edit.run",
    "EditPatch": "editdecay.edit.patch", "edit_model": "editdecay.edit.api", "build_run": "editdecay.edit.api",
    "Editor": "editdecay.edit.editor", "LocateThenEdit": "editdecay.edit.editor",
    "EditorConfig": "editdecay.edit.config", "LocateThenEditConfig": "editdecay.edit.config",
    "editor_class": "editdecay.edit.registry", "editor_names": "editdecay.edit.registry",
    "make_config": "editdecay.edit.registry", "preset_for": "editdecay.edit.registry",
    "register_editor": "editdecay.edit.registry", "unregister_editor": "editdecay.edit.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editdecay.edit' has no attribute {name!r}")


__all__ = sorted(_LAZY)
