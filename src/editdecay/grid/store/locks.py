"""Stage locks: taking one (a `StageLease`), who holds one (the holder record), breaking a stale one.

    DIR/stages/<stage-id>.lock   file lock, held while the stage is computed or its records change

One lease per stage per process: a process that asks again for a lock it holds gets an
error instead of waiting for itself forever (the lock is per open file, so a second
take from the same process would block on the first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from editdecay.core.cache import atomic_write_json
from editdecay.core.errors import ConfigError
from editdecay.grid.store import holder as holder_record
from editdecay.grid.store.events import EventLog
from editdecay.grid.store.holder import HEARTBEAT_S, RUNNING, is_mine, new_record, pid_alive
from editdecay.grid.store.lease import StageLease
from editdecay.grid.store.records import StageRecords

log = logging.getLogger(__name__)

LOCK = ".lock"
STALE_AFTER_S = 900.0       # a lock whose holder shows no heartbeat for this long is stale (grid status/unlock)
WAIT_REPORT_S = 60.0        # a runner waiting for a lock says who holds it this often


def check_stale_after(seconds: float) -> float:
    """`seconds` if it is a usable heartbeat age (> 0, finite); ConfigError naming --stale-after otherwise (0 or
    less would call every holder stale the moment it took its lock)."""
    if not (isinstance(seconds, (int, float)) and 0 < seconds < float("inf")):
        raise ConfigError(f"--stale-after {seconds!r}: a lock is stale after a positive number of seconds without a "
                          f"heartbeat (holders beat every {HEARTBEAT_S:g} s; default {STALE_AFTER_S:g})")
    return float(seconds)


def _locked_read_only(path: Path) -> bool:
    """Whether a process holds the lock file `path`, asked through a read-only descriptor (a shared flock fails
    while another process holds the exclusive one filelock takes). False where flock does not exist."""
    try:
        import fcntl
    except ImportError:                 # not a POSIX system: filelock's lock there needs write access
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                    # closing releases a shared lock taken here
    return False


class StageLocks(StageRecords, EventLog):
    """The stage locks of the grid directory `root`, and their holders."""

    root: Path

    def _file_lock(self, sid: str) -> FileLock:
        (self.root / "stages").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.beside(sid, LOCK)))

    def take(self, sid: str) -> StageLease:
        """Wait for the stage's lock and return its lease (with the holder record written).

        Logs every WAIT_REPORT_S who holds it meanwhile; a holder that hangs is cleared by `editdecay grid
        unlock`, after which this waiter takes a fresh lock file. Raises RuntimeError if this process holds
        the lock already (use that lease).
        """
        lease = self._take(sid, wait=True)
        assert lease is not None
        return lease

    def try_take(self, sid: str) -> StageLease | None:
        """The stage's lease if its lock is free now, else None (another process computes or changes it)."""
        return self._take(sid, wait=False)

    def _take(self, sid: str, wait: bool) -> StageLease | None:
        if is_mine(self.running_info(sid)) and self.is_locked(sid):
            raise RuntimeError(f"stage {sid}: this process holds its lock already; use the lease it has")
        lock = self._file_lock(sid)
        while True:
            try:
                lock.acquire(timeout=WAIT_REPORT_S if wait else 0)
                break
            except Timeout:
                if not wait:
                    return None
                h = self.holder(sid)
                log.warning("stage %s: waiting for its lock, held by pid %s on %s since %s (heartbeat %s s ago); "
                            "if that process hangs, `editdecay grid unlock %s` clears it", sid, h.get("pid"),
                            h.get("host"), h.get("started"), h.get("heartbeat_age_s"), self.root)
        try:
            atomic_write_json(self.beside(sid, RUNNING), new_record())
        except BaseException:
            lock.release()
            raise
        return StageLease(self, sid, lock)

    def is_locked(self, sid: str) -> bool:
        """True while some process holds the stage's lock (it is being computed)."""
        path = self.beside(sid, LOCK)
        if not path.exists():
            return False
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        except PermissionError:         # a results directory we may read but not write (status, report)
            return _locked_read_only(path)
        lock.release()
        return False

    def running_info(self, sid: str) -> dict | None:
        """The holder record (`holder.py`), or None."""
        return holder_record.read(self.beside(sid, RUNNING))

    def holder(self, sid: str, stale_after: float = STALE_AFTER_S) -> dict:
        """Who holds the stage's lock, from its holder record: {stage, host, pid, started, heartbeat_age_s,
        held_s, alive (None: another host), stale, why}. Call only for a lock that is held.

        A holder that is a live process of this host is never stale, however old its heartbeat: it may be slow
        (a long save, a swapped-out process), and breaking its lock lets a second runner delete its temporary
        directory. `why` then says it shows no heartbeat; only `grid unlock --stage ID --force` clears it."""
        check_stale_after(stale_after)
        rec = self.running_info(sid) or {}
        now = time.time()
        out = {"stage": sid, **{k: rec.get(k) for k in ("host", "pid", "started", "heartbeat")}}
        if rec:
            out["held_s"] = round(now - rec.get("started_unix", now), 1)
            out["heartbeat_age_s"] = round(now - rec.get("heartbeat_unix", rec.get("started_unix", now)), 1)
        else:       # lock taken by a process that wrote no record (yet): age of the lock file
            with contextlib.suppress(OSError):
                out["heartbeat_age_s"] = round(now - self.beside(sid, LOCK).stat().st_mtime, 1)
        here = rec.get("host") == socket.gethostname()
        out["alive"] = pid_alive(rec["pid"]) if here and rec.get("pid") else None
        age = out.get("heartbeat_age_s")
        if out["alive"] is False:
            out.update(stale=True, why=f"its holder, pid {rec['pid']} on this host, no longer exists")
        elif out["alive"] and age is not None and age > stale_after:
            out.update(stale=False, why=f"its holder, pid {rec['pid']} on this host, is alive but showed no heartbeat "
                                        f"for {age:.0f} s: it may hang (kill it, or clear with --stage {sid} --force)")
        elif age is not None and age > stale_after:
            out.update(stale=True, why=f"no heartbeat for {age:.0f} s (more than {stale_after:.0f} s): its holder "
                                       f"hangs or lost this filesystem")
        else:
            out.update(stale=False, why=None)
        return out

    def locks(self, stale_after: float = STALE_AFTER_S) -> list[dict]:
        """Every stage lock held now, with its holder (`holder`)."""
        check_stale_after(stale_after)
        out = []
        for path in sorted((self.root / "stages").glob(f"*{LOCK}")):
            sid = path.name[:-len(LOCK)]
            if self.is_locked(sid):
                out.append(self.holder(sid, stale_after))
        return out

    def unlock(self, sid: str, holder: dict | None = None) -> bool:
        """Break a stage's lock: remove its lock file and holder record. Runners then take a fresh lock file;
        the process that held it keeps a lock on the removed file, which excludes nobody (kill it: if it
        wakes up it may compute the stage a second time, though it cannot publish over a finished one).

        `holder`: what `holder(sid)` said when the lock was judged stale; if the record changed since (the
        stage changed hands meanwhile) nothing is removed and False is returned.
        """
        rec = self.running_info(sid)
        if holder is not None and (rec or {}).get("pid") != holder.get("pid"):
            return False
        for suffix in (LOCK, RUNNING):
            with contextlib.suppress(FileNotFoundError):
                self.beside(sid, suffix).unlink()
        self.event(event="unlocked", stage=sid, holder=rec)
        return True


__all__ = ["STALE_AFTER_S", "StageLocks", "WAIT_REPORT_S", "check_stale_after"]
