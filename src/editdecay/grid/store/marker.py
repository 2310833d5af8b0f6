"""The driver's marker: how a stage process on another node finds out that it does not see the results directory.

    DIR/.driver-marker.json   {token, host, pid, path, time}, written by the driver of a Ray or Slurm run

With a remote cluster the results directory must be on a filesystem that every node
mounts at the same path (NFS, Lustre, GPFS, ...). A node that has a directory of that
name on a local disk instead would compute stages nobody ever sees, and a node that has
no such directory would fail in some unrelated place. So the driver writes a fresh random
token into the marker and hands it to every stage it ships; the stage process checks
that it reads the same token at the same path before it touches anything.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from editdecay.core.cache import atomic_write_json
from editdecay.core.errors import EditDecayError
from editdecay.core.files import json_or_none
from editdecay.grid.store.stage_dir import timestamp

MARKER = ".driver-marker.json"


class ResultsNotVisible(EditDecayError):
    """A stage process does not see the results directory its driver writes (not on a shared filesystem)."""


def write_marker(root: str | Path) -> str:
    """Write a fresh marker into the results directory `root`; returns its token (hand it to every stage)."""
    token = secrets.token_hex(16)
    atomic_write_json(Path(root) / MARKER, {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                                           "path": str(Path(root).resolve()), "time": timestamp()})
    return token


def check_marker(root: str | Path, token: str) -> None:
    """Raise ResultsNotVisible (naming the directory, this host and the driver's) unless `root` holds the marker
    with `token`, as written by the driver."""
    path = Path(root) / MARKER
    found = json_or_none(path)
    if found is not None and found.get("token") == token:
        return
    what = ("has no marker file " + str(path) if found is None else
            f"holds the marker of another run (written by {found.get('host')} at {found.get('time')})")
    raise ResultsNotVisible(
        f"the results directory {root} is not the one the driver writes: on host {socket.gethostname()} it {what}. "
        f"A stage process must see the driver's results directory at the same path: give `grid run --out` a "
        f"directory on a filesystem every node mounts (NFS, Lustre, GPFS), not a node-local disk such as /tmp")


__all__ = ["MARKER", "ResultsNotVisible", "check_marker", "write_marker"]
