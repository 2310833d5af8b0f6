"""Command-line options generated from the configuration records (core.config.Config).

A command declares which records it takes settings from, e.g.

    @config_options(Fields(Recipe, into="recipe", aliases={"learning_rate": ("--lr",)}), ...)
    def finetune(..., recipe: dict): ...

and gets one option per field: named like the field in a grid file (kebab-case:
`learning_rate` -> `--learning-rate`, with a block's prefix where a grid nests it:
`shared.chatterbot.format` -> `--chatterbot-format`), with the field's description as help, and
the values given on the command line in `recipe` as {field: value}. Options left out are absent
from the dict, so presets and the records' own defaults apply. A new field of a record is a new
option with no change here or in the command.

Values reach the record as typed (numbers as numbers where the text is one, lists split on commas,
`none` for an optional field's None, anything else as text) and the record converts and validates
them, so a bad value fails like a bad grid key: with the same sentence from `core.config.explain`,
exit 2, no traceback. Booleans are flags (`--train-on-prompt/--no-train-on-prompt`).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import typer
from pydantic import BaseModel

_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT"}


def _members(t: Any) -> tuple:
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(t) for m in _members(a))
    return (t,)


def _is_bool(t: Any) -> bool:
    return any(m is bool for m in _members(t))


def _optional(t: Any) -> bool:
    return any(m is type(None) for m in _members(t))


def _text_list(t: Any) -> bool:
    """Only a list/tuple of plain strings (or None): written comma-separated on the command line. A field that
    also takes one word (recipe targets: a choice or module names) gets the text and splits it itself."""
    members = [m for m in _members(t) if m is not type(None)]
    return bool(members) and all(typing.get_origin(m) in (list, tuple) and typing.get_args(m)[:1] == (str,)
                                 for m in members)


def _metavar(t: Any) -> str:
    members = [m for m in _members(t) if m is not type(None)]
    literal = [a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
    if literal:
        return "[" + "|".join(map(str, literal)) + "]"
    if len(members) == 1 and members[0] in _METAVARS:
        return _METAVARS[members[0]]
    if _text_list(t):
        return "A,B,..."
    return "TEXT"


@dataclass(frozen=True)
class Fields:
    """Options for the fields of one record.

    into: the command's keyword argument that receives {field: value} (several groups may share one);
    section: with it, `into` receives {section: {field: value}} instead (one argument for the settings of
      several records whose field names repeat, e.g. each data source's settings under its grid section);
    only / exclude: which fields (default: every field);
    prefix: the option-name prefix of a nested grid block ("chatterbot-");
    names: field -> option name where the grid's name would clash inside one command (recipe `dtype` is
      `--train-dtype` beside the model's `--dtype`);
    aliases: field -> further option names (older or shorter spellings: `--lr`);
    default: what an option left out means, when it is not the field's own default ("from --preset");
    defaults: the same per field;
    panel: the heading the options are listed under in --help."""

    config: type[BaseModel]
    into: str
    section: Optional[str] = None
    only: Optional[tuple[str, ...]] = None
    exclude: tuple[str, ...] = ()
    prefix: str = ""
    names: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default: Optional[str] = None
    defaults: Mapping[str, str] = field(default_factory=dict)
    panel: Optional[str] = None

    def fields(self) -> list[str]:
        names = list(self.config.model_fields) if self.only is None else list(self.only)
        unknown = [n for n in names + list(self.exclude) if n not in self.config.model_fields]
        if unknown:
            raise TypeError(f"{self.config.__name__} has no field {unknown[0]!r}")
        return [n for n in names if n not in self.exclude]

    def option(self, name: str) -> str:
        """The option's main name, e.g. '--learning-rate'."""
        return "--" + self.names.get(name, self.prefix + name.replace("_", "-"))

    def help(self, name: str) -> str:
        f = self.config.model_fields[name]
        if name in self.defaults or self.default is not None:
            default = self.defaults.get(name, self.default)
        elif f.default_factory is not None:
            default = f.default_factory()
        else:
            default = f.default
        shown = "" if default is None or default is ... else f" (default: {_plain(default)})"
        return (f.description or "") + shown

    def parameter(self, name: str) -> tuple[Any, Any]:
        """(annotation, typer.Option) of one field's option."""
        ann = self.config.model_fields[name].annotation
        main = self.option(name)
        extra = self.aliases.get(name, ())
        if _is_bool(ann):
            decls = [f"{main}/--no-{main[2:]}", *extra]
            return Optional[bool], typer.Option(None, *decls, help=self.help(name), rich_help_panel=self.panel,
                                                show_default=False)
        return Optional[str], typer.Option(None, main, *extra, help=self.help(name), metavar=_metavar(ann),
                                           rich_help_panel=self.panel, show_default=False)

    def value(self, name: str, given: Any) -> Any:
        """The command-line value as the record's input: booleans as parsed, `none` -> None for an optional
        field, comma lists split; anything else the text itself (the record converts and validates it)."""
        ann = self.config.model_fields[name].annotation
        if isinstance(given, bool):
            return given
        if _optional(ann) and given.strip().lower() == "none":
            return None
        if _text_list(ann):
            return [t.strip() for t in given.split(",") if t.strip()]
        # A number is handed over as one, so an error shows it as a grid file's would (-1, not '-1').
        for kind in (int, float):
            if any(m is kind for m in _members(ann)):
                try:
                    return kind(given)
                except ValueError:
                    continue
        return given


def _plain(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def config_options(*groups: Fields) -> Callable:
    """Decorate a Typer command so that it takes one option per field of each group (see the module doc).

    The command keeps its own parameters; for each group's `into` it receives {field: value} of the
    options given. Two options with one name fail here, when the command is defined."""

    def wrap(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        targets = {g.into for g in groups}
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                  for p in inspect.signature(fn).parameters.values() if p.name not in targets]
        taken = {d for p in params if isinstance(p.default, typer.models.OptionInfo)
                 for d in (p.default.param_decls or ())}
        generated: dict[str, tuple[Fields, str]] = {}
        for g in groups:
            for name in g.fields():
                ann, opt = g.parameter(name)
                for decl in opt.param_decls:
                    for word in decl.split("/"):
                        if word in taken:
                            raise TypeError(f"{fn.__name__}: option {word} is defined twice")
                        taken.add(word)
                pname = "__".join(p for p in (g.into, g.section, name) if p)
                generated[pname] = (g, name)
                params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))

        @functools.wraps(fn)
        def command(**kw):
            values: dict[str, dict] = {t: {} for t in targets}
            for pname, (g, name) in generated.items():
                given = kw.pop(pname)
                if given is not None:
                    into = values[g.into] if g.section is None else values[g.into].setdefault(g.section, {})
                    into[name] = g.value(name, given)
            return fn(**kw, **values)

        command.__signature__ = inspect.Signature(params, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.option_groups = groups
        return command

    return wrap


def option_of(groups: tuple[Fields, ...], into: str, name: str) -> str:
    """The option name a field of `into` has in a command (for messages that name what the user typed)."""
    return next(g.option(name) for g in groups if g.into == into and name in g.fields())


__all__ = ["Fields", "config_options", "option_of"]
