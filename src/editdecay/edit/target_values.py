"""E3 target values computed ahead of the edit, apart from it (docs/METHODS.md E3).

E3 reads the unedited model, the requests and the E2 context templates, never the E1 statistics. So a grid
computes the target values in a stage of their own (grid/plan.py, kind `targets`) beside the statistics: on two
workers the first edit waits for max(E1, E3) instead of E1 + E3, and editors whose E3 settings agree (MEMIT and
AlphaEdit with the same layers) share one. The patch stage hands them to the edit (`edit.api.edit_model`), which
uses them for its first batch in place of computing them.

The values are the ones the edit would compute itself: same model, same requests, same templates, same
settings, same arithmetic (tested bit for bit). `TargetValues.check` refuses values made for other requests,
templates or settings (EditDecayError naming what differs).

On disk (`save`, `load`): `targets.safetensors` (z and h, (n, d) float32) and `targets.json` (the settings, the
templates, the case ids, the final losses and steps, the warnings of the request checks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
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
    result: TargetResult
    warnings: tuple[str, ...] = ()

    def check(self, config: TargetValuesConfig, templates: ContextTemplates, case_ids: list[str]) -> None:
        """EditDecayError unless these values were computed for exactly this batch, templates and settings."""
        if config != self.config:
            diff = {k: (getattr(self.config, k), getattr(config, k)) for k in type(config).model_fields
                    if getattr(self.config, k) != getattr(config, k)}
            raise EditDecayError(f"precomputed E3 target values were made with other settings than the edit's "
                                 f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())})")
        if tuple(case_ids) != self.case_ids:
            raise EditDecayError(f"precomputed E3 target values are for {len(self.case_ids)} other requests "
                                 f"(first case ids {list(self.case_ids[:3])}) than the edit's batch of "
                                 f"{len(case_ids)} (first {list(case_ids[:3])})")
        if templates != self.templates:
            raise EditDecayError(f"precomputed E3 target values used other context templates than the edit "
                                 f"({list(self.templates.flat)} vs {list(templates.flat)}): another model or seed")

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"z": self.result.z.contiguous(), "h": self.result.h.contiguous()}, str(directory / TENSORS_FILE))
        meta = {"equation": "E3", "config": self.config.to_dict(), "templates": [list(g) for g in self.templates.groups],
                "case_ids": list(self.case_ids), "loss": self.result.loss, "steps": self.result.steps,
                "warnings": list(self.warnings)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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
    return TargetValues(config, templates, tuple(r.case_id for r in requests), result, tuple(warnings))


__all__ = ["TargetValues", "TargetValuesConfig", "compute_target_values"]
