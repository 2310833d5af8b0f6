"""Cache directory, atomic writes and inter-process locks.

No module-level cache lives here: callers pass a `Cache` (a directory) around.
Every write goes to a temporary name in the same directory and is renamed into
place, so a crash mid-write never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock
from platformdirs import user_cache_dir

ENV_VAR = "EDITDECAY_CACHE"


def default_cache_dir() -> Path:
    """`$EDITDECAY_CACHE` if set, else the platform's user cache dir + /editdecay."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path(user_cache_dir("editdecay"))


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Cache:
    """An explicit cache: a directory and nothing else. Sub-areas are folders."""

    root: Path

    @classmethod
    def default(cls) -> "Cache":
        return cls(default_cache_dir())

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def lock(self, *parts: str) -> contextlib.AbstractContextManager:
        """A lock file beside the cached item (a context manager, `held_lock`); blocks other processes (and
        other machines on filesystems with working fcntl/flock locks) from computing the same item at once."""
        p = self.path(*parts)
        return held_lock(Path(str(p) + ".lock"))


LOCK_REPORT_S = 60.0      # a process waiting for a lock says who holds it this often


@contextlib.contextmanager
def held_lock(path: Path, report_every: float | None = None) -> Iterator[None]:
    """Hold the file lock `path`, recording the holder beside it (`<path>.holder.json`: host, pid, since).

    The kernel releases the lock of a process that dies; it cannot release the lock of one that hangs.
    So a process that waits says every `report_every` (LOCK_REPORT_S) seconds who holds the lock, since
    when, and that removing the lock file frees it if that process hangs (the waiter then takes a fresh
    lock file; the hung process keeps a lock on a file nobody opens).
    """
    import logging
    import socket
    import time

    from filelock import Timeout

    lock = FileLock(str(path))
    holder = Path(str(path) + ".holder.json")
    while True:
        try:
            lock.acquire(timeout=report_every or LOCK_REPORT_S)
            break
        except Timeout:
            try:
                h = json.loads(holder.read_text())
            except (OSError, ValueError):
                h = {}
            logging.getLogger(__name__).warning(
                "waiting for lock %s, held by pid %s on %s since %s; if that process hangs, kill it or remove "
                "%s to go on", path, h.get("pid", "?"), h.get("host", "?"), h.get("since", "?"), path)
    try:
        with contextlib.suppress(OSError):
            atomic_write_json(holder, {"host": socket.gethostname(), "pid": os.getpid(),
                                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(holder.read_text()).get("pid") == os.getpid():
                holder.unlink()
        lock.release()


def temp_file(target: Path) -> Path:
    """A new empty file of a unique name beside `target` (to be renamed onto it), with the permissions of an
    ordinary file (0666 less the umask: 0644 usually). mkstemp makes 0600, and a rename keeps the mode, so a
    result published from it would be unreadable by the group on a shared filesystem."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def ordinary_permissions(path: Path) -> Path:
    """Give `path` (a file, or a directory and everything in it) the permissions of ordinary files and
    directories (0666/0777 less the umask). Writers that create their own files (safetensors makes 0600 whatever
    the umask, and so do save_pretrained's safetensors) are followed by this before their output is published."""
    path = Path(path)
    umask = _umask()
    if path.is_dir() and not path.is_symlink():
        for p in (path, *path.rglob("*")):
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)
    return path


def temp_dir(target: Path) -> Path:
    """A new empty directory of a unique name beside `target`, with the permissions of an ordinary directory
    (0777 less the umask: 0755 usually; mkdtemp makes 0700). See `temp_file`."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


NON_FINITE_KEY = "non_finite"


def json_safe(obj: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """A copy of `obj` that strict JSON can hold, and the status of what had to change.

    Every NaN or infinite float (Python or NumPy scalar, at any depth of dicts, lists and tuples)
    becomes None; the returned dict maps its path ("metrics.post.margin", "curve[3].loss") to what
    it was: "nan", "inf" or "-inf". NumPy scalars become Python numbers.
    """
    found: dict[str, str] = {}

    def walk(x, where):
        if isinstance(x, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", None) == 0:
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            found[where or "value"] = "nan" if x != x else ("inf" if x > 0 else "-inf")
            return None
        return x

    return walk(obj, path), found


def dumps_json(obj: Any, *, indent: int | None = None, default=str) -> str:
    """JSON text every strict parser reads (never bare NaN/Infinity): the one encoder of every writer.

    Non-finite numbers are written as null and, when `obj` is a dict, it gains
    `"non_finite": {path: "nan" | "inf" | "-inf"}` naming each one (null plus a status). Raises
    ValueError only if something else non-finite slips past (`allow_nan=False`).
    """
    safe, found = json_safe(obj)
    if found and isinstance(safe, dict):
        safe = {**safe, NON_FINITE_KEY: {**(safe.get(NON_FINITE_KEY) or {}), **found}}
    return json.dumps(safe, indent=indent, default=default, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON (see `dumps_json`) atomically."""
    atomic_write_bytes(Path(path), (dumps_json(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`.

    If `target` appeared meanwhile (another process won the race) the temporary
    copy is discarded. On error the temporary directory is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target)
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if target.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a regular file's bytes. Raises ConfigError (naming the path) for anything else: hashing a
    symlink to /dev/zero would never end, and a FIFO would block."""
    from editdecay.core.files import check_file

    h = hashlib.sha256()
    with open(check_file(path, "file"), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
