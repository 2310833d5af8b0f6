"""The edit result: what an editor changed, as something that can be applied, reverted, saved and loaded.

A patch holds two kinds of edit, either or both:
- weight deltas (`deltas`, MEMIT, AlphaEdit, FT-M, MEND), each in the weight's own layout (Conv1D deltas
  are (d_k, d), Linear deltas (d, d_k)), so applying one is a plain in-place add. Reverting copies back
  the exact original tensors saved at apply time, so it is bit-exact (adding and subtracting a float
  delta would not be);
- module states (`states`, GRACE): an edit kept in a module of its own beside a host module
  (core/module_edit.py), stored as its tensors plus a JSON config. Applying one rebuilds the module
  through the editor that made it (edit/registry.py: the editor class's `module_edit`) and attaches it to
  the host; reverting detaches it, which leaves the host exactly as it was.

On disk: `patch.safetensors` (deltas under their module names, state tensors under
"<module>::<tensor>") and `patch.json` (format, editor, config, requests, provenance, each state's
config). Format 1 (deltas only) still loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editdecay.core.arch import get_module
from editdecay.core.cache import atomic_write_json, sha256_file
from editdecay.core.errors import ConfigError
from editdecay.core.layers import parse_layers
from editdecay.core.request import EditRequest

PATCH_FILE = "patch.safetensors"
META_FILE = "patch.json"
PATCH_FORMAT = 2
READABLE_FORMATS = (1, 2)
STATE_SEPARATOR = "::"


@dataclass
class ModuleState:
    """An edit kept as a module beside a host module: the tensors and JSON config that rebuild it
    (`module_edit.from_state(config, tensors)` of the editor that made it)."""

    config: dict
    tensors: dict[str, torch.Tensor]


@dataclass
class AppliedPatch:
    """Handle returned by `EditPatch.apply`; `revert()` restores the saved originals bit-exactly."""

    model: nn.Module
    originals: dict[str, torch.Tensor]
    attached: list = field(default_factory=list)     # core.module_edit.Attached, one per module state
    reverted: bool = False

    def revert(self) -> None:
        if self.reverted:
            return
        for a in self.attached:
            a.detach()
        with torch.no_grad():
            for name, w in self.originals.items():
                get_module(self.model, name).weight.copy_(w)
        self.reverted = True


@dataclass
class EditPatch:
    """The edit of one editing run (weight deltas and/or module states), with what made it."""

    deltas: dict[str, torch.Tensor]            # module name -> delta, same shape/layout as its .weight
    layers: tuple[int, ...]
    editor: str
    config: dict
    requests: tuple[EditRequest, ...] = ()
    model_identity: dict = field(default_factory=dict)   # identity of the model the patch was computed on
    extra: dict = field(default_factory=dict)            # timings, statistics provenance, ...
    states: dict[str, ModuleState] = field(default_factory=dict)   # host module name -> module state

    @property
    def module_names(self) -> tuple[str, ...]:
        """Every module the patch changes: those with a weight delta, then the hosts of module states."""
        return tuple(dict.fromkeys([*self.deltas, *self.states]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the patch by its name on disk: deltas by module name, state tensors as
        "<module>::<tensor>" (what `save` writes; what the non-finite checks read)."""
        out = dict(self.deltas)
        for module, state in self.states.items():
            out.update({f"{module}{STATE_SEPARATOR}{k}": v for k, v in state.tensors.items()})
        return out

    def _module_edits(self, model: nn.Module) -> dict[str, tuple[nn.Module, object]]:
        """host name -> (host module, the rebuilt, checked ModuleEdit), before anything is changed."""
        if not self.states:
            return {}
        from editdecay.edit.registry import editor_class

        try:
            cls = editor_class(self.editor)
        except ConfigError as e:
            raise ConfigError(f"patch holds module states of editor {self.editor!r}, which rebuilds them: {e}") from None
        builder = getattr(cls, "module_edit", None)
        if builder is None:
            raise ConfigError(f"patch holds module states, but editor {self.editor!r} declares no module_edit "
                              f"class to rebuild them (edit/editor.py)")
        out = {}
        for name, state in self.states.items():
            host = get_module(model, name)
            edit = builder.from_state(state.config, state.tensors)
            edit.check_host(host, name)
            out[name] = (host, edit)
        return out

    def apply(self, model: nn.Module) -> AppliedPatch:
        """Add every delta in place (cast to the weight's dtype/device) and attach every module state; keep what
        `revert` needs. Raises ConfigError (model unchanged) for a module the model lacks, a delta of another
        shape or a state its host cannot carry (the patch was made for another model)."""
        from editdecay.core.module_edit import attach

        # Resolve and check every module first: a failed apply must leave the model untouched.
        weights = {}
        for name, delta in self.deltas.items():
            w = get_module(model, name).weight
            if tuple(w.shape) != tuple(delta.shape):
                raise ConfigError(f"patch delta for {name} has shape {tuple(delta.shape)}, the model's weight "
                                  f"{tuple(w.shape)}: the patch was made for another model")
            weights[name] = w
        edits = self._module_edits(model)
        originals = {}
        with torch.no_grad():
            for name, w in weights.items():
                originals[name] = w.detach().clone()
                w.add_(self.deltas[name].to(device=w.device, dtype=w.dtype))
        handle = AppliedPatch(model, originals)
        try:
            for name, (host, edit) in edits.items():
                handle.attached.append(attach(host, edit, name))
        except BaseException:
            handle.revert()
            raise
        return handle

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
        """Frobenius norm of every tensor (`tensors()` names): deltas and module-state tensors."""
        return {k: float(v.float().norm()) for k, v in self.tensors().items()}

    def save(self, directory: Path) -> Path:
        """Write `patch.safetensors` + `patch.json` atomically into `directory` (must not exist or be a patch dir).

        Safe against concurrent saves into one directory (two `edit --out DIR` at once): the tensors go to a
        temporary file of a unique name, and the pair is published under the directory's lock (`.patch.lock`),
        so the directory always holds the tensors and metadata of one and the same save (the last one).
        """
        from filelock import FileLock

        directory = Path(directory)
        meta = {
            "format": PATCH_FORMAT, "editor": self.editor, "layers": list(self.layers), "config": self.config,
            "model_identity": self.model_identity, "modules": list(self.deltas),
            "states": {m: {"config": s.config, "tensors": list(s.tensors)} for m, s in self.states.items()},
            "requests": [r.to_dict() for r in self.requests], "extra": self.extra,
        }
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{PATCH_FILE}.", suffix=".tmp")   # unique per save
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"editor": self.editor, "format": str(PATCH_FORMAT)})
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
        directory = Path(directory)
        if not (directory / META_FILE).exists() or not (directory / PATCH_FILE).exists():
            raise ConfigError(f"patch {directory}: missing {META_FILE} or {PATCH_FILE}; is this a directory "
                              f"written by `editdecay edit --out`?")
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"patch {directory}: {META_FILE} cannot be read as JSON ({e}); recompute the patch") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"patch {directory}: {META_FILE} holds a JSON {type(meta).__name__}, not an object")
        if meta.get("tensors_sha256") and sha256_file(directory / PATCH_FILE) != meta["tensors_sha256"]:
            raise ConfigError(f"patch {directory}: {PATCH_FILE} does not match {META_FILE} (interrupted save?); "
                              f"recompute the patch")
        if meta.get("format") not in READABLE_FORMATS:
            raise ConfigError(f"patch {directory}: format {meta.get('format')} is not supported (readable: "
                              f"{', '.join(map(str, READABLE_FORMATS))})")
        absent = [k for k in ("modules", "layers", "editor", "config", "requests") if k not in meta]
        if absent:
            raise ConfigError(f"patch {directory}: {META_FILE} lacks {', '.join(absent)}; recompute the patch")
        try:
            deltas = load_file(str(directory / PATCH_FILE))
        except Exception as e:       # safetensors raises its own error types for a damaged file
            raise ConfigError(f"patch {directory}: {PATCH_FILE} cannot be read ({e}); recompute the patch") from None
        states_meta = meta.get("states") or {}
        if not isinstance(states_meta, dict) or not all(isinstance(v, dict) and isinstance(v.get("tensors"), list)
                                                        for v in states_meta.values()):
            raise ConfigError(f"patch {directory}: {META_FILE} 'states' is malformed; recompute the patch")
        wanted = list(meta["modules"]) + [f"{m}{STATE_SEPARATOR}{t}" for m, v in states_meta.items()
                                          for t in v["tensors"]]
        missing = [m for m in wanted if m not in deltas]
        if missing:
            raise ConfigError(f"patch {directory}: tensors missing for {missing}")
        states = {m: ModuleState(config=v.get("config") or {},
                                 tensors={t: deltas[f"{m}{STATE_SEPARATOR}{t}"] for t in v["tensors"]})
                  for m, v in states_meta.items()}
        try:
            requests = tuple(EditRequest.from_dict(r) for r in meta["requests"])
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"patch {directory}: a request in {META_FILE} is malformed ({e})") from None
        return cls(
            deltas={m: deltas[m] for m in meta["modules"]}, editor=meta["editor"],
            layers=parse_layers(meta["layers"], field=f"patch {directory}: {META_FILE} layers"),
            config=meta["config"], requests=requests,
            model_identity=meta.get("model_identity", {}), extra=meta.get("extra", {}), states=states,
        )
