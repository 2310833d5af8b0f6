"""One configuration system: typed pydantic records and one "did you mean" for every registry.

Every user-facing settings record (editor configs, the fine-tuning recipe, the statistics
corpus, downstream and task specs, the grid file) derives from `Config`:

- frozen (hashable, safe to share between cells) and `extra="forbid"` (a misspelt field is an
  error that suggests the field meant, never silently ignored);
- each field's `description` is its help text (`Config.help()` lists them);
- construction raises `ConfigError` naming the record, the field, the value and what is
  valid, instead of pydantic's `ValidationError` (which the CLI would print as a traceback).

`did_you_mean` and `check_choice` are the single implementation of name suggestions, used by
the configs, the editor/backend/preset/task registries and the data-source parsers.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError

from editdecay.core.errors import ConfigError


def did_you_mean(value: Any, options: Iterable[Any], *, n: int = 1) -> str:
    """' (did you mean 'x'?)' for the closest option(s), or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=n)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


def check_choice(what: str, value: Any, options: Iterable[Any], *, extra: str = "", error=ConfigError) -> Any:
    """Return `value` if it is one of `options`; otherwise raise `error` naming what, the value and the choices."""
    options = tuple(options)
    if value not in options:
        raise error(f"{what}={value!r} is not valid{did_you_mean(value, options)}; "
                    f"use one of {', '.join(map(str, options))}{' ' + extra if extra else ''}")
    return value


def _strip(msg: str) -> str:
    # pydantic prefixes messages raised by our validators with "Value error, " / "Assertion failed, "
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def explain(name: str, err: ValidationError, fields: Iterable[str]) -> str:
    """A ValidationError as one line per problem: `name.field=value: reason`, with field suggestions."""
    fields = list(fields)
    parts = []
    for e in err.errors():
        loc = ".".join(map(str, e["loc"]))
        if e["type"] == "extra_forbidden":
            unknown = str(e["loc"][-1])
            parts.append(f"{name} has no field {unknown!r}{did_you_mean(unknown, fields)}; "
                         f"fields: {', '.join(fields)}")
        elif loc:
            parts.append(f"{name}.{loc}={e.get('input')!r}: {_strip(e['msg'])}")
        else:
            msg = _strip(e["msg"])
            parts.append(msg if msg.startswith((f"{name}.", f"{name}:")) else f"{name}: {msg}")
    return "; ".join(parts)


class Config(BaseModel):
    """Base of every settings record: frozen, no unknown fields, errors as ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)

    # The name used in error messages ("recipe", "corpus", ...); defaults to the class name.
    config_name: ClassVar[str | None] = None

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as e:
            raise ConfigError(explain(self._name(), e, type(self).model_fields)) from None

    @classmethod
    def _name(cls) -> str:
        return cls.config_name or cls.__name__

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (the field's description), for documentation and command-line help."""
        return {name: f.description or "" for name, f in cls.model_fields.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a plain dict (a result file, a YAML block); unknown keys are an error."""
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples become lists)."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed, validated again. Unknown names are an error."""
        return type(self)(**{**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


__all__ = ["Config", "check_choice", "did_you_mean", "explain"]
