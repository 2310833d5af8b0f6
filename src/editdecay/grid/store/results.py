"""Cell results and the results table of a grid directory.

    DIR/results/<cell-id>.json          one result per cell, copied from its finished cell stage, written
                                        atomically; its fields are `core.schema.CellResult`'s
    DIR/results.parquet, results.csv    one row per finished cell (`result_row`), gathered from results/
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from editdecay.core.cache import atomic_write_bytes, temp_file
from editdecay.core.errors import ConfigError, EditDecayError
from editdecay.core.files import MAX_RESULT_BYTES, read_bytes, read_json
from editdecay.core.schema import MODELS
from editdecay.grid.plan import Plan
from editdecay.grid.store.stage_dir import StageDirectories

ROW_DOWNSTREAM_METRICS = ("acc", "acc_norm", "word_perplexity", "token_perplexity")   # lm-eval task columns


class CellResults(StageDirectories):
    """The cell results of the grid directory `root` and its results table."""

    root: Path

    def result_path(self, cell_id: str) -> Path:
        return self.root / "results" / f"{cell_id}.json"

    def result_files(self) -> dict[str, Path]:
        """Cell id -> results/<id>.json for every result file in the directory (of this plan or an earlier one),
        in id order."""
        return {p.stem: p for p in sorted((self.root / "results").glob("*.json"))}

    def read_result(self, cell_id: str) -> dict | None:
        """The cell's result if it exists and follows the schema (`checked_result`), else None."""
        return self.checked_result(cell_id)[0]

    def checked_result(self, cell_id: str) -> tuple[dict | None, str | None]:
        """(result, None) for a result that follows the schema (core.schema.CellResult); (None, why) for a file that
        exists but cannot be used (cut short, not JSON, another schema, not a regular file, too large); (None, None)
        when there is none."""
        from editdecay.core.schema import ResultSchemaError, validate_result

        path = self.result_path(cell_id)
        if not os.path.lexists(path):
            return None, None
        try:
            data = read_json(path, "cell result", limit=MAX_RESULT_BYTES, error=ResultSchemaError)
            validate_result(data, where=str(path), kind="grid-cell")
        except EditDecayError as e:
            return None, str(e)
        return data, None

    def publish_result(self, plan: Plan, cell_id: str) -> bool:
        """Copy a finished cell stage's result to results/<cell-id>.json (atomically) if it is not there yet.
        Returns whether the cell stage is finished."""
        cell = plan.cell(cell_id)
        if not self.is_done(cell.stages["cell"]):
            return False
        target = self.result_path(cell_id)
        src = self.stage_dir(cell.stages["cell"]) / "result.json"
        if not target.is_file() or target.stat().st_size != src.stat().st_size or self.checked_result(cell_id)[1]:
            atomic_write_bytes(target, read_bytes(src, "cell stage result", limit=MAX_RESULT_BYTES))
        return True

    def gather(self, plan: Plan) -> Path | None:
        """Write results.parquet and results.csv with one row per finished cell; returns the parquet path (None:
        no cell finished)."""
        import pandas as pd

        rows = [result_row(r) for c in plan.cells if (r := self.read_result(c.id)) is not None]
        if not rows:
            return None
        df = pd.DataFrame(rows)
        atomic_write_bytes(self.root / "results.csv", df.to_csv(index=False).encode())
        path = self.root / "results.parquet"
        tmp = temp_file(path)          # unique per writer, readable like every other result
        try:
            try:
                df.to_parquet(tmp, index=False)
            # pyarrow's conversion errors (ArrowInvalid, ArrowTypeError, ...) derive from these
            except (OverflowError, ValueError, TypeError, NotImplementedError) as e:
                raise ConfigError(f"{path} cannot be written: {e}; a value of a result in {self.root / 'results'} "
                                  f"does not fit its column (results.csv holds the table)") from None
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path


def result_row(result: dict) -> dict:
    """Flatten a cell result into one table row: axes, then <model>_<score> for M0/M_e/M_f/M_ef, then decay."""
    axes = result["cell"]["axes"]
    row = {"cell": result["cell"]["id"], "label": result["cell"]["label"]}
    row.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in axes.items()})
    for stage in MODELS:
        m = result["metrics"].get(stage) or {}
        for key in ("efficacy", "paraphrase", "neighborhood", "harmonic_mean", "task_accuracy", "task_token_accuracy",
                    "task_nll", "n", "n_task"):
            row[f"{stage}_{key}"] = m.get(key)
        if m.get("downstream") is not None:
            row[f"{stage}_downstream_score"] = m.get("downstream_score")
            for task, values in m["downstream"].items():
                for key in ROW_DOWNSTREAM_METRICS:
                    if key in values:
                        row[f"{stage}_{task}_{key}"] = values[key]
    decay = result.get("decay") or {}
    efr = decay.get("edit_flip_ratio") or {}
    row["edit_flip_ratio"] = efr.get("value")
    row["n_flipped"] = efr.get("n_flipped")
    for key, value in (decay.get("relative_decrease") or {}).items():
        row[f"relative_decrease_{key}"] = value
    return row


__all__ = ["CellResults", "result_row"]
