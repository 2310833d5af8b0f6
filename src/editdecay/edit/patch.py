"""The edit result: per-layer weight deltas that can be applied, reverted, saved and loaded.

A patch stores each delta in the weight's own layout (Conv1D deltas are (d_k, d),
Linear deltas (d, d_k)), so applying it is a plain in-place add. Reverting copies
back the exact original tensors saved at apply time, so it is bit-exact (adding
and subtracting a float delta would not be).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from editdecay.core.arch import get_module
from editdecay.core.cache import atomic_write_json, ordinary_permissions, sha256_file, temp_file
from editdecay.core.errors import ConfigError, NonFiniteError
from editdecay.core.layers import Layers
from editdecay.core.request import EditRequest

PATCH_FILE = "patch.safetensors"
META_FILE = "patch.json"
PATCH_FORMAT = 1


@dataclass
class AppliedPatch:
    """Handle returned by `EditPatch.apply`; `revert()` restores the saved originals bit-exactly."""

    model: nn.Module
    originals: dict[str, torch.Tensor]
    reverted: bool = False

    def revert(self) -> None:
        if self.reverted:
            return
        with torch.no_grad():
            for name, w in self.originals.items():
                get_module(self.model, name).weight.copy_(w)
        self.reverted = True


@dataclass
class EditPatch:
    """Weight deltas of one editing run, with what made them."""

    deltas: dict[str, torch.Tensor]            # module name -> delta, same shape/layout as its .weight
    layers: tuple[int, ...]
    editor: str
    config: dict
    requests: tuple[EditRequest, ...] = ()
    model_identity: dict = field(default_factory=dict)   # identity of the model the patch was computed on
    extra: dict = field(default_factory=dict)            # timings, statistics provenance, ...

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self.deltas)

    def apply(self, model: nn.Module) -> AppliedPatch:
        """Add every delta in place (cast to the weight's dtype/device); keep originals for revert."""
        # Resolve and check every module first: a failed apply must leave the model untouched.
        weights = {}
        for name, delta in self.deltas.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"patch delta for module {name!r}: {type(model).__name__} has no such module; the "
                                  f"patch was made for another architecture") from None
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor):
                raise ConfigError(f"patch delta for module {name!r}: that module is a {type(module).__name__}, which "
                                  f"has no weight to add a delta to; the patch was made for another model")
            if tuple(w.shape) != tuple(delta.shape):
                raise ConfigError(f"patch delta for {name} has shape {tuple(delta.shape)}, the model's weight "
                                  f"{tuple(w.shape)}: the patch was made for another model")
            weights[name] = w
        originals = {}
        with torch.no_grad():
            for name, w in weights.items():
                originals[name] = w.detach().clone()
                w.add_(self.deltas[name].to(device=w.device, dtype=w.dtype))
        return AppliedPatch(model, originals)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        handle = self.apply(model)
        try:
            yield model
        finally:
            handle.revert()

    def check_model(self, identity, *, allow_foreign: bool = False, where: str = "patch") -> dict:
        """The one rule for applying a patch to a loaded model (eval-edits, finetune, demo, report).

        `identity`: the `ModelIdentity` of the model about to receive the patch. A patch is *foreign*
        when the weights it was computed on (its recorded fingerprint) differ from the model's, or
        when it records none. Same shapes do not make the same model: a foreign patch raises
        ConfigError naming both fingerprints, unless `allow_foreign` (the CLI's --allow-foreign-patch).
        Returns what results record: both fingerprints, `foreign` and `allowed`.
        """
        made_on = (self.model_identity or {}).get("fingerprint")
        got = identity.fingerprint
        foreign = made_on != got
        record = {"patch_model_fingerprint": made_on, "model_fingerprint": got, "foreign": foreign,
                  "allowed_foreign": bool(foreign and allow_foreign)}
        if foreign and not allow_foreign:
            mine = self.model_identity or {}
            if made_on is None:
                why = "records no model fingerprint, so the weights it was computed on cannot be checked"
            else:
                why = (f"was computed on weights {made_on} ({mine.get('name', '?')}, {mine.get('dtype', '?')}), "
                       f"but model {identity.name!r} ({identity.dtype}) holds weights {got}")
                if mine.get("dtype") and mine.get("dtype") != identity.dtype:
                    why += f"; the dtypes differ: load the model with --dtype {mine['dtype']}"
                if mine.get("name") and mine["name"] != identity.name:
                    why += f"; the patch was made on model {mine['name']!r}: give --model {mine['name']}"
            raise ConfigError(f"{where} {why}. Applying it to other weights gives meaningless results; pass "
                              f"--allow-foreign-patch to apply it anyway (both fingerprints are then recorded)")
        return record

    def norms(self) -> dict[str, float]:
        return {k: float(v.float().norm()) for k, v in self.deltas.items()}

    def save(self, directory: Path) -> Path:
        """Write `patch.safetensors` + `patch.json` atomically into `directory` (must not exist or be a patch dir).

        Safe against concurrent saves into one directory (two `edit --out DIR` at once): the tensors go to a
        temporary file of a unique name, and the pair is published under the directory's lock (`.patch.lock`),
        so the directory always holds the tensors and metadata of one and the same save (the last one).
        """
        from filelock import FileLock

        directory = Path(directory)
        bad = {k: int((~torch.isfinite(v)).sum()) for k, v in self.deltas.items() if v.is_floating_point()}
        bad = {k: n for k, n in bad.items() if n}
        if bad:         # never written: a patch that is not finite cannot be what any edit meant
            name, n = next(iter(bad.items()))
            raise NonFiniteError(f"the {self.editor} edit diverged: the delta of {name!r} holds {n} NaN or infinite "
                                 f"value(s) ({len(bad)} module(s) affected); no patch written to {directory}")
        meta = {
            "format": PATCH_FORMAT, "editor": self.editor, "layers": list(self.layers), "config": self.config,
            "model_identity": self.model_identity, "modules": list(self.deltas),
            "requests": [r.to_dict() for r in self.requests], "extra": self.extra,
        }
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.deltas.items()}
        tmp = temp_file(directory / PATCH_FILE)         # unique per save; 0644 like every other result
        try:
            save_file(tensors, tmp, metadata={"editor": self.editor, "format": str(PATCH_FORMAT)})
            ordinary_permissions(tmp)           # safetensors writes 0600: a shared results directory needs 0644
            meta["tensors_sha256"] = sha256_file(tmp)
            with FileLock(str(directory / ".patch.lock")):
                os.replace(tmp, directory / PATCH_FILE)
                # The metadata goes last: a patch directory is complete only when both match (checked on load).
                atomic_write_json(directory / META_FILE, meta)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return directory

    @classmethod
    def load(cls, directory: Path) -> "EditPatch":
        """Read a patch directory written by `save`, checking that it is what it claims before anything uses it.

        A patch directory is data that may have been copied, cut short or tampered with. Raises ConfigError naming
        the directory, the field and the value when: a file is missing, not a regular file or too large
        (core.files); patch.json does not follow `_PatchFile` (no modules, no requests, layers that are no layer
        list); the tensors do not match their recorded hash; a module has no tensor; a delta
        holds NaN or inf (an edit that diverged: applying it would score 0/0/0 and make fine-tuning fail with a
        misleading message); or `layers` disagree with the layers the modules sit in (core.arch.layer_of_module),
        which `finetune --layers edited` trains. That the editor is registered is checked by
        `edit.registry.load_patch`, which every command reads patches with."""
        from pydantic import ValidationError

        from editdecay.core.arch import layer_of_module
        from editdecay.core.config import explain
        from editdecay.core.files import MAX_RESULT_BYTES, read_json

        directory = Path(directory)
        where = f"patch {directory}"
        for name in (META_FILE, PATCH_FILE):
            if not os.path.lexists(directory / name):
                raise ConfigError(f"{where}: {name} is missing; is this a directory written by `editdecay edit --out`?")
        meta = read_json(directory / META_FILE, f"{where}: {META_FILE}", limit=MAX_RESULT_BYTES, expect=dict)
        if meta.get("format") != PATCH_FORMAT:
            raise ConfigError(f"{where}: {META_FILE} format={meta.get('format')!r} is not supported (this editdecay "
                              f"reads format {PATCH_FORMAT})")
        try:
            f = _PatchFile.model_validate(meta)
        except ValidationError as e:
            raise ConfigError(f"{where}: {META_FILE} {explain(e, _PatchFile, limit=5)}; recompute the patch") from None
        if f.tensors_sha256 and sha256_file(directory / PATCH_FILE) != f.tensors_sha256:
            raise ConfigError(f"{where}: {PATCH_FILE} does not match {META_FILE} (interrupted save?); "
                              f"recompute the patch")
        try:
            deltas = load_file(str(directory / PATCH_FILE))
        except Exception as e:       # safetensors raises its own error types for a damaged file
            raise ConfigError(f"{where}: {PATCH_FILE} cannot be read ({e}); recompute the patch") from None
        missing = [m for m in f.modules if m not in deltas]
        if missing:
            raise ConfigError(f"{where}: {META_FILE} names module {missing[0]!r}, which has no tensor in {PATCH_FILE}")
        for m in f.modules:
            d = deltas[m]
            if not d.is_floating_point():
                raise ConfigError(f"{where}: the delta of {m!r} holds {d.dtype} values, not floating-point ones")
            bad = int((~torch.isfinite(d)).sum())
            if bad:
                raise ConfigError(f"{where}: the delta of {m!r} holds {bad} NaN or infinite value(s) of {d.numel()}: "
                                  f"the edit diverged; recompute it (a smaller v_lr or more v_num_grad_steps) rather "
                                  f"than apply it")
        sits = {layer_of_module(m) for m in f.modules}
        if None not in sits and sits != set(f.layers):
            raise ConfigError(f"{where}: {META_FILE} layers={list(f.layers)}, but its modules sit in layers "
                              f"{sorted(sits)}; `finetune --layers edited` would train other layers than the edited "
                              f"ones: recompute the patch")
        try:
            requests = tuple(EditRequest.from_dict(r) for r in f.requests)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"{where}: a request in {META_FILE} is malformed ({e})") from None
        return cls(deltas={m: deltas[m] for m in f.modules}, editor=f.editor, layers=f.layers, config=f.config,
                   requests=requests, model_identity=f.model_identity, extra=f.extra)


class _PatchFile(BaseModel):
    """The shape of patch.json (`EditPatch.save`), checked when a patch is read back."""

    model_config = ConfigDict(extra="allow")

    format: int
    editor: str
    layers: Layers
    modules: list[str] = Field(min_length=1)
    config: dict
    requests: list[dict[str, Any]] = Field(min_length=1)
    model_identity: dict = Field(default_factory=dict)
    extra: dict = Field(default_factory=dict)
    tensors_sha256: str | None = None

