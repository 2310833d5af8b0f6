"""Editor registry: name -> (config class, solver factory). Unknown names get a 'did you mean'."""

from __future__ import annotations

from editdecay.core.config import check_choice
from editdecay.edit.alphaedit import AlphaEdit
from editdecay.edit.config import AlphaEditConfig, EditorConfig, MemitConfig
from editdecay.edit.memit import Memit
from editdecay.edit.run import EditingRun, validate_requests

EDITORS = {"memit": Memit, "alphaedit": AlphaEdit}


def editor_class(name: str):
    """The editor class registered under `name` (case-insensitive). Raises ConfigError with the valid names."""
    return EDITORS[check_choice("editor", name.lower(), EDITORS)]


def make_config(name: str, **fields) -> EditorConfig:
    """Build a validated config; invalid fields raise ConfigError naming the field and value (core.config)."""
    return editor_class(name).config_class(**fields)


__all__ = ["EDITORS", "AlphaEdit", "AlphaEditConfig", "EditingRun", "EditorConfig", "Memit", "MemitConfig",
           "editor_class", "make_config", "validate_requests"]
