"""E3 target values computed ahead of the edit, apart from it (docs/METHODS.md E3).

E3 reads the unedited model, the requests and the E2 context templates, never the E1 statistics. So a grid
computes the target values in a stage of their own (grid/plan.py, kind `targets`) beside the statistics: on two
workers the first edit waits for max(E1, E3) instead of E1 + E3, and editors whose E3 settings agree (MEMIT and
AlphaEdit with the same last layer, resolved when the grid is planned) share one. The patch stage hands them to
the edit (`edit.api.edit_model`), which uses them for its first batch in place of computing them.

The values are the ones the edit computes itself from the same model, requests, templates, settings and E3
batches (bit for bit, tested). The E3 batch size is a run-time setting (free memory decides it unless
`target_batch_size` is set), and other batches change z at float32 round-off, as they would inside one edit.
`TargetValues.check` refuses values made for other requests, settings or weights (EditDecayError naming what
differs); values whose context templates differ from the edit's (sampled on another device, dtype or library
version) are not used: the edit computes E3 itself and says so in its warnings (edit/run.py).

On disk (`save`, `load`): `targets.safetensors` (z and h, (n, d) float32) and `targets.json` (the settings, the
templates, the case ids, a digest of the requests, the model's fingerprint, the final losses and steps, the
warnings of the request checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from editdecay.core.cache import dumps_json
from editdecay.core.checks import check_finite
from editdecay.core.errors import ConfigError, EditDecayError
from editdecay.core.request import EditRequest
from editdecay.edit.config import TargetValuesConfig
from editdecay.edit.context import ContextTemplates
from editdecay.edit.targets import TargetResult, compute_targets

TENSORS_FILE = "targets.safetensors"
META_FILE = "targets.json"


@dataclass(frozen=True)
class TargetValues:
    """E3's output for a list of requests, with what it was computed from."""

    config: TargetValuesConfig
    templates: ContextTemplates
    case_ids: tuple[str, ...]
    requests_digest: str              # `requests_digest` of the requests (prompts, subjects, targets, ...)
    model_fingerprint: str | None     # the unedited model's weights (core.models.ModelIdentity.fingerprint)
    result: TargetResult
    warnings: tuple[str, ...] = ()

    def check(self, config: TargetValuesConfig, requests: list[EditRequest], model_fingerprint: str | None) -> None:
        """EditDecayError unless these values were computed for exactly these settings, requests and weights."""
        if config != self.config:
            diff = {k: (getattr(self.config, k), getattr(config, k)) for k in type(config).model_fields
                    if getattr(self.config, k) != getattr(config, k)}
            raise EditDecayError(f"precomputed E3 target values were made with other settings than the edit's "
                                 f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())})")
        ids = [r.case_id for r in requests]
        if tuple(ids) != self.case_ids or requests_digest(requests) != self.requests_digest:
            raise EditDecayError(f"precomputed E3 target values are for other requests (first case ids "
                                 f"{list(self.case_ids[:3])} of {len(self.case_ids)}) than the edit's batch (first "
                                 f"{ids[:3]} of {len(ids)})" + (", with other prompts, subjects or targets"
                                                               if tuple(ids) == self.case_ids else ""))
        if None not in (model_fingerprint, self.model_fingerprint) and model_fingerprint != self.model_fingerprint:
            raise EditDecayError(f"precomputed E3 target values were computed on other weights (fingerprint "
                                 f"{self.model_fingerprint}) than the model being edited ({model_fingerprint})")

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"z": self.result.z.contiguous(), "h": self.result.h.contiguous()}, str(directory / TENSORS_FILE))
        meta = {"equation": "E3", "config": self.config.to_dict(),
                "templates": [list(g) for g in self.templates.groups], "case_ids": list(self.case_ids),
                "requests_digest": self.requests_digest,
                "model_fingerprint": self.model_fingerprint, "loss": self.result.loss, "steps": self.result.steps,
                "warnings": list(self.warnings)}
        (directory / META_FILE).write_text(dumps_json(meta, indent=2) + "\n")     # strict JSON (core.cache)
        return directory

    @classmethod
    def load(cls, directory: Path) -> "TargetValues":
        """Read what `save` wrote; ConfigError naming the directory if a file is missing, damaged or inconsistent."""
        from safetensors.torch import load_file

        from editdecay.core.files import MAX_RESULT_BYTES, read_json

        directory = Path(directory)
        where = f"target values {directory}"
        meta = read_json(directory / META_FILE, f"{where}: {META_FILE}", limit=MAX_RESULT_BYTES, expect=dict)
        try:
            tensors = load_file(str(directory / TENSORS_FILE))
            z, h = tensors["z"], tensors["h"]
            n = len(meta["case_ids"])
            values = cls(config=TargetValuesConfig.from_dict(meta["config"]),
                         templates=ContextTemplates(tuple(tuple(g) for g in meta["templates"])),
                         case_ids=tuple(str(c) for c in meta["case_ids"]),
                         requests_digest=str(meta["requests_digest"]),
                         model_fingerprint=meta.get("model_fingerprint"),
                         result=TargetResult(z=z, h=h, loss=[float(x) for x in meta["loss"]],
                                             steps=[int(x) for x in meta["steps"]]),
                         warnings=tuple(meta.get("warnings", ())))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except Exception as e:          # a missing key or file, a damaged safetensors file
            raise ConfigError(f"{where} cannot be read ({type(e).__name__}: {e}); recompute it") from None
        if z.shape != h.shape or z.ndim != 2 or z.shape[0] != n or len(values.result.loss) != n:
            raise ConfigError(f"{where}: z {tuple(z.shape)}, h {tuple(h.shape)} and {n} case ids do not match; "
                              f"recompute it")
        check_finite(f"E3 target values in {directory}", {"z": z, "h": h})
        return values


def compute_target_values(lm, config: TargetValuesConfig, requests: list[EditRequest], *,
                          progress: bool = True) -> TargetValues:
    """E3 on the unedited `lm.model` for `requests`, with the templates `config` gives, exactly as a locate-then-edit
    run computes them for its first batch (edit/run.py `EditingRun.edit_batch`). Raises DataError for a request the
    run would reject (edit/run.py `validate_requests`), NonFiniteError for NaN or infinite values."""
    from editdecay.edit.run import validate_requests

    templates = config.templates(lm.model, lm.tokenizer)
    warnings = validate_requests(lm.tokenizer, requests, templates)
    result = compute_targets(lm.model, lm.tokenizer, requests, templates, config.settings(), progress=progress)
    check_finite("E3 target values z", {f"case_id {r.case_id}": result.z[i] for i, r in enumerate(requests)})
    return TargetValues(config, templates, tuple(r.case_id for r in requests), requests_digest(requests),
                        lm.identity.fingerprint, result, tuple(warnings))


def requests_digest(requests: list[EditRequest]) -> str:
    """Content hash of the requests, in order (every field: case id, prompt, subject, targets, paraphrases, ...)."""
    from editdecay.core.cache import stable_hash

    return stable_hash([r.to_dict() for r in requests])


__all__ = ["TargetValues", "TargetValuesConfig", "compute_target_values", "requests_digest"]
