"""Reading text and JSON files into documents and records: one set of rules for every reader.

Used by the statistics corpus (data/corpus.py), fine-tuning text and instruction files
(data/instructions.py), edit-data files (data/records.py) and perplexity corpora
(measure/downstream/perplexity.py), so a file means the same thing wherever it is given.

Rules:
- a file is a regular file of at most `core.files.MAX_DATA_BYTES`, UTF-8 (a byte-order mark is tolerated);
  reading is `core.files`', so a symlink to /dev/zero or a UTF-16 file is refused by name;
- plain-text documents are separated by blank lines, and a line holding only whitespace is
  blank; a document's lines are kept as written (not stripped); empty documents do not exist;
- a document (or a JSON Lines line) longer than `MAX_DOCUMENT_CHARS` characters is an error naming its line:
  tokenising megabytes of text in one piece is never what was meant (documents are separated by blank lines);
- JSON Lines: blank lines are skipped; a line that does not parse is a `BadLine` carrying its
  line number, which the caller rejects as a record or raises on (`strict_rows`);
- a `.json` file holds a JSON list; a `.jsonl` suffix, or content with one value followed by
  more, means JSON Lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from editdecay.core import files
from editdecay.core.errors import DataError

MAX_DOCUMENT_CHARS = 1_000_000     # one document or record line; a training example is cut at cutoff_len tokens


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that does not parse; loaders reject it as a record (or raise, `strict_rows`)."""

    line: int      # 1-based line number in the file
    error: str


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path` (`core.files.read_text` with the data limit). Raises DataError naming `what` and
    the path if it is missing, not a regular file, too large or not UTF-8."""
    return files.read_text(path, what, limit=files.MAX_DATA_BYTES, error=DataError)


def _check_length(text: str, where: str, line: int) -> None:
    if len(text) > MAX_DOCUMENT_CHARS:
        raise DataError(f"{where}: the document at line {line} is {len(text):,} characters long, more than "
                        f"{MAX_DOCUMENT_CHARS:,}; separate documents by blank lines (a text) or give one record "
                        f"per line (JSON Lines)")


def iter_documents(lines: Iterable[str], where: str = "text") -> Iterator[str]:
    """Documents of plain text given line by line: runs of non-blank lines, joined by newlines, kept as written
    (a document's text is the same whether it comes from a .txt, .jsonl or .parquet file). DataError naming
    `where` and the line for a document longer than MAX_DOCUMENT_CHARS."""
    doc: list[str] = []
    size, start = 0, 0
    for n, line in enumerate(lines, start=1):
        if line.strip():
            if not doc:
                start = n
            doc.append(line.rstrip("\r\n"))
            size += len(line)
            if size > MAX_DOCUMENT_CHARS:
                _check_length("\n".join(doc), where, start)
        elif doc:
            yield "\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n".join(doc)


def split_documents(text: str, where: str = "text") -> list[str]:
    """Documents of a plain text (see module rules)."""
    return list(iter_documents(text.splitlines(), where))


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed value or BadLine) for each non-blank line."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line) > MAX_DOCUMENT_CHARS:
            yield n, BadLine(n, f"the line is {len(line):,} characters long, more than {MAX_DOCUMENT_CHARS:,}")
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, BadLine(n, f"{e.msg} at column {e.colno}")
        except RecursionError:
            yield n, BadLine(n, "nests arrays or objects too deeply to be read")


json_kind = files.json_type       # 'object', 'list', 'string', ...: the JSON name of a parsed value's type


def read_records(path: str | Path, what: str = "file") -> list:
    """The raw records of a JSON list file or a JSON Lines file (a JSONL line that does not parse is a BadLine).

    Raises DataError naming the path if the file is missing, not UTF-8, not JSON, not a list, or a JSON Lines
    file none of whose lines parses.
    """
    p = Path(path)
    text = read_text(p, what)
    if p.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":   # "Extra data": one value parsed and more follow -> JSON Lines
                raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                "expected a JSON list of records or JSON Lines (one record per line)") from None
        except RecursionError:
            raise DataError(f"{p}: nests JSON arrays or objects too deeply to be read") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of records, got a JSON {json_kind(data)}; "
                                "a file with one record per line must be JSON Lines (.jsonl)")
            return data
    out = [value for _, value in json_lines(text.splitlines())]
    if out and all(isinstance(r, BadLine) for r in out):
        raise DataError(f"{p}: not valid JSON Lines: no line parses as JSON (line {out[0].line}: {out[0].error})")
    return out


def strict_rows(rows: list, path: str | Path) -> list:
    """`rows` unchanged if none is a BadLine; otherwise DataError naming the path and the first bad line."""
    bad = next((r for r in rows if isinstance(r, BadLine)), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad.line} is not valid JSON: {bad.error}")
    return rows


__all__ = ["BadLine", "iter_documents", "json_kind", "json_lines", "read_records", "read_text", "split_documents", "strict_rows"]
