"""Reading the files a user or a results directory hands us: one set of limits, one wording (torch-free).

Every JSON, YAML and text file editdecay reads that it did not just write itself goes through
here: grid files, data files, patch directories, results directories, model configs. A
results directory is data that anyone may have copied, truncated or tampered with, so:

- only regular files are read: a symlink to /dev/zero, a FIFO or a directory is refused by
  name before a byte is read (reading /dev/zero never ends; opening a FIFO blocks), and the
  check is made on the opened file (`fstat`), so a path swapped meanwhile is caught too;
- every read is bounded: a file larger than its kind's limit (`*_BYTES` below) is refused
  with its size and the limit, never read into memory first;
- text is UTF-8 (a byte-order mark is tolerated); UTF-16/32 text is named as such;
- JSON that does not parse, nests too deeply for the parser (RecursionError) or is not valid
  text becomes one error naming the file and where it breaks;
- YAML aliases that expand beyond `MAX_YAML_NODES` nodes (an "alias bomb": eight levels of
  ten aliases are 10^8 nodes in a 1 KB file) are refused before anything is built.

Errors are the caller's `error` class (an `EditDecayError`: ConfigError for settings and results,
DataError for data), so the CLI prints them with exit code 2 and no traceback.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from pathlib import Path
from typing import Any

from editdecay.core.errors import ConfigError

# Limits by kind of file. Results and patch metadata of the largest studies (10,000 edits x 4 models per cell)
# are tens of MB; data files such as the full CounterFact (~22k records) or Commonsense170K are ~100 MB.
MAX_DATA_BYTES = 4 << 30           # data files: edit data, fine-tuning records and texts, corpora
MAX_RESULT_BYTES = 512 << 20       # result.json, plan.json, patch.json, outcomes
MAX_RECORD_BYTES = 16 << 20        # small bookkeeping records: manifests, holders, failures, markers, configs
MAX_GRID_BYTES = 16 << 20          # a grid file (they are a few KB)
MAX_YAML_NODES = 1_000_000         # YAML nodes after alias expansion (a grid file has hundreds)

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _kind(mode: int) -> str | None:
    """'a directory', 'a character device', ... for a non-regular file; None for a regular one."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def path_problem(path: str | Path) -> str | None:
    """What keeps `path` from being read as a file, as the end of a sentence ('does not exist', 'is a directory,
    not a file', 'is a character device, not a regular file', ...), or None when it is a readable regular file."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of its path is a file, not a directory)"
    except PermissionError:
        return "cannot be read (permission denied)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    kind = _kind(st.st_mode)
    if kind == "a directory":
        return "is a directory, not a file"
    if kind is not None:
        return f"is {kind}, not a regular file"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def check_file(path: str | Path, what: str, *, error: type[Exception] = ConfigError) -> Path:
    """`path` if it is a readable regular file; otherwise `error` naming `what`, the path and what is wrong."""
    problem = path_problem(path)
    if problem is not None:
        raise error(f"{what} {str(path)!r} {problem}")
    return Path(path)


def read_bytes(path: str | Path, what: str, *, limit: int, error: type[Exception] = ConfigError) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; `error` naming `what` and the path when it is
    missing, not a regular file, unreadable or larger than `limit` (the size and the limit are given)."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer; on a regular file it changes nothing.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise error(f"{what} {str(p)!r} {path_problem(p) or 'cannot be opened'}") from None
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind is not None:
            raise error(f"{what} {str(p)!r} is {kind}, not a regular file"
                        + ("" if kind == "a directory" else "; editdecay reads regular files only"))
        if st.st_size > limit:
            raise error(f"{what} {str(p)!r} is {_size(st.st_size)}, more than the {_size(limit)} such a file may "
                        f"hold; is it the right file?")
        chunks, left = [], limit + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 24))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
    except OSError as e:
        raise error(f"{what} {str(p)!r} cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:           # grew while being read
        raise error(f"{what} {str(p)!r} holds more than the {_size(limit)} such a file may hold")
    return data


def decode_text(data: bytes, where: str, *, error: type[Exception] = ConfigError) -> str:
    """UTF-8 text of `data` (a UTF-8 byte-order mark is dropped); UTF-16/32 or undecodable bytes -> `error`."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise error(f"{where} is {name} text; editdecay reads UTF-8: save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); save it as "
                    f"UTF-8") from None


def read_text(path: str | Path, what: str, *, limit: int, error: type[Exception] = ConfigError) -> str:
    """`read_bytes` decoded as UTF-8 (`decode_text`)."""
    return decode_text(read_bytes(path, what, limit=limit, error=error), f"{what} {str(path)!r}", error=error)


def parse_json(text: str | bytes, where: str, *, error: type[Exception] = ConfigError) -> Any:
    """The JSON value of `text`; `error` naming `where` and the line and column where it breaks (a truncated file
    ends early), or that it nests too deeply to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # A truncated file breaks where the text ends, or in a string that never closes before it ends.
        ends = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        cut = " (the text ends before the JSON does: the file is cut short)" if ends else ""
        raise error(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}") from None
    except RecursionError:
        raise error(f"{where} nests JSON arrays or objects too deeply to be read") from None
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text ({e.reason})") from None


def read_json(path: str | Path, what: str, *, limit: int = MAX_RESULT_BYTES,
              error: type[Exception] = ConfigError, expect: type | None = None) -> Any:
    """The JSON value in the regular file `path` (at most `limit` bytes, UTF-8); with `expect` (dict or list) a
    value of another JSON type is an `error` too. Every failure names `what` and the path."""
    where = f"{what} {str(path)!r}"
    value = parse_json(read_text(path, what, limit=limit, error=error), where, error=error)
    if expect is not None and not isinstance(value, expect):
        want = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise error(f"{where} holds a JSON {json_type(value)}, not {want}")
    return value


def json_or_none(path: str | Path, *, limit: int = MAX_RECORD_BYTES, expect: type | None = dict) -> Any:
    """`read_json` for bookkeeping records that may be absent or cut short by a kill (holder, failure, attempt
    records, manifests): the value, or None when the file is missing, not a regular file, too large, not JSON, or
    (with `expect`) of another type. Never raises for the file's content."""
    try:
        return read_json(path, "record", limit=limit, expect=expect)
    except ConfigError:
        return None


def json_type(x: Any) -> str:
    """'object', 'list', 'string', ... : the JSON name of a parsed value's type, for messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if isinstance(x, (int, float)) else type(x).__name__)


# --------------------------------------------------------------------------- YAML


def parse_yaml(text: str, where: str, *, error: type[Exception] = ConfigError, max_nodes: int = MAX_YAML_NODES) -> Any:
    """The value of a YAML document (safe types only); `error` naming `where` if it is not valid YAML or if its
    aliases expand to more than `max_nodes` nodes (an alias bomb, refused before anything is built)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node, max_nodes)
        if n > max_nodes:
            raise error(f"{where}: its YAML aliases (*name) expand to more than {max_nodes:,} values; a file this "
                        f"small that large is an alias bomb, refused (write the values out, or use fewer aliases)")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"{where}: not valid YAML: {e.problem or e.context}{at}") from None
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise error(f"{where}: YAML nests too deeply to be read") from None
    finally:
        loader.dispose()


def _expanded_nodes(root, cap: int) -> int:
    """How many nodes the document has once every alias is expanded (counting stops past `cap`). Aliases share
    node objects, so the sizes of shared nodes are memoised: the count costs the size of the file, not of the
    expansion."""
    import yaml

    sizes: dict[int, int] = {}
    # Iterative post-order walk (a deep document must not exhaust Python's stack).
    stack: list[tuple[Any, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            sizes[key] = 1
            continue
        if done:
            on_path.discard(key)
            sizes[key] = min(cap + 1, 1 + sum(sizes.get(id(c), 1) for c in children))
            continue
        if key in on_path:          # a recursive structure (&a [*a]): infinite when expanded
            return cap + 1
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: str | Path, what: str, *, limit: int = MAX_GRID_BYTES, error: type[Exception] = ConfigError) -> Any:
    """The YAML value in the regular file `path` (UTF-8, at most `limit` bytes); see `parse_yaml`."""
    return parse_yaml(read_text(path, what, limit=limit, error=error), f"{what} {str(path)!r}", error=error)


__all__ = ["MAX_DATA_BYTES", "MAX_GRID_BYTES", "MAX_RECORD_BYTES", "MAX_RESULT_BYTES", "MAX_YAML_NODES", "check_file",
           "decode_text", "json_or_none", "json_type", "parse_json", "parse_yaml", "path_problem", "read_bytes",
           "read_json", "read_text", "read_yaml"]
