"""Reading edit-data files record by record, shared by the CounterFact and zsRE loaders.

Files are JSON lists or JSONL; field helpers turn a bad field into a `Rejection`
naming the record and the field instead of raising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from editdecay.core.errors import DataError
from editdecay.data.common import Rejection


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that does not parse; the loader rejects it as a record."""

    line: int      # 1-based line number in the file
    error: str


def read_records(path: str | Path) -> list:
    """The raw records of a JSON list file or a JSON Lines file.

    JSON Lines is recognised by a `.jsonl` suffix, or by content: a file whose
    first value parses but is followed by more values. In JSON Lines, blank lines
    are skipped and a line that does not parse becomes a `BadLine` (so it is
    rejected under its record index instead of failing the whole file).
    Raises DataError naming the path if the file is missing, not UTF-8, not JSON,
    or not a list.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")   # a BOM is tolerated
    except FileNotFoundError:
        raise DataError(f"{p}: no such file; give a JSON list of records or a JSONL file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot be read as UTF-8 text ({e})") from None
    if p.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":   # "Extra data": one value parsed and more follow -> JSON Lines
                raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                "expected a JSON list of records or JSON Lines (one record per line)") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of records, got a JSON {_kind(data)}; "
                                "a file with one record per line must be JSON Lines (.jsonl)")
            return data
    return _json_lines(p, text)


def _json_lines(p: Path, text: str) -> list:
    out: list = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            out.append(BadLine(n, f"{e.msg} at column {e.colno}"))
    if out and all(isinstance(r, BadLine) for r in out):
        raise DataError(f"{p}: not valid JSON Lines: no line parses as JSON (line {out[0].line}: {out[0].error})")
    return out


def _kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


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
