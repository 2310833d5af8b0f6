"""Reading edit-data files record by record, shared by the CounterFact and zsRE loaders.

Files are JSON lists or JSONL; field helpers turn a bad field into a `Rejection`
naming the record and the field instead of raising.
"""

from __future__ import annotations

from editdecay.data.common import Rejection
from editdecay.data.documents import BadLine
from editdecay.data.documents import json_kind as _kind

# A prompt, subject or target is a sentence; a field this long is a broken file, and tokenising megabytes of one
# string aborts the tokenizer (a Rust panic ends the process) instead of raising.
MAX_TEXT_CHARS = 20_000


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def record_problem(index: int, rec) -> Rejection | None:
    """A rejection if `rec` is an unparsed line or not a JSON object, else None."""
    if isinstance(rec, BadLine):
        return Rejection(index, "record", f"line {rec.line} is not valid JSON: {rec.error}")
    if not isinstance(rec, dict):
        return Rejection(index, "record", f"expected a JSON object, got a {_kind(rec)}: {_show(rec)}")
    return None


def text_field(container: dict, key: str, name: str, index: int, out: list[Rejection], *,
               required: bool = True) -> str | None:
    """`container[key]` if it is a non-blank string; otherwise record a rejection named `name`.

    An optional field that is absent or null gives None without a rejection.
    """
    if key not in container or (not required and container[key] is None):
        if required:
            out.append(Rejection(index, name, "missing"))
        return None
    v = container[key]
    if not isinstance(v, str):
        out.append(Rejection(index, name, f"expected a string, got a {_kind(v)}: {_show(v)}"))
        return None
    if not v.strip():
        out.append(Rejection(index, name, f"empty ({v!r})"))
        return None
    if len(v) > MAX_TEXT_CHARS:
        out.append(Rejection(index, name, f"{len(v):,} characters long, more than the {MAX_TEXT_CHARS:,} a prompt or "
                                          f"target may have: {_show(v)}"))
        return None
    return v


def text_list(container: dict, key: str, name: str, index: int, out: list[Rejection], *,
              required: bool = True) -> tuple[str, ...] | None:
    """`container[key]` as a tuple of non-blank strings; every bad element is named `name[i]`."""
    if key not in container or (not required and container[key] is None):
        if required:
            out.append(Rejection(index, name, "missing (use [] for none)"))
        return None if required else ()
    v = container[key]
    if not isinstance(v, list):
        out.append(Rejection(index, name, f"expected a list of strings, got a {_kind(v)}: {_show(v)}"))
        return None
    before = len(out)
    for i, x in enumerate(v):
        text_field({"x": x}, "x", f"{name}[{i}]", index, out)
    return tuple(v) if len(out) == before else None
