"""What each stage kind computes. One function per kind; each writes into an empty directory.

Every function receives a `StageContext` (the stage with its typed spec, grid/specs.py; the plan's run-time
settings; read access to finished dependencies; the directory to write into) and writes its files plus
`outputs.json`, a small JSON summary copied into the stage manifest. Everything the output depends on is
in the spec (that is what the stage id hashes); run-time settings (device, threads, batch sizes, cache
location) are not.

Each stage starts from seeded random number generators (`seed_everything(spec.seed)`), loads
its model fresh from disk and changes only that copy, so a stage computed twice, in
another process or on another backend, gives the same numbers on the same
hardware and thread count.

Stage kinds (plan.py explains which cells share which):
- stats     E1 second moments of the edited layers, into the editdecay cache (E1 is cached per layer there;
            the stage records provenance and makes sure the statistics exist before any editor needs them)
- targets   E3 target values of n requests on the base model (`targets/`, edit/target_values.py), beside E1
- patch     E2-E5: the edit of n requests as an EditPatch (`patch/`), taking its E3 values from `targets`
- evaluate  E6 per-request outcomes of M0 (base) or M_f (base + fine-tuned weights) on a cell's requests
- finetune  M_f (base model) or M_ef (patch applied first) fine-tuned with a recipe, with a decay curve (E7)
- cell      the cell's result (fields: core.schema.CellResult), assembled from the stages above
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from editdecay.core.cache import dumps_json
from editdecay.core.checks import check_finite
from editdecay.core.errors import (
    EditDecayError,
    NonFiniteError,  # noqa: F401  (re-exported: grid callers catch it from here)
)
from editdecay.core.models import check_same_weights
from editdecay.core.schema import MODELS
from editdecay.grid.plan import Plan, Stage
from editdecay.grid.specs import (
    CellSpec,
    EvaluateSpec,
    FinetuneSpec,
    PatchSpec,
    StageSpec,
    StatsSpec,
    TargetsSpec,
)
from editdecay.grid.store import GridStore

log = logging.getLogger(__name__)

# A stage that produced NaN or infinite numbers (weights, statistics or metrics) is recorded as failed;
# the check and its error are shared with `editdecay edit` and the Python API (core.checks).
_check_finite = check_finite


@dataclass(frozen=True)
class StageContext:
    stage: Stage
    plan: Plan
    store: GridStore
    out: Path                      # empty directory for this stage's files
    progress: bool = False

    @property
    def spec(self) -> StageSpec:
        return self.stage.spec

    @property
    def runtime(self) -> dict:
        return self.plan.runtime

    def dep_dir(self, sid: str) -> Path:
        if not self.store.is_done(sid):
            raise RuntimeError(f"stage {self.stage.id} needs {sid}, which is not finished")
        return self.store.stage_dir(sid)

    def dep_json(self, sid: str, name: str) -> dict:
        from editdecay.core.files import MAX_RESULT_BYTES, read_json

        return read_json(self.dep_dir(sid) / name, f"stage {sid} output", limit=MAX_RESULT_BYTES, expect=dict)

    def dep_result(self, sid: str) -> dict:
        """A finetune stage's `run/result.json`, read through the schema (older model names renamed)."""
        from editdecay.core.schema import read_result

        return read_result(self.dep_dir(sid) / "run" / "result.json", kind="finetune").model_dump(mode="json")

    def device(self) -> str:
        from editdecay.core.placement import DEFAULT_DEVICE, resolve_device

        return resolve_device(self.runtime.get("device") or DEFAULT_DEVICE)

    def cache(self):
        from editdecay.core.cache import Cache

        root = self.runtime.get("cache_dir")
        return Cache(Path(root)) if root else Cache.default()

    def load_model(self, ref, device: str | None = None):
        """Load a stage's `ModelRef` (on `device`, default the plan's). allow_pickle is a permission (the weights
        are the same either way), so it is a run-time setting, not part of the stage's identity: the plan lists
        the models whose pickled weights may load."""
        permitted = ref.name in self.runtime.get("allow_pickle", ())
        return ref.replace(allow_pickle=permitted).load(device=device or self.device(), cache=self.cache())

    def write_json(self, name: str, obj) -> None:
        (self.out / name).write_text(dumps_json(obj, indent=2) + "\n")     # strict JSON: NaN -> null + status


def _requests(selection):
    ds = selection.load()
    if ds.rejected:
        log.warning(ds.summary())
    return ds


def _edit_inputs(ctx: StageContext, spec: TargetsSpec | PatchSpec):
    """(timer, requests, loaded model) of an edit's stage, with the seconds of loading each in the timer."""
    from editdecay.core.results import Timer

    timer = Timer()
    with timer("load_data"):
        ds = _requests(spec.requests)
    with timer("load_model"):
        lm = ctx.load_model(spec.model)
    return timer, ds, lm


# --------------------------------------------------------------------------- stats


def run_stats(ctx: StageContext) -> None:
    """E1 statistics of one model and layer set, in the editdecay cache (reused by every editor and cell)."""
    from editdecay.data.corpus import parse_corpus
    from editdecay.edit.stats import second_moments

    spec: StatsSpec = ctx.spec
    lm = ctx.load_model(spec.model)
    want = spec.resolve(lm.identity.family, lm.identity.name)
    if want.tolerance is not None:
        # Adaptive E1 stops where the edit keys' solve settles, so it needs the requests: the patch stage runs
        # it (edit.api.build_run) and its checkpoints land in the same cache. Nothing to precompute here.
        ctx.write_json("stats.json", {"equation": "E1", "computed_by": "patch stage",
                                      "adaptive": {"tolerance": want.tolerance, "max_tokens": want.tokens}})
        ctx.write_json("outputs.json", {"layers": list(want.layers), "n_tokens_used": None, "adaptive": True,
                                        "model": lm.identity.to_dict(), "sources": {}})
        return
    stats = second_moments(lm, want.layers, corpus=parse_corpus(want.corpus), n_tokens=want.tokens, dtype=want.dtype,
                           cache=ctx.cache(), batch_size=ctx.runtime.get("stats_batch_size", 16),
                           progress=ctx.progress)
    _check_finite("E1 statistics", {str(l): stats[l] for l in stats.layers})
    ctx.write_json("stats.json", stats.provenance)
    ctx.write_json("outputs.json", {"layers": list(stats.layers), "n_tokens_used": stats.n_tokens_used,
                                    "model": lm.identity.to_dict(), "sources": stats.provenance["source"]})


# --------------------------------------------------------------------------- targets


def run_targets(ctx: StageContext) -> None:
    """E3 target values of the cell's requests on the base model, for the patch stage (reads no E1 statistics)."""
    from editdecay.core.arch import check_layers
    from editdecay.core.devices import input_device
    from editdecay.edit.target_values import compute_target_values

    spec: TargetsSpec = ctx.spec
    timer, ds, lm = _edit_inputs(ctx, spec)
    config = spec.resolve(lm.identity.family, lm.identity.name)
    check_layers(lm.model, [config.layer], field="layers")        # as the edit checks them (edit.api.validate_inputs)
    with timer("targets"):
        values = compute_target_values(lm, config, list(ds.requests), progress=ctx.progress)
    values.save(ctx.out / "targets")
    loss, steps = values.result.loss, values.result.steps
    ctx.write_json("outputs.json", {
        "equation": "E3", "config": config.to_dict(), "n_requests": len(ds.requests),
        "case_ids": list(values.case_ids), "mean_final_loss": sum(loss) / len(loss),
        "mean_steps": sum(steps) / len(steps), "warnings": list(values.warnings), "model": lm.identity.to_dict(),
        "device": str(input_device(lm.model)), "timings": timer.seconds})


# --------------------------------------------------------------------------- patch


def run_patch(ctx: StageContext) -> None:
    """E2-E5: edit the base model with the cell's requests (its E3 values from the targets stage, where it has
    one); save the patch (the model is then discarded)."""
    from editdecay.edit.api import edit_model
    from editdecay.edit.target_values import TargetValues

    spec: PatchSpec = ctx.spec
    timer, ds, lm = _edit_inputs(ctx, spec)
    for sid in ctx.stage.deps:          # the statistics and target values stages, for editors that need them
        check_same_weights(lm.identity, ctx.store.manifest(sid)["outputs"]["model"], f"{ctx.plan.stages[sid].kind} "
                           f"stage {sid}")
    values = TargetValues.load(ctx.dep_dir(spec.targets) / "targets") if spec.targets else None
    cfg = spec.editor.resolve(lm.identity.family, lm.identity.name)
    patch, run = edit_model(lm, spec.editor.name, cfg, list(ds.requests), batch_size=spec.batch_size,
                            cache=ctx.cache(), progress=ctx.progress, target_values=values)
    _check_finite(f"{spec.editor.name} patch", patch.tensors())
    timings = {**timer.seconds, **run.timer.seconds}
    patch.extra["timings"] = timings
    patch.save(ctx.out / "patch")
    ctx.write_json("outputs.json", {
        "editor": spec.editor.name, "editor_config": cfg.to_dict(), "layers": list(patch.layers),
        "n_requests": len(ds.requests), "case_ids": [r.case_id for r in ds.requests], "data": ds.to_dict(),
        "model": lm.identity.to_dict(), "delta_norms": patch.norms(), **run.provenance(), "timings": timings})


# --------------------------------------------------------------------------- evaluate


def run_evaluate(ctx: StageContext) -> None:
    """E6 outcomes of the cell's requests under M0 (`spec.finetune` is None) or M_f (the base + its weights)."""
    from editdecay.finetune.callback import measure
    from editdecay.measure.metrics import aggregate

    spec: EvaluateSpec = ctx.spec
    ds = _requests(spec.requests)
    lm = ctx.load_model(spec.model)
    model = lm.model
    if spec.finetune is not None:
        from editdecay.finetune.run import load_finetuned

        model = load_finetuned(lm, ctx.dep_dir(spec.finetune) / "run")
    control = spec.requests.control(spec.control, at_most=True) if spec.control else ()
    measured, _ = measure(model, lm.tokenizer, [*ds.requests, *control], (),
                          batch_size=ctx.runtime.get("eval_batch_size", 32))
    outcomes, control_outcomes = measured[:len(ds.requests)], measured[len(ds.requests):]
    metrics = aggregate(outcomes)
    _check_finite("evaluation", metrics)
    ctx.write_json("outcomes.json", {"requests": [o.to_dict() for o in outcomes], "metrics": metrics,
                                     "control": [o.to_dict() for o in control_outcomes],
                                     "data": ds.to_dict(), "model": lm.identity.to_dict()})
    ctx.write_json("outputs.json", {"metrics": metrics, "n_requests": len(outcomes)})


# --------------------------------------------------------------------------- finetune


def run_finetune_stage(ctx: StageContext, dist=None) -> None:
    """M_f (base model) or M_ef (the patch applied first): `finetune.run_finetune` with a decay curve.

    With the grid's `shared.finetune_devices` N > 1 the stage runs sharded in N processes
    (`grid.stage_worker`, FSDP; `dist` is this worker's share); process 0 writes the stage's files.

    M_ef measures the patch's requests every `eval_every` steps (step 0 = M_e) and keeps no weights; M_f
    measures only the downstream task and keeps its adapter or weights, which `evaluate` stages read.
    The held-out task (`spec.held_out`) is scored at every curve point; lm-eval downstream tasks
    (`spec.downstream`) are scored on the model handed to fine-tuning (M0 or M_e) and on the fine-tuned one
    (M_f or M_ef), in memory.
    """
    from editdecay.data.sources import load_source
    from editdecay.edit.registry import load_patch
    from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune

    spec: FinetuneSpec = ctx.spec
    devices = int(ctx.runtime.get("finetune_devices") or 1)
    if devices > 1 and dist is None:
        launch_sharded(ctx, devices)
        return
    spec.data.check()
    source_task = spec.data.task() if spec.data.has_held_out() else None
    scored = source_task if spec.held_out == spec.data else (spec.held_out.task() if spec.held_out else None)
    source = load_source(spec.data.spec, task=source_task)
    # lm-eval takes a number; None (the grid's default) would leave E6 to size its own batches.
    downstream = spec.downstream.spec(ctx.runtime.get("eval_batch_size") or 32) if spec.downstream else None
    lm = ctx.load_model(spec.model, device=str(dist.device) if dist is not None else None)
    extra = {"grid_stage": ctx.stage.id}
    if spec.patch is not None:
        patch = load_patch(ctx.dep_dir(spec.patch) / "patch")
        check_same_weights(lm.identity, patch.model_identity, f"patch stage {spec.patch}")
        patch.apply(lm.model)
        selection = ctx.plan.stages[spec.patch].spec.requests
        control = selection.control(spec.control, at_most=True) if spec.control else ()
        edits = EditsUnderTest(requests=patch.requests, layers=patch.layers, applied=True, control=control,
                               deltas=patch.deltas)
        extra["patch"] = {"stage": spec.patch, "editor": patch.editor, "layers": list(patch.layers),
                          "n_requests": len(patch.requests)}
    else:
        edits = EditsUnderTest(layers=spec.resolve_edited_layers(lm.identity.family, lm.identity.name))
    run = run_finetune(lm, spec.recipe, source, ctx.out / "run", edits=edits,
                       measures=Measures(task=scored, eval_every=spec.eval_every, downstream=downstream),
                       save="none" if spec.patch is not None else "auto", progress=ctx.progress, extra=extra,
                       dist=dist)
    if dist is not None and not dist.main:
        return
    r = run.result
    _check_finite("fine-tuning metrics", {"metrics": r["metrics"], "final_loss": r["training"]["final_loss"]})
    ctx.write_json("outputs.json", {"method": spec.recipe.method, "made": spec.made,
                                    "edited_layers": list(edits.layers) if edits.layers else None,
                                    "metrics": r["metrics"], "training": r["training"],
                                    "model": lm.identity.to_dict()})


def launch_sharded(ctx: StageContext, devices: int) -> None:
    """Run `ctx`'s fine-tuning stage in `devices` processes (`grid.stage_worker`, each running
    `run_finetune_stage` with its share); raise EditDecayError if a worker fails."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}", "-m",
           "editdecay.grid.stage_worker", str(ctx.store.root), ctx.stage.id, str(ctx.out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise EditDecayError(f"finetune stage {ctx.stage.id} over {devices} processes failed (exit code "
                             f"{proc.returncode}):\n{tail}")


# --------------------------------------------------------------------------- cell


def _task_keys(metrics: dict | None) -> dict:
    """The downstream keys of a fine-tuning run's metrics: the held-out task's, and lm-eval's where scored."""
    from editdecay.finetune.callback import TASK_KEYS

    m = metrics or {}
    return {k: m.get(k) for k in TASK_KEYS + (("downstream", "downstream_score") if "downstream" in m else ())}


def _stage_info(store: GridStore, sid: str) -> dict:
    m = store.manifest(sid) or {}
    return {"id": sid, "kind": m.get("kind"), "created": m.get("created"), "seconds": m.get("seconds"),
            "host": m.get("host")}


def run_cell(ctx: StageContext) -> None:
    """Assemble one cell's result (fields: core.schema.CellResult) from its stages; computes nothing on a model."""
    from editdecay.core.results import environment, write_result
    from editdecay.core.schema import CellInfo, CellResult

    spec: CellSpec = ctx.spec
    roles = spec.roles.ids()
    base = ctx.plan.stages[roles["finetune_base"]].spec
    base_run = ctx.dep_result(roles["finetune_base"])
    config = {"model": base.model.to_dict(), "editor": None, "recipe": base_run["recipe"],
              "edited_layers": (base_run.get("plan") or {}).get("edited_layers"), "requests": None,
              "finetune_data": base.data.spec, "data_settings": base.data.settings,
              "held_out": base.held_out.to_dict() if base.held_out else None,
              "downstream": list(base.downstream.tasks) if base.downstream else [],
              "downstream_limit": base.downstream.limit if base.downstream else None, "eval_every": base.eval_every}
    m0_task, mf_task = _task_keys(base_run["metrics"]["M0"]), _task_keys(base_run["metrics"]["M_f"])
    training = {"base": base_run["training"]}
    if spec.axes.n_edits == 0:
        metrics, decay, curve, rows, data = {"M0": {"n": 0, **m0_task}, "M_f": {"n": 0, **mf_task}}, {}, [], [], None
        control_rows, mechanism = [], None
    else:
        edited = _Edited.read(ctx, roles)
        metrics = {"M0": {**edited.base_eval["metrics"], **m0_task}, "M_e": edited.run["metrics"]["M_e"],
                   "M_f": {**edited.mf_eval["metrics"], **mf_task}, "M_ef": edited.run["metrics"]["M_ef"]}
        decay, curve, rows, data = edited.run["decay"], edited.run["curve"], edited.rows(ctx), edited.patch["data"]
        control_rows = edited.control_rows(ctx)
        decay = {**decay, **_knowledge_base(control_rows)}
        mechanism = edited.run.get("mechanism")
        # edits kept as modules (GRACE's codebook): frozen or trained by the fine-tuning (finetune/trainable.py)
        training["edited"] = {**edited.run["training"],
                              "module_edits": (edited.run.get("plan") or {}).get("module_edits", {})}
        config.update(editor={"name": edited.patch["editor"], **edited.patch["editor_config"]},
                      requests=ctx.plan.stages[roles["patch"]].spec.requests.to_dict(),
                      edited_layers=edited.patch["layers"])
    _check_finite("cell metrics", metrics)
    result = CellResult(
        grid=ctx.plan.name, cell=CellInfo(id=_cell_id(ctx), label=ctx.stage.label, axes=spec.axes.to_dict()),
        config=config, stages={role: _stage_info(ctx.store, sid) for role, sid in roles.items()},
        model=base_run["model"], data=data, metrics=metrics,
        decay={**decay, "downstream": _downstream(metrics)}, curve=curve, curve_base=base_run["curve"],
        training=training, downstream=_downstream_provenance(base_run), requests=rows, control=control_rows,
        mechanism=mechanism,
        timings={role: (ctx.store.manifest(sid) or {}).get("seconds") for role, sid in roles.items()},
        environment=environment(None))
    write_result(ctx.out / "result.json", result.model_dump(mode="json"))


@dataclass(frozen=True)
class _Edited:
    """What a cell with edits reads from its stages besides M_f's run: the patch stage's outputs, M0's and M_f's
    evaluations and M_ef's run."""

    patch: dict
    base_eval: dict
    mf_eval: dict
    run: dict

    @classmethod
    def read(cls, ctx: StageContext, roles: dict[str, str]) -> "_Edited":
        return cls(ctx.store.manifest(roles["patch"])["outputs"], ctx.dep_json(roles["eval_base"], "outcomes.json"),
                   ctx.dep_json(roles["eval_finetuned_base"], "outcomes.json"),
                   ctx.dep_result(roles["finetune_edited"]))

    def rows(self, ctx: StageContext) -> list[dict]:
        """E7's per-request survival table: each request's outcome, success and margin under every model."""
        from editdecay.measure.decay import success
        from editdecay.measure.metrics import RequestOutcome

        outcomes = {"M0": self.base_eval["requests"], "M_f": self.mf_eval["requests"],
                    "M_e": [r["M_e"] for r in self.run["requests"]], "M_ef": [r["M_ef"] for r in self.run["requests"]]}
        ids = {k: [r["case_id"] for r in v] for k, v in outcomes.items()}
        if any(v != self.patch["case_ids"] for v in ids.values()):
            raise EditDecayError(f"cell {ctx.stage.label}: the stages measured different requests "
                                 f"({ {k: len(v) for k, v in ids.items()} }); the edit data changed between stages")
        table = []
        for i, case_id in enumerate(self.patch["case_ids"]):
            outs = {k: RequestOutcome(**outcomes[k][i]) for k in MODELS}
            ok = {k: success(o) for k, o in outs.items()}
            table.append({"case_id": case_id, **{k: o.to_dict() for k, o in outs.items()}, "success": ok,
                          "margin": {k: o.margin for k, o in outs.items()}, "flipped": ok["M_e"] and not ok["M_ef"]})
        return table

    def control_rows(self, ctx: StageContext) -> list[dict]:
        """The knowledge control's rows: each control fact's outcome and whether each model knows it."""
        from editdecay.measure.knowledge import knows
        from editdecay.measure.metrics import RequestOutcome

        run_rows = self.run.get("control") or []
        m0, mf = self.base_eval.get("control") or [], self.mf_eval.get("control") or []
        ids = [[r["case_id"] for r in m0], [r["case_id"] for r in mf], [r["case_id"] for r in run_rows]]
        if any(x != ids[0] for x in ids):
            raise EditDecayError(f"cell {ctx.stage.label}: the stages measured different control facts "
                                 f"({[len(x) for x in ids]}); the edit data changed between stages")
        table = []
        for i, cid in enumerate(ids[0]):
            outs = {"M0": m0[i], "M_e": run_rows[i]["M_e"], "M_f": mf[i], "M_ef": run_rows[i]["M_ef"]}
            known = {k: knows(RequestOutcome(**o)) for k, o in outs.items()}
            table.append({"case_id": cid, **outs, "known": known,
                          "margin": {k: o.get("margin") for k, o in outs.items()},
                          "flipped": known["M_e"] and not known["M_ef"],
                          "flipped_base": known["M0"] and not known["M_f"]})
        return table


def _knowledge_base(rows: list[dict]) -> dict:
    """decay.knowledge_flip_ratio_base: the knowledge flip ratio of the unedited model, M0 -> M_f."""
    if not rows:
        return {}
    from editdecay.measure.knowledge import knowledge_flip
    from editdecay.measure.metrics import RequestOutcome

    kfr = knowledge_flip([RequestOutcome(**r["M0"]) for r in rows], [RequestOutcome(**r["M_f"]) for r in rows])
    return {"knowledge_flip_ratio_base": kfr.to_dict()}


def _cell_id(ctx: StageContext) -> str:
    for cell in ctx.plan.cells:
        if cell.stages.get("cell") == ctx.stage.id:
            return cell.id
    return ctx.stage.id


def _downstream(metrics: dict) -> dict:
    """decay.downstream: the held-out task's accuracy per model and its changes (top level), and for lm-eval
    tasks the same per task and metric (`tasks`) and for their mean accuracy (`score`)."""
    out = _deltas({k: (v or {}).get("task_accuracy") for k, v in metrics.items()})
    scored = {k: v["downstream"] for k, v in metrics.items() if (v or {}).get("downstream") is not None}
    if scored:
        tasks: dict = {}
        for model, per_task in scored.items():
            for task, values in per_task.items():
                for metric, value in values.items():
                    if metric != "n" and not metric.endswith("_stderr") and metric != "n_tokens":
                        tasks.setdefault(task, {}).setdefault(metric, {})[model] = value
        out["tasks"] = {t: {m: _deltas(v, base_delta=True) for m, v in ms.items()} for t, ms in tasks.items()}
        out["score"] = _deltas({k: metrics[k].get("downstream_score") for k in scored}, base_delta=True)
    return out


def _downstream_provenance(run: dict) -> dict | None:
    """How the lm-eval tasks were scored (lm-eval version, task versions, limit, few-shot), from a run result."""
    d = run.get("downstream")
    return None if d is None else {"spec": d["spec"], "tasks": d["tasks"], "provenance": d["provenance"]}


def _deltas(values: dict, base_delta: bool = False) -> dict:
    """{M0, M_e, M_f, M_ef} plus delta_edit = M_e - M0, delta_finetune = M_ef - M_e and (base_delta)
    delta_finetune_base = M_f - M0, where both sides are known."""
    out = dict(values)
    pairs = [("delta_edit", "M_e", "M0"), ("delta_finetune", "M_ef", "M_e")]
    pairs += [("delta_finetune_base", "M_f", "M0")] if base_delta else []
    for name, a, b in pairs:
        if values.get(a) is not None and values.get(b) is not None:
            out[name] = values[a] - values[b]
    return out


EXECUTORS: dict[str, Callable[[StageContext], None]] = {
    "stats": run_stats, "targets": run_targets, "patch": run_patch, "evaluate": run_evaluate,
    "finetune": run_finetune_stage,
    "cell": run_cell,
}

__all__ = ["EXECUTORS", "NonFiniteError", "StageContext"]
