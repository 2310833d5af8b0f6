"""What a data source is: the `kind[:argument]` spec users write, and the base class of every source.

A data source is the one place that knows everything about one kind of data: its prefix (and aliases),
what may follow the prefix, the roles it plays (edit requests, fine-tuning data, a held-out task scored
while fine-tuning), its licence, how it loads, the content hash that goes into grid stage ids, its short
label in cell names and, for a source with a held-out split, the task object scored on it. Every source
derives from `DataSource` in its own module and is registered by one line in `data/sources.py`.
`split_spec` is the one place a spec string is split at its first ':' (data sources, downstream tasks such
as `local:DIR`, statistics corpora such as `hf:NAME:CONFIG`).

Nothing here imports torch or reads a file: a grid file is validated against the registered sources in
milliseconds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol

from editdecay.core.errors import ConfigError, DataError
from editdecay.data.common import EditDataset
from editdecay.data.prompts import InstructionRecord

EDIT, FINETUNE, HELD_OUT = "edit", "finetune", "held_out"
ROLES = (EDIT, FINETUNE, HELD_OUT)
ROLE_NAMES = {EDIT: "edit data", FINETUNE: "fine-tuning data", HELD_OUT: "held-out task"}


def split_spec(text: str) -> tuple[str, str]:
    """'kind:rest' -> ('kind', 'rest'); 'kind' -> ('kind', '')."""
    kind, _, rest = str(text).partition(":")
    return kind, rest


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: `kind` is the source's prefix (an alias already mapped to it), `argument` what
    follows the first ':' ('' when nothing does), `text` the spec as written (what results record)."""

    kind: str
    argument: str
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class EditOptions:
    """How edit records are read: `strict` turns any rejected record into a DataError; `zsre_target` picks
    zsRE's edit target ("answers" or "alt"; docs/METHODS.md E6), ignored by the other sources."""

    strict: bool = False
    zsre_target: str = "answers"


@dataclass(frozen=True)
class Source:
    """Fine-tuning data as loaded, before tokenisation (data/instructions.py `tokenize`). Exactly one of
    `records` (instruction records) and `texts` (plain documents, every token trained) is set; `identity` is
    what results record about it (spec, name, licence, counts, content hashes)."""

    spec: str
    kind: str                                   # the source's prefix
    records: tuple[InstructionRecord, ...] = ()
    texts: tuple[str, ...] = ()
    identity: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.records) or len(self.texts)


def finish_source(src: Source) -> Source:
    """A loaded source checked to be non-empty, with its record count in the identity."""
    if src.n == 0:
        raise DataError(f"data {src.spec!r}: the dataset is empty (0 records); give a file with at least one record")
    return Source(src.spec, src.kind, src.records, src.texts, {**src.identity, "n_records": src.n})


class HeldOutTask(Protocol):
    """A task with a held-out split scored during fine-tuning (measure/task.py): the training split may be the
    fine-tuning data, the test split is never trained on. `identity()` holds at least its `name`."""

    @property
    def name(self) -> str: ...
    def records(self) -> tuple[tuple[InstructionRecord, ...], tuple[InstructionRecord, ...]]: ...
    def identity(self) -> dict: ...


class DataSource:
    """Base class of a data source. A subclass sets the class attributes and implements the loader of each
    role it plays; everything else has a default that fits a source reading one local file."""

    prefix: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    roles: ClassVar[tuple[str, ...]]                     # subset of ROLES
    description: ClassVar[str]                          # one line for help texts and the documentation
    licence: ClassVar[str | None] = None                # None: the licence of the file or dataset the user gives
    argument: ClassVar[str | None] = None               # what follows 'prefix:', e.g. "PATH"; None: nothing may
    argument_required: ClassVar[bool] = True            # with an argument: is it optional ('chatterbot[:DIR]')?
    local_path: ClassVar[bool] = False                  # the argument is a local file or directory (a grid resolves
                                                        # it against the grid file's directory)
    accepts_any_file: ClassVar[bool] = False            # True: every readable file loads (plain text), so a file
                                                        # loading says nothing of what it was made for
    offline: ClassVar[bool] = True                      # False: read over the network (left to the stage that needs it)
    settings_key: ClassVar[str | None] = None           # the grid's `shared.<key>` section holding its settings
    settings: ClassVar[type | None] = None              # the record of those settings (a core.config.Config): the
                                                        # grid's section and `editdecay finetune`'s options
    option_aliases: ClassVar[Mapping[str, tuple[str, ...]]] = {}   # settings field -> older option names
    task_names: ClassVar[Mapping[str, str]] = {}        # held-out task name (as results record it) -> headline metric

    # ------------------------------------------------------------------ the spec

    def usage(self) -> str:
        """How the spec is written, e.g. 'counterfact:PATH' or 'chatterbot[:DIR]'."""
        if self.argument is None:
            return self.prefix
        return f"{self.prefix}:{self.argument}" if self.argument_required else f"{self.prefix}[:{self.argument}]"

    def check(self, spec: DataSpec) -> None:
        """Syntax of the argument (no file is read). Raises ConfigError naming the spec and the usage."""
        if self.argument is None and spec.argument:
            raise ConfigError(f"data {spec.text!r}: {self.prefix} takes nothing after the prefix; write "
                              f"{self.prefix!r}")
        if self.argument is not None and self.argument_required and not spec.argument.strip():
            what = {"PATH": "a file", "DIR": "a directory"}.get(self.argument, self.argument)
            example = "path/to/file.json" if self.argument == "PATH" else self.argument.lower()
            raise ConfigError(f"data {spec.text!r}: give {what} after the prefix, e.g. {self.prefix}:{example}")

    def path(self, spec: DataSpec) -> Path:
        """The local file or directory of a `local_path` argument."""
        return Path(spec.argument).expanduser()

    # ------------------------------------------------------------------ identity

    def digest(self, spec: DataSpec) -> str | None:
        """Content hash of the data behind `spec` (16 hex digits), part of the ids of the grid stages that read it:
        edited data names new stages, never a silent mix. Default: the bytes of a local file (or of every file
        under a directory); "missing" when it does not exist yet (a grid may be planned before its data is
        downloaded); None for data named by its spec alone (generated, hub)."""
        if not (self.local_path and spec.argument):
            return None
        return path_digest(self.path(spec))

    def label(self, spec: DataSpec) -> str:
        """Short name of the spec in cell labels, when it is the only spec of its kind in a grid."""
        return Path(spec.argument).stem if spec.argument and self.local_path else self.prefix

    # ------------------------------------------------------------------ loading, per role

    def edit_data(self, spec: DataSpec, options: EditOptions) -> EditDataset:
        """Edit requests (role `edit`), every record kept or rejected by index and field."""
        raise ConfigError(f"data {spec.text!r}: {self.prefix} is not an edit data source")

    def training_data(self, spec: DataSpec, task: HeldOutTask | None) -> Source:
        """Fine-tuning records or texts (role `finetune`); `task`: this source's held-out task object, whose
        training split a source with one trains on (None: built with default settings)."""
        raise ConfigError(f"data {spec.text!r}: {self.prefix} is not a fine-tuning data source")

    def task(self, spec: DataSpec, settings: Mapping[str, Any] | None = None) -> HeldOutTask:
        """The held-out task (role `held_out`) with its settings (the grid's `shared.<settings_key>`)."""
        raise ConfigError(f"data {spec.text!r}: {self.prefix} has no held-out split to score")


def path_digest(path: Path) -> str:
    """16 hex digits of a file's bytes, or of the relative names and bytes of every file under a directory;
    "missing" when neither exists."""
    if path.is_file():
        from editdecay.core.cache import sha256_file

        return sha256_file(path)[:16]
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for p in sorted(x for x in path.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
        h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


__all__ = ["DataSource", "DataSpec", "EDIT", "EditOptions", "FINETUNE", "HELD_OUT", "HeldOutTask", "ROLES",
           "ROLE_NAMES", "Source", "finish_source", "path_digest", "split_spec"]
