"""The holder record of a stage's lock: who computes the stage, since when, and when it last made progress.

    DIR/stages/<stage-id>.running.json   {host, pid, started, started_unix, heartbeat, heartbeat_unix}: written
                                         when the lock is taken, refreshed every HEARTBEAT_S while the stage
                                         computes, removed when the lock is released

The kernel releases the lock of a process that dies; it cannot release the lock of one
that is alive but hangs (or of a client that lost its shared filesystem). The record
says who holds the lock and its heartbeat when it last made progress, so `grid status`
can show such a lock as stale and `grid unlock` can break it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from editdecay.core.files import json_or_none
from editdecay.grid.store.stage_dir import timestamp

RUNNING = ".running.json"
HEARTBEAT_S = 30.0          # how often a stage's holder record is refreshed while it computes


def new_record() -> dict:
    """The holder record of this process, taking a lock now."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": timestamp(), "started_unix": now,
            "heartbeat": timestamp(), "heartbeat_unix": now}


def read(path: Path) -> dict | None:
    """The holder record at `path`, or None (no holder, or a record cut short)."""
    return json_or_none(path)


def beat(record: dict) -> dict:
    """`record` with its heartbeat set to now."""
    return {**record, "heartbeat": timestamp(), "heartbeat_unix": time.time()}


def is_mine(record: dict | None) -> bool:
    """Whether `record` names this process on this host."""
    return bool(record) and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # exists, another user's
        return True
    return True


__all__ = ["HEARTBEAT_S", "RUNNING", "beat", "is_mine", "new_record", "pid_alive", "read"]
