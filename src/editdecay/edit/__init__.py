"""Editor registry: name -> (config class, solver factory). Unknown names get a 'did you mean'."""

from __future__ import annotations

import difflib

from editdecay.core.errors import ConfigError
from editdecay.edit.alphaedit import AlphaEdit
from editdecay.edit.config import AlphaEditConfig, EditorConfig, MemitConfig
from editdecay.edit.memit import Memit
from editdecay.edit.run import EditingRun, validate_requests

EDITORS = {"memit": Memit, "alphaedit": AlphaEdit}


def editor_class(name: str):
    try:
        return EDITORS[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), EDITORS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"editor {name!r} is not known (choose from {sorted(EDITORS)}){hint}") from None


def make_config(name: str, **fields) -> EditorConfig:
    """Build a validated config; pydantic errors become ConfigError naming the field and value."""
    from pydantic import ValidationError

    cls = editor_class(name).config_class
    try:
        return cls(**fields)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}={err.get('input')!r}: {err['msg']}"
                         for err in e.errors())
        raise ConfigError(f"{name} config: {msgs}") from None


__all__ = ["EDITORS", "AlphaEdit", "AlphaEditConfig", "EditingRun", "EditorConfig", "Memit", "MemitConfig",
           "editor_class", "make_config", "validate_requests"]
