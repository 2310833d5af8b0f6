"""Cache directory, atomic writes and inter-process locks.

No module-level cache lives here: callers pass a `Cache` (a directory) around.
Every write goes to a temporary name in the same directory and is renamed into
place, so a crash mid-write never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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

    def lock(self, *parts: str, timeout: float = -1) -> FileLock:
        """A lock file beside the cached item; blocks other processes (and other machines on
        filesystems with working fcntl/flock locks) from computing the same item at once."""
        p = self.path(*parts)
        return FileLock(str(p) + ".lock", timeout=timeout)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`.

    If `target` appeared meanwhile (another process won the race) the temporary
    copy is discarded. On error the temporary directory is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
