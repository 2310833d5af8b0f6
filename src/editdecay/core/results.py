"""Self-describing result files: what was run, on what, with which software, and how long it took."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import platform
import socket
import subprocess
import time
from pathlib import Path

from editdecay.core.cache import atomic_write_json
from editdecay.core.schema import SCHEMA_VERSION, validate_result

_PACKAGES = ("editdecay", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "gguf", "pydantic",
             "lm_eval", "datasets")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the editdecay source tree, if it is a git checkout."""
    path = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: str | None = None) -> dict:
    import torch

    return {
        "packages": package_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class Timer:
    """Named wall-clock phases: `with timer("stats"): ...`; `timer.seconds` maps phase -> s."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - t0, 4)


def write_result(path: Path, result: dict) -> Path:
    """Write a result JSON atomically, schema version first, after validating it against its kind's schema
    (core.schema: ResultSchemaError names the field a writer got wrong, and nothing is written)."""
    payload = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in result.items() if k != "schema_version"}}
    validate_result(payload, where=str(path))
    atomic_write_json(Path(path), payload)
    return Path(path)
