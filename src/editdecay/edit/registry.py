"""The editor registry: editor name -> its class (edit/editor.py says what a class declares), one line each.

    memit       edit/memit.py       E4, lambda-weighted least squares
    alphaedit   edit/alphaedit.py   E5, the same update projected onto the null space of the preserved keys

Names are known without importing anything (a grid file is validated in milliseconds); a class, with its
config class and presets, is imported the first time it is asked for. `register_editor` and
`unregister_editor` add and remove an editor at run time (a plug-in, or a test's toy editor).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

from editdecay.core.config import check_choice
from editdecay.core.embedded import EMBEDDED_NAME
from editdecay.core.errors import ConfigError

if TYPE_CHECKING:
    from editdecay.edit.config import EditorConfig
    from editdecay.edit.editor import Editor
    from editdecay.edit.patch import EditPatch

# The built-in editors: name -> "module:class".
BUILTIN = {
    "memit": "editdecay.edit.memit:Memit",
    "alphaedit": "editdecay.edit.alphaedit:AlphaEdit",
}

_editors: dict[str, "str | type[Editor]"] = dict(BUILTIN)


def editor_names() -> tuple[str, ...]:
    """The registered editors' names, in registration order."""
    return tuple(_editors)


def check_editor(name: str) -> str:
    """The registered name `name` spells (case-insensitive). Raises ConfigError with the valid names."""
    return check_choice("editor", str(name).lower(), _editors)


def load_patch(directory) -> "EditPatch":
    """`EditPatch.load(directory)`, and its editor is a registered one: what every command reads a patch directory
    with. ConfigError naming the directory and the editor (with the registered names) otherwise."""
    from editdecay.core.config import choice_reason
    from editdecay.edit.patch import EditPatch

    patch = EditPatch.load(directory)
    if patch.editor not in _editors:
        raise ConfigError(f"patch {directory}: patch.json editor={patch.editor!r} {choice_reason(patch.editor, _editors)}")
    return patch


def editor_class(name: str) -> "type[Editor]":
    """The class registered under `name` (case-insensitive), imported on first use. ConfigError if unknown."""
    name = check_editor(name)
    entry = _editors[name]
    if isinstance(entry, str):
        module, cls = entry.rsplit(":", 1)
        entry = _editors[name] = getattr(importlib.import_module(module), cls)
    return entry


def register_editor(cls: "type[Editor]") -> "type[Editor]":
    """Add an editor class under `cls.name`. Raises ConfigError if the name is taken or a declaration is missing."""
    missing = [a for a in ("name", "family", "config_class") if not hasattr(cls, a)]
    if missing:
        raise ConfigError(f"editor class {cls.__name__}: declares no {missing[0]!r} (edit/editor.py)")
    if cls.name in _editors:
        raise ConfigError(f"editor {cls.name!r} is registered already")
    _editors[cls.name] = cls
    return cls


def unregister_editor(name: str) -> None:
    """Remove an editor added by `register_editor` (a built-in goes back to its lazy entry)."""
    _editors.pop(name)
    if name in BUILTIN:
        _editors[name] = BUILTIN[name]


def make_config(name: str, **fields) -> "EditorConfig":
    """A validated config of editor `name`; an unknown editor or an invalid field raises ConfigError naming it."""
    return editor_class(name).config_class(**fields)


def preset_for(name: str, family: str | None, model_name: str | None = None) -> dict[str, Any]:
    """The editor's preset fields for a model: the embedded model's own, else its family's (core/arch.py).
    Raises ConfigError when the editor has none for the family."""
    cls = editor_class(name)
    if model_name == EMBEDDED_NAME and cls.embedded_preset:
        return dict(cls.embedded_preset)
    if family in cls.presets:
        return dict(cls.presets[family])
    raise ConfigError(f"no {cls.name} preset for model family {family!r} (presets: {', '.join(cls.presets) or 'none'}); "
                      f"give the edited layers explicitly (--layers, or edit_layers / overrides.layers in a grid)")


def resolve_config(name: str, family: str | None, model_name: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> "EditorConfig":
    """Preset for the model (`preset_for`) + explicit overrides (None values ignored), validated.
    With `layers` among the overrides a family without a preset is fine: the config's defaults fill the rest."""
    fields = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        preset = preset_for(name, family, model_name)
    except ConfigError:
        if "layers" not in fields:
            raise
        preset = {}
    return make_config(name, **{**preset, **fields})


def field_owners(key: str) -> tuple[str, ...]:
    """The registered editors whose config has a field `key`, in registration order."""
    return tuple(n for n in editor_names() if key in editor_class(n).config_class.model_fields)


def check_fields(name: str, fields: Mapping[str, Any]) -> None:
    """Raise ConfigError for a field name the editor's config does not have (before any model is loaded)."""
    from editdecay.core.config import did_you_mean

    cls = editor_class(name)
    known = cls.config_class.model_fields
    for key, value in fields.items():
        if value is not None and key not in known:
            owners = field_owners(key)
            where = (f"a setting of editor {' and '.join(owners)}, not of {cls.name}" if owners else
                     f"not a setting of editor {cls.name}{did_you_mean(key, known)}; its settings: {', '.join(known)}")
            raise ConfigError(f"{key}={value!r} (--{key.replace('_', '-')}) is {where}")


__all__ = ["BUILTIN", "check_editor", "check_fields", "editor_class", "editor_names", "field_owners", "load_patch",
           "make_config", "preset_for", "register_editor", "resolve_config", "unregister_editor"]
