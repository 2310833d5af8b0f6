"""The stage lease: lock-held changes exist only on a held lease, and the store keeps no state in memory."""

from __future__ import annotations

import ast
import json
import os
import socket
from pathlib import Path

import pytest

from editdecay.grid import store as store_pkg
from editdecay.grid.store import GridStore


@pytest.fixture
def store(tmp_path):
    return GridStore(tmp_path / "grid")


def test_a_released_lease_refuses_every_change(store):
    lease = store.take("stats-0001")
    assert store.is_locked("stats-0001") and store.running_info("stats-0001")["pid"]
    lease.release()
    assert not store.is_locked("stats-0001") and store.running_info("stats-0001") is None
    for change in (lambda: lease.record_failure("stats", "E", "tb"), lease.clear_failure, lease.start_attempt,
                   lease.drop_attempt, lease.clear_attempts, lease.discard_broken, lease.clean_temporaries,
                   lambda: lease.building("stats"), lease.heartbeat):
        with pytest.raises(RuntimeError, match="released"):
            change()
    lease.release()                                   # twice: a no-op
    assert store.failure("stats-0001") is None and store.attempts("stats-0001") == []


def test_taking_a_lock_this_process_holds_fails_instead_of_waiting_for_itself(store):
    with store.take("patch-0001") as lease:
        assert lease.start_attempt() == 1 and len(store.attempts("patch-0001")) == 1
        with pytest.raises(RuntimeError, match="holds its lock already"):
            store.take("patch-0001")
        with pytest.raises(RuntimeError, match="holds its lock already"):
            store.try_take("patch-0001")
        assert lease.record_failure("patch", "ValueError: x", "tb")
        assert store.failure("patch-0001")["attempts"] == 1
    with store.take("patch-0001") as again:            # released: taken again
        again.clear_failure(attempts=True)
    assert store.failure("patch-0001") is None and store.attempts("patch-0001") == []


def test_a_dead_holders_record_does_not_block_a_new_lease(store):
    """A holder record naming this process whose lock nobody holds (left by a killed process whose pid was reused)
    is not taken for a lease of ours."""
    (store.root / "stages").mkdir(parents=True)
    (store.root / "stages" / "eval-0001.running.json").write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with store.take("eval-0001") as lease:
        assert lease.held and store.running_info("eval-0001")["started"]
    assert store.running_info("eval-0001") is None


def test_the_store_package_has_no_module_level_mutable_state():
    """Every answer comes from disk: no module of grid/store keeps a dict, list or set at module level."""
    found = []
    for path in sorted(Path(store_pkg.__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                value = node.value
                mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) \
                    or (isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("dict", "list", "set"))
                if mutable and not any(getattr(t, "id", "") == "__all__" for t in getattr(node, "targets", [])):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []
