"""The data-source registry: every `kind[:argument]` data spec is parsed and loaded here.

The sources (data/source.py says what one declares), one line each; the module is imported the first time
a spec is parsed, so `import editdecay.data` stays light:

    worldfacts                      edit     the project's own fact edits (data/worldfacts.py)
    counterfact:PATH (mcf, ...)     edit     CounterFact / MultiCounterFact files (data/counterfact.py)
    zsre:PATH                       edit     zsRE in MEND's schema (data/zsre.py)
    embedded                        fine-tuning data and held-out task: the generated task (data/embedded_task.py)
    chatterbot[:DIR]                fine-tuning data and held-out task: human-written Q/A (data/chatterbot.py)
    instructions:PATH, text:PATH,   fine-tuning data (data/instructions.py)
    hf:NAME[:SPLIT]

`register` and `unregister` add and remove a source at run time (a plug-in, or a test's toy source).
`parse_spec` checks a spec against the sources; `split_spec` (data/source.py) is the one place a spec
string is split at its first ':'.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping

from pydantic import Field

from editdecay.core.config import Config, did_you_mean
from editdecay.core.errors import ConfigError, DataError
from editdecay.data.common import EditDataset, UnusableRecords
from editdecay.data.source import (
    EDIT,
    FINETUNE,
    HELD_OUT,
    ROLE_NAMES,
    ROLES,
    DataSource,
    DataSpec,
    EditOptions,
    HeldOutTask,
    finish_source,
    split_spec,
)

# The built-in sources: "module:class", one line per source.
BUILTIN = (
    "editdecay.data.worldfacts:WorldFacts",
    "editdecay.data.counterfact:CounterFact",
    "editdecay.data.zsre:Zsre",
    "editdecay.data.embedded_task:EmbeddedTaskSource",
    "editdecay.data.chatterbot:Chatterbot",
    "editdecay.data.instructions:InstructionFile",
    "editdecay.data.instructions:TextFile",
    "editdecay.data.instructions:HubDataset",
)

_sources: dict[str, DataSource] = {}        # prefix -> source, in registration order
_aliases: dict[str, str] = {}               # alias -> prefix


def _registry() -> dict[str, DataSource]:
    if not _sources:
        for entry in BUILTIN:
            module, name = split_spec(entry)
            _add(getattr(importlib.import_module(module), name)())
    return _sources


def register(source: DataSource) -> DataSource:
    """Add a source (after the built-ins, which it cannot shadow). Raises ConfigError if its prefix or an alias
    is taken or a role is unknown."""
    _registry()
    return _add(source)


def _add(source: DataSource) -> DataSource:
    names = (source.prefix, *source.aliases)
    taken = [n for n in names if n in _sources or n in _aliases]
    if taken:
        raise ConfigError(f"data source {source.prefix!r}: the name {taken[0]!r} is registered already")
    bad = [r for r in source.roles if r not in ROLES]
    if bad or not source.roles:
        raise ConfigError(f"data source {source.prefix!r}: roles {list(source.roles)}; use some of {', '.join(ROLES)}")
    _sources[source.prefix] = source
    _aliases.update({a: source.prefix for a in source.aliases})
    return source


def unregister(prefix: str) -> None:
    """Remove a source added by `register` (and its aliases)."""
    source = _registry().pop(prefix)
    for alias in source.aliases:
        _aliases.pop(alias, None)


def sources(role: str | None = None) -> tuple[DataSource, ...]:
    """The registered sources (that play `role`), in registration order."""
    return tuple(s for s in _registry().values() if role is None or role in s.roles)


def sources_with_settings() -> dict[str, DataSource]:
    """The sources with settings of their own (data/source.py `settings`), by their `settings_key`."""
    return {s.settings_key: s for s in sources() if s.settings is not None and s.settings_key}


def names(role: str | None = None) -> tuple[str, ...]:
    """Prefixes and aliases of the sources that play `role`: every first word a spec may start with."""
    return tuple(n for s in sources(role) for n in (s.prefix, *s.aliases))


def usage(role: str | None = None) -> str:
    """'worldfacts | counterfact:PATH | zsre:PATH' for help texts and errors."""
    return " | ".join(s.usage() for s in sources(role))


def source_of(spec: str | DataSpec) -> DataSource:
    """The source a spec (or its kind) names; ConfigError with the valid names otherwise."""
    kind = spec.kind if isinstance(spec, DataSpec) else split_spec(spec)[0]
    registry = _registry()
    prefix = _aliases.get(kind, kind)
    if prefix not in registry:
        raise ConfigError(f"data {str(spec)!r}: unknown source {kind!r}{did_you_mean(kind, names())}; use one of: "
                          f"{usage()}")
    return registry[prefix]


def parse_spec(text: str, role: str | None = None) -> DataSpec:
    """Parse and check a data spec (syntax only; no file is read). `role`: the source must play it.

    Raises ConfigError naming the spec, e.g. "data 'zsre': give a path after the prefix, e.g. zsre:/path/to/file.json",
    "unknown source 'counterfac' (did you mean 'counterfact'?)" or "'text:a.txt' is not edit data; use one of ...".
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"data {text!r} is not a data spec; use one of: {usage(role)}")
    text = text.strip()
    kind, argument = split_spec(text)
    if role is not None and kind not in names(role):
        if kind in names():
            raise ConfigError(f"data {text!r}: {kind} is not {ROLE_NAMES[role]}; {ROLE_NAMES[role]} is one of: "
                              f"{usage(role)}")
        raise ConfigError(f"data {text!r}: unknown source {kind!r}{did_you_mean(kind, names(role))}; "
                          f"{ROLE_NAMES[role]} is one of: {usage(role)}")
    source = source_of(kind)
    spec = DataSpec(source.prefix, argument, text)
    source.check(spec)
    return spec


def resolve_paths(text: str, base: Path) -> str:
    """The spec with a local path argument made absolute (relative to `base`, the grid file's directory)."""
    spec = parse_spec(text)
    source = source_of(spec)
    if not (source.local_path and spec.argument):
        return text
    path = Path(spec.argument).expanduser()
    kind = split_spec(text)[0]
    return f"{kind}:{path if path.is_absolute() else (base / path).resolve()}"


def digest(text: str) -> str | None:
    """Content hash of the data behind a spec (`DataSource.digest`): part of grid stage ids."""
    spec = parse_spec(text)
    return source_of(spec).digest(spec)


def check_digest(text: str, planned: str | None) -> None:
    """Raise DataError if the data behind `text` changed since it was hashed as `planned` (stale stage ids)."""
    now = digest(text)
    if planned is not None and now != planned:
        raise DataError(f"data {text!r} changed since this grid was planned (content {planned} -> {now}); run "
                        f"`editdecay grid run` again: it plans anew and computes the stages of the new data")


def labels(specs: Iterable[str]) -> dict[str, str]:
    """Short names of specs for cell labels: each source's label, or 'kind-<file stem>' where several specs of
    one kind need telling apart."""
    parsed = {text: parse_spec(text) for text in dict.fromkeys(specs)}
    kinds = [p.kind for p in parsed.values()]
    out = {}
    for text, spec in parsed.items():
        if kinds.count(spec.kind) == 1 or not spec.argument:
            out[text] = source_of(spec).label(spec)
        else:
            out[text] = f"{spec.kind}-{Path(spec.argument).stem}"
    return out


# --------------------------------------------------------------------------- loading


def load_edit_data(spec: str, *, zsre_target: str = "answers", strict: bool = False,
                   limit: int | None = None, seed: int | None = None, field: str = "limit") -> EditDataset:
    """Load and validate edit requests.

    `limit` keeps the first `limit` requests, or a seeded random sample when `seed`
    is given (the same seed always gives the same sample); more than the data has is a ConfigError naming
    `field` (`subset`).
    """
    parsed = parse_spec(spec, EDIT)
    try:
        ds = source_of(parsed).edit_data(parsed, EditOptions(strict=strict, zsre_target=zsre_target))
    except UnusableRecords as e:
        raise UnusableRecords(f"{e}{_made_for(parsed)}") from None
    return subset(ds, limit, seed, field=field)


def _made_for(parsed: DataSpec) -> str:
    """'\nthe file loads with `zsre:PATH`: ...' when a file that gave no usable record is read by another
    file loader (edit data or fine-tuning records), else ''. Tried only once a loader has failed."""
    if not source_of(parsed).local_path:
        return ""
    for s in sources():
        if s.prefix == parsed.kind or not s.local_path or s.argument != "PATH" or s.accepts_any_file:
            continue
        other = DataSpec(s.prefix, parsed.argument, f"{s.prefix}:{parsed.argument}")
        try:
            if EDIT in s.roles:
                s.edit_data(other, EditOptions())
            elif FINETUNE in s.roles:
                s.training_data(other)
            else:
                continue
        except Exception:  # noqa: BLE001 -- any failure: not this loader's format either
            continue
        role = "edit data" if EDIT in s.roles else "fine-tuning records"
        return (f"\nthe file looks made for another loader: it reads as {role} with `{other.text}`; did you mean "
                f"that?")
    return ""


class EditSelection(Config):
    """Which edit requests: a data spec, how many of its usable records (the first `n`, or a seeded sample of `n`
    with `seed`) and how records are read. With `digest` (the data's content hash when a grid was planned) a
    changed file is refused before it is read."""

    config_name: ClassVar[str] = "requests"

    data: str = Field(description="edit data spec: worldfacts | counterfact:PATH | zsre:PATH | ... (data/sources.py)")
    n: int | None = Field(None, ge=1, description="requests used (None: every usable record)")
    seed: int | None = Field(None, description="seed of the sample of n requests (None: the first n)")
    zsre_target: Literal["answers", "alt"] = Field("answers", description="zsRE edit target (docs/METHODS.md E6)")
    strict: bool = Field(False, description="a rejected record is an error instead of being skipped")
    digest: str | None = Field(None, description="content hash of the data when planned (None: not checked)")

    def load(self) -> EditDataset:
        """The selected requests (DataError if the data changed since `digest`, or with `strict` and a rejection)."""
        if self.digest is not None:
            check_digest(self.data, self.digest)
        return load_edit_data(self.data, zsre_target=self.zsre_target, strict=self.strict, limit=self.n, field="n",
                              seed=self.seed)


def subset(ds: EditDataset, limit: int | None, seed: int | None, *, field: str = "limit") -> EditDataset:
    """The first `limit` requests of `ds`, or a seeded sample of `limit` with `seed`; every request with None.

    A count the data cannot give is an error, never silently shortened: a result whose configuration says
    100,000 edits must hold 100,000 (ConfigError naming `field`, the value, the data and how many it has; also
    for `limit` < 1)."""
    if limit is None:
        return ds
    given = f"{field} {limit!r}" if field.startswith("--") else f"{field}={limit!r}"     # as the user wrote it
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{given} is not a number of requests: give a whole number >= 1, or none to use every "
                          f"usable record")
    if limit > len(ds.requests):
        rejected = f" ({ds.rejected_records} of its {ds.n_records} records rejected)" if ds.rejected_records else ""
        raise ConfigError(f"{given} asks for more requests than {ds.name} has: {len(ds.requests)} usable"
                          f"{rejected}; give {field} <= {len(ds.requests)}, or none to use every one")
    if limit == len(ds.requests):
        return ds
    reqs = list(ds.requests)
    if seed is not None:
        reqs = random.Random(seed).sample(reqs, limit)
    else:
        reqs = reqs[:limit]
    opts = dict(ds.options, limit=limit, seed=seed)
    return EditDataset(ds.name, tuple(reqs), ds.n_records, ds.rejected, opts, ds.rejected_records)


def load_source(spec: str, *, task: HeldOutTask | None = None):
    """Fine-tuning data: parse a spec and load its records (the training split where the source has a held-out
    one). `task`: the source's held-out task object (`EmbeddedTask`, `ChatterbotCorpus`; default: built with
    default settings). The result's identity (recorded in results) names the source, its licence and counts."""
    parsed = parse_spec(spec, FINETUNE)
    try:
        return finish_source(source_of(parsed).training_data(parsed, task))
    except UnusableRecords as e:
        raise UnusableRecords(f"{e}{_made_for(parsed)}") from None


def held_out_task(spec: str, settings: Mapping[str, Any] | None = None) -> HeldOutTask:
    """The held-out task a spec names (`embedded`, `chatterbot[:DIR]`), built with its settings."""
    parsed = parse_spec(spec, HELD_OUT)
    return source_of(parsed).task(parsed, settings)


def held_out_names() -> dict[str, str]:
    """Held-out task name (as results record it, e.g. 'chatterbot-choice') -> its headline metric."""
    return {name: metric for s in sources(HELD_OUT) for name, metric in s.task_names.items()}


__all__ = ["BUILTIN", "EditSelection", "check_digest", "digest", "held_out_names", "held_out_task", "labels",
           "load_edit_data", "load_source", "names", "parse_spec", "register", "resolve_paths", "source_of", "sources",
           "sources_with_settings", "split_spec", "subset", "unregister", "usage"]
