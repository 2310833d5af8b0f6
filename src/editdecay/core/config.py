"""One configuration system: typed pydantic records, one error formatter, one "did you mean".

Every user-facing settings record (editor configs, the fine-tuning recipe, the model reference,
the statistics corpus, downstream and task specs, every block of a grid file) derives from
`Config`:

- frozen (hashable, safe to share between cells) and `extra="forbid"` (a misspelt field is an
  error that suggests the field meant, at any depth, never silently ignored);
- each field's `description` is its help text (`Config.help()`; the command-line options are
  generated from the fields, cli/options.py);
- construction raises `ConfigError` naming the record, the field, the value and what is
  valid, instead of pydantic's `ValidationError` (which the CLI would print as a traceback).

`explain` is the one place a pydantic `ValidationError` becomes text (configs, grid files,
result files); `did_you_mean`, `choice_reason` and `check_choice` are the one implementation of
choices and name suggestions, used by the configs, the registries and the data-source parsers.
The wording, everywhere::

    recipe.lora_r=0 is not valid: input should be greater than or equal to 1
    shared.chatterbot.n_choice: unknown field (did you mean 'n_choices'?); valid fields: n_test, ...
    recipes[0].method[1]='lorra' is not valid (did you mean 'lora'?); use one of full, lora, dora
    models: required field is missing
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError

from editdecay.core.errors import ConfigError


def did_you_mean(value: Any, options: Iterable[Any], *, n: int = 1) -> str:
    """' (did you mean 'x'?)' for the closest option(s), or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=n)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


def choice_reason(value: Any, options: Iterable[Any], *, extra: str = "") -> str:
    """'is not valid (did you mean 'x'?); use one of a, b[ extra]': the reason part of every choice error."""
    options = tuple(options)
    return (f"is not valid{did_you_mean(value, options)}; use one of {', '.join(map(str, options))}"
            f"{' ' + extra if extra else ''}")


def check_choice(what: str, value: Any, options: Iterable[Any], *, extra: str = "", error=ConfigError) -> Any:
    """Return `value` if it is one of `options`; otherwise raise `error` naming what, the value and the choices."""
    options = tuple(options)
    if value not in options:
        raise error(f"{what}={value!r} {choice_reason(value, options, extra=extra)}")
    return value


# --------------------------------------------------------------------------- the error formatter

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "is-instance"}


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _members(t: Any) -> tuple:
    """The alternatives of a Union / Optional / X | Y annotation (Annotated unwrapped); (t,) otherwise."""
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        out = []
        for a in typing.get_args(t):
            out.extend(m for m in _members(a) if m is not type(None))
        return tuple(out)
    return (t,)


def _step(t: Any, part: Any) -> tuple[Any, bool]:
    """The annotation one `loc` part further down `t`, and whether the part is a key the user wrote
    (False: a tag pydantic adds for union members and function validators)."""
    for m in _members(t):
        origin = typing.get_origin(m)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset):
            return (typing.get_args(m) or (Any,))[0], True
        if _is_model(m) and part in m.model_fields:
            return m.model_fields[part].annotation, True
        if origin is dict and isinstance(part, str):
            return (typing.get_args(m) or (Any, Any))[-1], True
    if isinstance(part, int):
        return Any, True
    text = str(part)
    if text in _TYPE_TAGS or "[" in text or text.startswith("function-") or any(
            _is_model(m) and m.__name__ == text for m in _members(t)):
        return t, False
    return None, True          # a key the record does not have (extra_forbidden), or an untyped mapping's key


def _where(model: Any, loc: tuple) -> tuple[str, Any, Any]:
    """(path as the user writes it, the record owning the last key, the annotation at `loc`)."""
    t, owner, path = model, None, ""
    for part in loc:
        if any(_is_model(m) for m in _members(t)):
            owner = next(m for m in _members(t) if _is_model(m))
        t, written = _step(t, part)
        if not written:
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path, owner, t


def _options(t: Any) -> tuple | None:
    opts = [a for m in _members(t) if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
    return tuple(opts) or None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(err: dict, model: Any, prefix: str) -> tuple[str, str]:
    """(path, sentence) for one pydantic error dict."""
    path, owner, t = _where(model, tuple(err["loc"]))
    path = ".".join(p for p in (prefix, path) if p).replace(".[", "[")
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        fields = list(owner.model_fields) if owner is not None else []
        key = str(err["loc"][-1])
        valid = f"; valid fields: {', '.join(fields)}" if fields else ""
        return path, f"{path}: unknown field{did_you_mean(key, fields)}{valid}"
    if kind == "missing":
        return path, f"{path}: required field is missing"
    msg = err["msg"]
    for tag in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(tag)
    if kind in ("literal_error", "enum") and _options(t):
        return path, f"{path}={_shown(value)} {choice_reason(value, _options(t))}"
    if not err["loc"]:
        # A rule over several fields (a model validator): its message names the fields itself.
        return path, msg if not prefix or msg.startswith((f"{prefix}.", f"{prefix}:")) else f"{prefix}: {msg}"
    if re.match(r"[A-Za-z_][\w.]*(=|: )", msg):
        return path, f"{path}: {msg}"                       # a rule over this block's fields names them itself
    subject = path if isinstance(value, dict) else f"{path}={_shown(value)}"
    if msg.startswith(("is ", "has ", "names ")):
        return path, f"{subject} {msg}"                     # our validators give the reason only
    return path, f"{subject} is not valid: {msg[:1].lower() + msg[1:]}"


def explain(err: ValidationError, model: type[BaseModel] | None = None, *, prefix: str = "",
            limit: int | None = None) -> str:
    """A ValidationError as text: one sentence per problem, each naming the key path, the value and what is
    valid; unknown keys get the closest field of the record they were written in (at any depth).

    `model`: the record validated (its field types give the paths, suggestions and choices);
    `prefix`: the name the paths start with ("recipe" -> "recipe.lora_r=0 ..."; "" for a grid file,
    whose paths start at its top-level keys). Several problems: "N problems:" and one per line."""
    lines: list[str] = []
    merged: dict[str, int] = {}
    for e in err.errors():
        path, line = _problem(e, model, prefix)
        if path in merged and e["type"] not in ("extra_forbidden", "missing"):
            # The members of a union each reject the value: one problem, its reasons joined.
            i = merged[path]
            if line not in lines[i]:
                lines[i] += "; or " + line.split(" is not valid: ", 1)[-1]
            continue
        if line not in lines:
            merged.setdefault(path, len(lines))
            lines.append(line)
    shown = lines[:limit] if limit else lines
    more = f"\n  (+{len(lines) - len(shown)} more)" if len(shown) < len(lines) else ""
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems:\n  " + "\n  ".join(shown) + more


class Config(BaseModel):
    """Base of every settings record: frozen, no unknown fields, errors as ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)

    # The name used in error messages ("recipe", "corpus", ...); defaults to the class name.
    config_name: ClassVar[str | None] = None

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as e:
            raise ConfigError(explain(e, type(self), prefix=self._name())) from None

    # Pydantic calls a model's own __init__ while validating it as a nested block (a grid's recipe entry) unless
    # the __init__ is marked as the base one. This one only turns the error into text, so it is: nested blocks
    # then report their errors with the full key path from the outermost record (`explain`).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def _name(cls) -> str:
        return cls.config_name or cls.__name__

    @classmethod
    def validate_dict(cls, data: Any, *, prefix: str | None = None) -> "Config":
        """Validate a plain mapping (a YAML block, a result file) as this record: ConfigError via `explain`."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(explain(e, cls, prefix=cls._name() if prefix is None else prefix)) from None

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


__all__ = ["Config", "check_choice", "choice_reason", "did_you_mean", "explain"]
