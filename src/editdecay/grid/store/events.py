"""The event log of a grid directory: what each runner process did (stage computed / reused / failed ...).

    DIR/logs/events-<host>-<pid>.jsonl   one file per process: no interleaved lines on shared disks
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from editdecay.core.cache import dumps_json
from editdecay.grid.store.stage_dir import timestamp


class EventLog:
    """Append to and read the event logs of the grid directory `root`."""

    root: Path

    def event(self, **record) -> None:
        """Append one line {time, pid, **record} to this process's event log."""
        path = self.root / "logs" / f"events-{socket.gethostname()}-{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(dumps_json({"time": timestamp(), "pid": os.getpid(), **record}) + "\n")
            f.flush()

    def events(self) -> list[dict]:
        """Every event of every process, file by file (a line cut short by a kill is skipped)."""
        out = []
        for path in sorted((self.root / "logs").glob("events-*.jsonl")):
            if not path.is_file():          # only regular files (a link to a device would never end)
                continue
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


__all__ = ["EventLog"]
