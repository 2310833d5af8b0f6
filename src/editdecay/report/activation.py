"""Activation shift (optional, `--activation-shift`): how far editing and fine-tuning move the hidden states.

For a cell, the four models M0, M_e, M_f, M_ef are rebuilt from the grid's stages:
M0 from the model reference, M_e = M0 + the saved patch, M_f = M0 + the saved
fine-tuned weights (adapter or tensors) of the `finetune_base` stage. M_ef keeps no
weights in the grid (only its measurements), so it is fine-tuned again here with the
cell's recipe and data from the same seed, as the stage did; the re-trained model is
checked against the stored per-request outcomes and the agreement is reported (on
the same hardware and thread count it is exact; elsewhere it may differ slightly).

For each prompt p and layer l, h_X(p, l) is the hidden state at the prompt's last
token after block l (0-based, as the editors number layers: Hugging Face
`hidden_states[l + 1]`; the last block's is taken after the final norm, as Hugging
Face returns it). The displacement of model X is
d_X = h_X - h_M0. Reported per layer, as means over prompts:
- L2 shift ||d_X|| for X in M_e, M_f, M_ef;
- cosine similarity of displacements: cos(d_M_ef, d_M_e) (does the fine-tuned edited model still move
  where the edit moved it?), cos(d_M_ef, d_M_f) (does it move as fine-tuning alone does?), cos(d_M_e, d_M_f);
  prompts where a displacement is zero (layers before the first edited one, for d_M_e) are left out of
  a cosine, which is then undefined when no prompt is left.
Prompt sets: the edit prompts (each request's rewrite prompt) and the task prompts (the embedded task's
held-out split, or the first fine-tuning records, rendered with the recipe's template).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Sequence

import torch
from tqdm.auto import tqdm

from editdecay.core.arch import unwrap_peft
from editdecay.core.devices import input_device
from editdecay.report.analysis import Analysis
from editdecay.report.figures import FigureRecord, _empty, _figure, _save
from editdecay.report.records import CellRecord
from editdecay.report.table import Column, Table, make_table

log = logging.getLogger(__name__)

N_TASK_PROMPTS = 16
PAIRS = (("M_ef", "M_e"), ("M_ef", "M_f"), ("M_e", "M_f"))


@dataclass(frozen=True)
class ShiftRow:
    cell: str
    prompts: str              # edit | task
    layer: int                # block index, 0-based (the editors' numbering)
    n: int                    # prompts
    l2: dict                  # model -> mean ||d_model||
    cos: dict                 # (a, b) -> mean cosine of d_a and d_b, or None


@dataclass(frozen=True)
class CellShift:
    cell: str
    rows: tuple[ShiftRow, ...]
    reproduced: str           # how well the re-trained M_ef matches the stored outcomes


@torch.no_grad()
def last_token_states(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(P, L, d) hidden states at each prompt's last token after every block (float32, CPU)."""
    from editdecay.core.tokens import encode_prompt

    base = unwrap_peft(model)
    was_training = base.training
    base.eval()
    device = input_device(base)
    out = []
    for p in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, p)], device=device)                 # (1, T)
        hs = base(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0, -1] for h in hs[1:]]).float().cpu())                 # (L, d)
    base.train(was_training)
    return torch.stack(out)


def shifts(states: dict[str, torch.Tensor], cell: str, prompts: str) -> list[ShiftRow]:
    """Per-layer L2 shifts and displacement cosines from the (P, L, d) states of M0, M_e, M_f, M_ef."""
    d = {m: states[m] - states["M0"] for m in ("M_e", "M_f", "M_ef")}
    norms = {m: v.norm(dim=-1) for m, v in d.items()}                                    # (P, L)
    scale = states["M0"].norm(dim=-1).clamp_min(1e-12)
    rows = []
    for layer in range(states["M0"].shape[1]):
        cos = {}
        for a, b in PAIRS:
            vals = []
            for p in range(states["M0"].shape[0]):
                na, nb = norms[a][p, layer], norms[b][p, layer]
                if na > 1e-6 * scale[p, layer] and nb > 1e-6 * scale[p, layer]:
                    vals.append(float(torch.dot(d[a][p, layer], d[b][p, layer]) / (na * nb)))
            cos[(a, b)] = mean(vals) if vals else None
        rows.append(ShiftRow(cell, prompts, layer, states["M0"].shape[0],
                             {m: float(norms[m][:, layer].mean()) for m in norms}, cos))
    return rows


def _task_prompts(result: dict) -> list[str]:
    from editdecay.data.prompts import render_prompt
    from editdecay.report.records import training_data

    cfg = result.get("config") or {}
    template = (cfg.get("recipe") or {}).get("template", "alpaca")
    source, held_out = training_data(cfg)
    if held_out is not None:
        records = held_out.records()[1]
    elif not source.records:
        return list(source.texts[:N_TASK_PROMPTS])
    else:
        records = source.records
    return [render_prompt(r, template) for r in records[:N_TASK_PROMPTS]]


def cell_shift(a: Analysis, cell: CellRecord, *, cache_dir=None, device: str = "cpu",
               progress: bool = False, trust_remote_code: bool = False) -> CellShift:
    """Rebuild the four models of one cell and measure their hidden-state shifts (see module docstring).

    `trust_remote_code` comes from the report's command line only, never from the results directory: a
    report on someone else's results must not run their code. A cell whose model needs remote code
    raises ConfigError naming the model (listed as not measured).
    """
    from editdecay.core.cache import Cache
    from editdecay.core.errors import ConfigError
    from editdecay.core.models import load_model
    from editdecay.core.seeding import seed_everything
    from editdecay.edit.registry import load_patch
    from editdecay.finetune import Recipe
    from editdecay.finetune.run import (
        EditsUnderTest,
        load_finetuned,  # the loader the grid's evaluate stage uses
        run_finetune,
    )
    from editdecay.report.records import training_data

    result = cell.result
    root = a.results.root
    cfg = result["config"]
    ref = cfg["model"]
    if ref.get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(f"model {ref['name']!r} ran with trust_remote_code in this grid; the report does not run "
                          f"code because a results directory says so: pass --trust-remote-code if you trust it")
    cache = Cache(Path(cache_dir)) if cache_dir else Cache.default()
    stage_dir = root / "stages"
    patch = load_patch(stage_dir / result["stages"]["patch"]["id"] / "patch")
    recipe = Recipe.from_dict(cfg["recipe"])

    def load():
        return load_model(ref["name"], dtype=ref.get("dtype", "float32"), device=device, cache=cache,
                          trust_remote_code=trust_remote_code, revision=ref.get("revision"))

    lm = load()
    patch.check_model(lm.identity, where=f"patch of {cell.label}")     # the model directory may have changed
    sets = {"edit": [r.rewrite_prompt for r in patch.requests], "task": _task_prompts(result)}
    states: dict[str, dict[str, torch.Tensor]] = {k: {} for k in sets}
    for k, prompts in sets.items():
        states[k]["M0"] = last_token_states(lm.model, lm.tokenizer, prompts)
    with patch.applied(lm.model):
        for k, prompts in sets.items():
            states[k]["M_e"] = last_token_states(lm.model, lm.tokenizer, prompts)
    del lm
    lm = load()
    mf = load_finetuned(lm, stage_dir / result["stages"]["finetune_base"]["id"] / "run")
    for k, prompts in sets.items():
        states[k]["M_f"] = last_token_states(mf, lm.tokenizer, prompts)
    del lm, mf
    # M_ef again: the stage's seed, data, recipe and patch (the grid keeps no M_ef weights)
    seed_everything(recipe.seed)
    source, _ = training_data(cfg)
    lm = load()
    patch.apply(lm.model)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_finetune(lm, recipe, source, Path(tmp) / "run", save="none", progress=progress,
                           edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, applied=True))
    for k, prompts in sets.items():
        states[k]["M_ef"] = last_token_states(run.model, lm.tokenizer, prompts)
    stored = {r.case_id: r for r in cell.requests}
    again = {r["case_id"]: r["M_ef"] for r in run.result["requests"]}
    same = sum(1 for cid, r in stored.items() if cid in again
               and (again[cid]["efficacy"] >= 0.5) == r.success["M_ef"])
    diffs = [abs(again[cid]["margin"] - r.margin["M_ef"]) for cid, r in stored.items()
             if cid in again and again[cid].get("margin") is not None and r.margin["M_ef"] is not None]
    reproduced = (f"re-trained M_ef matches the stored success of {same}/{len(stored)} requests"
                  + (f", largest margin difference {max(diffs):.2g}" if diffs else ""))
    rows = [row for k in sets for row in shifts(states[k], cell.label, k)]
    return CellShift(cell.label, tuple(rows), reproduced)


def measure_activation_shift(a: Analysis, *, cache_dir=None, device: str = "cpu", max_cells: int | None = None,
                             progress: bool = True, trust_remote_code: bool = False) -> list[CellShift]:
    cells = [c for c in a.results.edited_done if (c.result or {}).get("stages", {}).get("patch")]
    if max_cells is not None:
        cells = cells[:max_cells]
    out = []
    for c in tqdm(cells, desc="activation shift", disable=not progress, leave=False):
        try:
            out.append(cell_shift(a, c, cache_dir=cache_dir, device=device, trust_remote_code=trust_remote_code))
        except Exception as e:       # one cell whose stages are gone must not stop the report
            log.warning("activation shift of %s failed: %s", c.label, e)
            out.append(CellShift(c.label, (), f"not measured: {e}"))
    return out


def activation_shift_table(results: Sequence[CellShift]) -> Table:
    cols = [Column("cell"), Column("prompts"), Column("layer", "int"), Column("n prompts", "int"),
            Column("L2 M_e", "stat"), Column("L2 M_f", "stat"), Column("L2 M_ef", "stat"),
            Column("cos(M_ef, M_e)", "stat"), Column("cos(M_ef, M_f)", "stat"), Column("cos(M_e, M_f)", "stat")]
    rows = [[r.cell, r.prompts, r.layer, r.n, r.l2["M_e"], r.l2["M_f"], r.l2["M_ef"]] + [r.cos[p] for p in PAIRS]
            for s in results for r in s.rows]
    return make_table(
        "activation_shift", "Activation shift per layer",
        "Mean over prompts of the L2 norm of the hidden-state displacement d_X = h_X - h_M0 at the last prompt "
        "token after each block, and the mean cosine similarity between displacements, on the edit prompts and "
        "on task prompts. M_ef is fine-tuned again for this (the grid keeps no M_ef weights).", cols, rows,
        tuple(f"{s.cell}: {s.reproduced}" for s in results))


def activation_figure(results: Sequence[CellShift], path: Path) -> FigureRecord:
    fig = _figure(12, 7)
    axes = fig.subplots(2, 2, squeeze=False)
    rows = [r for s in results for r in s.rows]
    for i, prompts in enumerate(("edit", "task")):
        sub = [r for r in rows if r.prompts == prompts]
        ax_l2, ax_cos = axes[i]
        if not sub:
            _empty(ax_l2, "not measured")
            _empty(ax_cos, "not measured")
            continue
        layers = sorted({r.layer for r in sub})
        n_cells = len({r.cell for r in sub})
        for m in ("M_e", "M_f", "M_ef"):
            ax_l2.plot(layers, [mean(r.l2[m] for r in sub if r.layer == l) for l in layers], "-o", markersize=3,
                       label=m)
        for a, b in PAIRS:
            ys = []
            for l in layers:
                vals = [r.cos[(a, b)] for r in sub if r.layer == l and r.cos[(a, b)] is not None]
                ys.append(mean(vals) if vals else float("nan"))
            ax_cos.plot(layers, ys, "-o", markersize=3, label=f"cos(d_{a}, d_{b})")
        ax_l2.set_title(f"{prompts} prompts: L2 shift from M0 (mean of {n_cells} cells)", fontsize=10)
        ax_cos.set_title(f"{prompts} prompts: cosine of displacements", fontsize=10)
        ax_cos.set_ylim(-1.05, 1.05)
        for ax in (ax_l2, ax_cos):
            ax.set_xlabel("layer (block index)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save(fig, path)
    return FigureRecord("activation_shift", "Activation shift per layer",
                        "Left: mean L2 norm of the hidden-state displacement from M0 at the prompts' last token, "
                        "per layer, for M_e, M_f and M_ef. Right: mean cosine similarity of the displacements. "
                        "Top: edit prompts; bottom: task prompts.", path)


__all__ = ["CellShift", "ShiftRow", "activation_figure", "activation_shift_table", "cell_shift",
           "last_token_states", "measure_activation_shift", "shifts"]
