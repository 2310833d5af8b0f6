"""A stage's directory and the files beside it: where they live, the manifest, and how a stage is published.

    DIR/stages/<stage-id>/              a FINISHED stage: its outputs and `stage.json` (manifest, written last)
    DIR/stages/<stage-id>.<record>      records beside it (lock, holder, attempts, failure: locks.py, records.py)
    DIR/stages/.<stage-id>.*.tmp/       a stage being written (or left by a killed process; removed before redoing)

Why a stage can never look finished when it is not: its outputs are written into a
temporary directory, `stage.json` is written last (listing every file with its size),
and the directory is renamed into place in one step. A stage directory whose manifest
is missing, names another stage or lists a file that is missing or has another size
is treated as half-written: moved aside and computed again.

Publishing, moving aside and cleaning up change a stage, so they are done only through
the stage's lease (`lease.StageLease`); this module reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

from editdecay.core.cache import atomic_dir, atomic_write_json
from editdecay.core.files import json_or_none

log = logging.getLogger(__name__)

MANIFEST = "stage.json"
MANIFEST_FORMAT = 1


def timestamp() -> str:
    """Local time with its UTC offset, as every record of a grid directory writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class StageDirectories:
    """Finished stages of the grid directory `root`, read from disk (manifest checked against the files)."""

    root: Path

    def stage_dir(self, sid: str) -> Path:
        return self.root / "stages" / sid

    def beside(self, sid: str, suffix: str) -> Path:
        """The record `<stage-id><suffix>` beside the stage's directory (e.g. `.lock`, `.failed.json`)."""
        return self.root / "stages" / f"{sid}{suffix}"

    def manifest(self, sid: str) -> dict | None:
        """The manifest of a finished stage, or None if it is not finished (or half-written)."""
        d = self.stage_dir(sid)
        m = json_or_none(d / MANIFEST)
        if m is None or m.get("id") != sid or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), dict):
            return None
        for name, size in m["files"].items():
            try:
                st = (d / name).stat()
            except (OSError, ValueError):
                return None
            # A listed file must still be the regular file of that size (never a link to a device).
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return None
        return m

    def is_done(self, sid: str) -> bool:
        return self.manifest(sid) is not None


def discard_broken(dirs: StageDirectories, sid: str) -> bool:
    """Move a half-written stage directory aside and remove it. True if one was found. (Lease only.)"""
    d = dirs.stage_dir(sid)
    if d.exists() and dirs.manifest(sid) is None:
        aside = d.with_name(f".{sid}.broken-{int(time.time())}-{os.getpid()}")
        log.warning("stage %s is incomplete (manifest missing or files differ); moving it to %s and "
                    "computing it again", sid, aside.name)
        os.rename(d, aside)
        shutil.rmtree(aside, ignore_errors=True)
        return True
    return False


def clean_temporaries(dirs: StageDirectories, sid: str) -> int:
    """Remove output directories left by killed attempts of `sid`; returns how many. (Lease only.)"""
    n = 0
    for p in (dirs.root / "stages").glob(f".{sid}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:           # e.g. a half-written .running.json or .failed.json
            p.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def building(dirs: StageDirectories, sid: str, kind: str) -> Iterator[Path]:
    """Yield an empty directory for the outputs of `sid`; on success write its manifest and rename it into
    place. On error (or kill) nothing is published. (Lease only.)"""
    with atomic_dir(dirs.stage_dir(sid)) as tmp:
        t0 = time.perf_counter()
        yield tmp
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"format": MANIFEST_FORMAT, "id": sid, "kind": kind, "files": files, "created": timestamp(),
                "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid()}
        extra = tmp / "outputs.json"
        if extra.is_file():
            meta["outputs"] = json.loads(extra.read_text())
        atomic_write_json(tmp / MANIFEST, meta)


__all__ = ["MANIFEST", "MANIFEST_FORMAT", "StageDirectories", "timestamp"]
