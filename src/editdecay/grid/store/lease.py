"""A stage's lease: its lock, held, and the only way to change the stage or the records beside it.

`GridStore.take(sid)` (or `try_take`) returns a `StageLease`; everything that must happen
with the stage's lock held is a method of the lease -- publishing the stage, moving a
half-written one aside, writing or clearing its failure and attempt records, refreshing
its holder record -- so none of it can be called without the lock. A lease is a context
manager: leaving the `with` block (or `release()`) removes this process's holder record
and releases the lock; a released lease refuses every change.

Why two runners never compute one stage twice: a runner takes the stage's lock and
re-checks whether it is finished before computing. The lock is an OS file lock (flock,
through `filelock`), released by the kernel when its process dies (kill -9 included); it
works on local disks and on shared filesystems with working POSIX/flock locks (NFSv4,
Lustre and GPFS mounted with locking).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from editdecay.core.cache import atomic_write_json
from editdecay.grid.store import holder, stage_dir
from editdecay.grid.store.holder import HEARTBEAT_S, RUNNING, beat, is_mine
from editdecay.grid.store.records import ATTEMPTS, FAILED, StageRecords
from editdecay.grid.store.stage_dir import timestamp


class StageLease:
    """The held lock of stage `sid` in `store`'s directory (made by `StageLocks.take`/`try_take`)."""

    def __init__(self, store: StageRecords, sid: str, lock: FileLock):
        self.store, self.sid = store, sid
        self._lock: FileLock | None = lock

    # ------------------------------------------------------------------ holding

    @property
    def held(self) -> bool:
        return self._lock is not None

    def _check(self) -> None:
        if self._lock is None:
            raise RuntimeError(f"stage {self.sid}: its lease was released; take the stage again to change it")

    def release(self) -> None:
        """Remove this process's holder record and release the lock. Releasing twice is a no-op."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            if is_mine(holder.read(self._path(RUNNING))):
                with contextlib.suppress(FileNotFoundError):
                    self._path(RUNNING).unlink()
        finally:
            lock.release()

    def __enter__(self) -> StageLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _path(self, suffix: str) -> Path:
        return self.store.beside(self.sid, suffix)

    def heartbeat(self, every: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Refresh the holder record's heartbeat every `every` (HEARTBEAT_S) seconds while the body runs."""
        self._check()
        return self._beating(every)

    @contextlib.contextmanager
    def _beating(self, every: float | None) -> Iterator[None]:
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(every or HEARTBEAT_S):
                rec = holder.read(self._path(RUNNING))
                if not is_mine(rec):        # the lock was broken (grid unlock): the record is not ours
                    return
                with contextlib.suppress(OSError):
                    atomic_write_json(self._path(RUNNING), beat(rec))

        thread = threading.Thread(target=run, name=f"heartbeat-{self.sid}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ------------------------------------------------------------------ the stage's directory

    def building(self, kind: str) -> contextlib.AbstractContextManager[Path]:
        """An empty directory for the stage's outputs, published whole (with its manifest) when the body ends
        without error (`stage_dir.building`)."""
        self._check()
        return stage_dir.building(self.store, self.sid, kind)

    def discard_broken(self) -> bool:
        """Move a half-written stage directory aside. True if one was found."""
        self._check()
        return stage_dir.discard_broken(self.store, self.sid)

    def clean_temporaries(self) -> int:
        """Remove output directories left by killed attempts; returns how many."""
        self._check()
        return stage_dir.clean_temporaries(self.store, self.sid)

    # ------------------------------------------------------------------ failure and attempt records

    def record_failure(self, kind: str, error: str, traceback: str) -> bool:
        """Record a failed attempt ({id, kind, error, traceback, time, host, pid, attempts}); never for a finished
        stage. Returns whether it was recorded."""
        self._check()
        if self.store.is_done(self.sid):
            return False
        atomic_write_json(self._path(FAILED), {
            "id": self.sid, "kind": kind, "error": error, "traceback": traceback, "time": timestamp(),
            "host": socket.gethostname(), "pid": os.getpid(), "attempts": len(self.store.attempts(self.sid))})
        return True

    def clear_failure(self, attempts: bool = False) -> None:
        """Remove the failure record; with attempts=True also the count of killed starts (a fresh retry)."""
        self._check()
        with contextlib.suppress(FileNotFoundError):
            self._path(FAILED).unlink()
        if attempts:
            self.clear_attempts()

    def start_attempt(self) -> int:
        """Count a start on disk before computing; returns the starts now counted."""
        self._check()
        runs = [*self.store.attempts(self.sid), {"host": socket.gethostname(), "pid": os.getpid(),
                                                 "started": timestamp()}]
        atomic_write_json(self._path(ATTEMPTS), {"id": self.sid, "attempts": runs})
        return len(runs)

    def drop_attempt(self) -> None:
        """Uncount this process's last start (interrupted on purpose: Ctrl-C, not a crash of the stage)."""
        self._check()
        runs = self.store.attempts(self.sid)
        if runs and runs[-1].get("pid") == os.getpid():
            runs.pop()
            atomic_write_json(self._path(ATTEMPTS), {"id": self.sid, "attempts": runs})

    def clear_attempts(self) -> None:
        """Forget the killed starts (the attempt ended: computed, or failed with its error recorded)."""
        self._check()
        with contextlib.suppress(FileNotFoundError):
            self._path(ATTEMPTS).unlink()


__all__ = ["StageLease"]
