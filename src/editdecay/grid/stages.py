"""What each stage kind computes. One function per kind; each writes into an empty directory.

Every function receives a `StageContext` (the stage, the plan's run-time settings,
read access to finished dependencies, and the directory to write into) and writes
its files plus `outputs.json`, a small JSON summary copied into the stage manifest.
Everything the output depends on is in `stage.config` (that is what the stage id
hashes); run-time settings (device, threads, batch sizes, cache location) are not.

Each stage starts from seeded random number generators (`seed_everything`), loads
its model fresh from disk and changes only that copy, so a stage computed twice, in
another process or on another backend, gives the same numbers on the same
hardware and thread count.

Stage kinds (plan.py explains which cells share which):
- stats     E1 second moments of the edited layers, into the editdecay cache (E1 is cached per layer there;
            the stage records provenance and makes sure the statistics exist before any editor needs them)
- patch     E2-E5: the edit of n requests as an EditPatch (`patch/`)
- evaluate  E6 per-request outcomes of M0 (base) or M_f (base + fine-tuned weights) on a cell's requests
- finetune  M_f (base model) or M_ef (patch applied first) fine-tuned with a recipe, with a decay curve (E7)
- cell      the cell's result (store.py documents the schema), assembled from the stages above
"""

from __future__ import annotations

import json
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
from editdecay.grid.plan import Plan, Stage
from editdecay.grid.spec import DOWNSTREAM_TASKS
from editdecay.grid.store import CELL_SCHEMA_VERSION, GridStore

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
    def config(self) -> dict:
        return self.stage.config

    @property
    def runtime(self) -> dict:
        return self.plan.runtime

    def dep_dir(self, sid: str) -> Path:
        if not self.store.is_done(sid):
            raise RuntimeError(f"stage {self.stage.id} needs {sid}, which is not finished")
        return self.store.stage_dir(sid)

    def dep_json(self, sid: str, name: str) -> dict:
        return json.loads((self.dep_dir(sid) / name).read_text())

    def device(self) -> str:
        want = self.runtime.get("device") or "auto"
        if want == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return want

    def cache(self):
        from editdecay.core.cache import Cache

        root = self.runtime.get("cache_dir")
        return Cache(Path(root)) if root else Cache.default()

    def load_model(self, ref: dict, device: str | None = None):
        from editdecay.core.models import load_model

        return load_model(ref["name"], dtype=ref["dtype"], device=device or self.device(), cache=self.cache(),
                          trust_remote_code=ref["trust_remote_code"], revision=ref["revision"])

    def write_json(self, name: str, obj) -> None:
        (self.out / name).write_text(dumps_json(obj, indent=2) + "\n")     # strict JSON: NaN -> null + status


def stage_seed(stage: Stage) -> int:
    c = stage.config
    for value in (c.get("requests", {}).get("seed") if isinstance(c.get("requests"), dict) else None,
                  (c.get("recipe") or {}).get("seed"), (c.get("axes") or {}).get("seed")):
        if isinstance(value, int):
            return value
    return 0


def _editor_config(editor: str, concrete: dict | None, fields: dict | None, lm):
    from editdecay.edit import make_config
    from editdecay.edit.workflow import edit_config

    if concrete is not None:
        return make_config(editor, **concrete)
    return edit_config(editor, lm, fields or {})


def _requests(spec: dict):
    from editdecay.data import load_edit_data
    from editdecay.grid.plan import check_data_digest

    check_data_digest(spec["data"], spec.get("digest"))
    ds = load_edit_data(spec["data"], zsre_target=spec["zsre_target"], strict=spec["strict"], limit=spec["n"],
                        seed=spec["seed"])
    if ds.rejected:
        log.warning(ds.summary())
    return ds


# --------------------------------------------------------------------------- stats


def run_stats(ctx: StageContext) -> None:
    """E1 statistics of one model and layer set, in the editdecay cache (reused by every editor and cell)."""
    from editdecay.data.corpus import parse_corpus
    from editdecay.edit.stats import second_moments

    c = ctx.config
    lm = ctx.load_model(c["model"])
    if "layers" in c:
        layers, corpus, tokens, dtype = c["layers"], c["corpus"], c["tokens"], c["dtype"]
        tolerance = c.get("tolerance")
    else:
        cfg = _editor_config(c["editor"], None, c["fields"], lm)
        layers, corpus, tokens, dtype = cfg.layers, cfg.stats_corpus, cfg.stats_tokens, cfg.stats_dtype
        tolerance = cfg.stats_tolerance
    if tolerance is not None:
        # Adaptive E1 stops where the edit keys' solve settles, so it needs the requests: the patch stage runs
        # it (edit.api.build_run) and its checkpoints land in the same cache. Nothing to precompute here.
        ctx.write_json("stats.json", {"equation": "E1", "adaptive": {"tolerance": tolerance, "max_tokens": tokens},
                                      "computed_by": "patch stage"})
        ctx.write_json("outputs.json", {"layers": list(layers), "n_tokens_used": None, "model": lm.identity.to_dict(),
                                        "sources": {}, "adaptive": True})
        return
    stats = second_moments(lm, layers, corpus=parse_corpus(corpus), n_tokens=tokens, dtype=dtype, cache=ctx.cache(),
                           batch_size=ctx.runtime.get("stats_batch_size", 16), progress=ctx.progress)
    _check_finite("E1 statistics", {str(l): stats[l] for l in stats.layers})
    ctx.write_json("stats.json", stats.provenance)
    ctx.write_json("outputs.json", {"layers": list(stats.layers), "n_tokens_used": stats.n_tokens_used,
                                    "model": lm.identity.to_dict(), "sources": stats.provenance["source"]})


# --------------------------------------------------------------------------- patch


def run_patch(ctx: StageContext) -> None:
    """E2-E5: edit the base model with the cell's requests; save the patch (the model is then discarded)."""
    from editdecay.core.results import Timer
    from editdecay.edit.api import edit_model

    c = ctx.config
    stats_out = ctx.store.manifest(ctx.stage.deps[0])["outputs"]
    timer = Timer()
    with timer("load_data"):
        ds = _requests(c["requests"])
    with timer("load_model"):
        lm = ctx.load_model(c["model"])
    check_same_weights(lm.identity, stats_out["model"], f"statistics stage {ctx.stage.deps[0]}")
    cfg = _editor_config(c["editor"], c["editor_config"], c["editor_fields"], lm)
    patch, run = edit_model(lm, c["editor"], cfg, list(ds.requests), batch_size=c["batch_size"], cache=ctx.cache(),
                            progress=ctx.progress)
    _check_finite(f"{c['editor']} patch", patch.deltas)
    timings = {**timer.seconds, **run.timer.seconds}
    patch.extra["timings"] = timings
    patch.save(ctx.out / "patch")
    ctx.write_json("outputs.json", {
        "editor": c["editor"], "editor_config": cfg.model_dump(mode="json"), "layers": list(patch.layers),
        "n_requests": len(ds.requests), "case_ids": [r.case_id for r in ds.requests], "data": ds.to_dict(),
        "model": lm.identity.to_dict(), "delta_norms": patch.norms(), "targets": run.target_log,
        "statistics": run.stats_provenance, "timings": timings})


# --------------------------------------------------------------------------- evaluate


def run_evaluate(ctx: StageContext) -> None:
    """E6 outcomes of the cell's requests under M0 (config.finetune is None) or M_f (the base + its weights)."""
    from editdecay.finetune.callback import measure
    from editdecay.measure.metrics import aggregate

    c = ctx.config
    ds = _requests(c["requests"])
    lm = ctx.load_model(c["model"])
    model = lm.model
    if c["finetune"] is not None:
        from editdecay.finetune.run import load_finetuned

        model = load_finetuned(lm, ctx.dep_dir(c["finetune"]) / "run")
    outcomes, _ = measure(model, lm.tokenizer, list(ds.requests), (),
                          batch_size=ctx.runtime.get("eval_batch_size", 32))
    metrics = aggregate(outcomes)
    _check_finite("evaluation", metrics)
    ctx.write_json("outcomes.json", {"requests": [o.to_dict() for o in outcomes], "metrics": metrics,
                                     "data": ds.to_dict(), "model": lm.identity.to_dict()})
    ctx.write_json("outputs.json", {"metrics": metrics, "n_requests": len(outcomes)})


# --------------------------------------------------------------------------- finetune


def _edited_layers(spec, lm) -> tuple[int, ...] | None:
    if spec is None:
        return None
    if isinstance(spec, list):
        return tuple(spec)
    if spec.get("layers"):
        return tuple(spec["layers"])
    from editdecay.edit.presets import preset_for

    return tuple(preset_for(spec["editor"], lm.identity.family, lm.identity.name)["layers"])


def run_finetune_stage(ctx: StageContext, dist=None) -> None:
    """M_f (base model) or M_ef (the patch applied first): `finetune.run_finetune` with a decay curve.

    With the grid's `shared.finetune_devices` N > 1 the stage runs sharded in N processes
    (`grid.stage_worker`, FSDP; `dist` is this worker's share); process 0 writes the stage's files.

    M_ef measures the patch's requests every `eval_every` steps (step 0 = M_e) and keeps no weights; M_f
    measures only the downstream task and keeps its adapter or weights, which `evaluate` stages read.
    The held-out task (`embedded` or `chatterbot` in `downstream`, `plan.task_objects`) is scored at every curve
    point; lm-eval downstream tasks (everything else in `downstream`) are scored on the model handed to
    fine-tuning (M0 or M_e) and on the fine-tuned one (M_f or M_ef), in memory.
    """
    from editdecay.edit.patch import EditPatch
    from editdecay.finetune import Recipe, load_source, run_finetune
    from editdecay.grid.plan import check_data_digest, task_objects

    c = ctx.config
    devices = int(ctx.runtime.get("finetune_devices") or 1)
    if devices > 1 and dist is None:
        launch_sharded(ctx, devices)
        return
    recipe = Recipe.from_dict(c["recipe"])
    source_task, scored_task = task_objects(c)
    check_data_digest(c["data"], c.get("data_digest"))
    source = load_source(c["data"], task=source_task)
    lm = ctx.load_model(c["model"], device=str(dist.device) if dist is not None else None)
    requests, edited = (), _edited_layers(c["edited_layers"], lm)
    extra = {"grid_stage": ctx.stage.id}
    if c["patch"] is not None:
        patch = EditPatch.load(ctx.dep_dir(c["patch"]) / "patch")
        check_same_weights(lm.identity, patch.model_identity, f"patch stage {c['patch']}")
        patch.apply(lm.model)
        requests, edited = patch.requests, patch.layers
        extra["patch"] = {"stage": c["patch"], "editor": patch.editor, "layers": list(patch.layers),
                          "n_requests": len(patch.requests)}
    run = run_finetune(lm, recipe, source, ctx.out / "run", requests=requests, edited_layers=edited,
                       task=scored_task, eval_every=c["eval_every"],
                       save="none" if c["patch"] is not None else "auto", progress=ctx.progress, extra=extra,
                       downstream=_downstream_spec(c, ctx.runtime), dist=dist)
    if dist is not None and not dist.main:
        return
    r = run.result
    _check_finite("fine-tuning metrics", {"metrics": r["metrics"], "final_loss": r["training"]["final_loss"]})
    ctx.write_json("outputs.json", {"method": recipe.method, "edited_layers": list(edited) if edited else None,
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


def _downstream_spec(c: dict, runtime: dict):
    """The lm-eval part of a finetune stage's `downstream` list, or None; its data must be what was planned."""
    tasks = [t for t in c["downstream"] if t not in DOWNSTREAM_TASKS]
    if not tasks:
        return None
    from editdecay.core.errors import DataError
    from editdecay.measure.downstream import DownstreamSpec, task_digest

    for t in tasks:
        planned, now = (c.get("downstream_digests") or {}).get(t), task_digest(t)
        if planned is not None and now != planned:
            raise DataError(f"downstream task {t!r} changed since this grid was planned (content {planned} -> "
                            f"{now}); run `editdecay grid run` again: it plans anew")
    return DownstreamSpec(tuple(tasks), limit=c.get("downstream_limit"),
                          batch_size=runtime.get("eval_batch_size", 32))


# --------------------------------------------------------------------------- cell


def _task_keys(metrics: dict | None) -> dict:
    """The downstream keys of a finetune stage's metrics: the embedded task's, and lm-eval's where scored."""
    m = metrics or {}
    keys = ("task_accuracy", "task_prefix_accuracy", "task_token_accuracy", "task_nll", "n_task", "task_name") + \
        (("downstream", "downstream_score") if "downstream" in m else ())
    return {k: m.get(k) for k in keys}


def _stage_info(store: GridStore, sid: str) -> dict:
    m = store.manifest(sid) or {}
    return {"id": sid, "kind": m.get("kind"), "created": m.get("created"), "seconds": m.get("seconds"),
            "host": m.get("host")}


def run_cell(ctx: StageContext) -> None:
    """Assemble one cell's result (schema in store.py) from its stages; computes nothing on a model."""
    from editdecay.core.results import environment, write_result
    from editdecay.measure.decay import success
    from editdecay.measure.metrics import RequestOutcome

    c = ctx.config
    roles, axes = c["roles"], c["axes"]
    stage_of = {role: ctx.plan.stages[sid] for role, sid in roles.items()}
    base_run = ctx.dep_json(roles["finetune_base"], "run/result.json")
    ft_conf = stage_of["finetune_base"].config
    result = {
        "kind": "grid-cell", "cell_schema_version": CELL_SCHEMA_VERSION, "grid": ctx.plan.name,
        "cell": {"id": _cell_id(ctx), "label": ctx.stage.label, "axes": axes},
        "config": {"model": ft_conf["model"], "editor": None, "recipe": base_run["recipe"],
                   "edited_layers": (base_run.get("plan") or {}).get("edited_layers"), "requests": None,
                   "finetune_data": ft_conf["data"], "task": ft_conf["task"],
                   **({"chatterbot": ft_conf["chatterbot"]} if ft_conf.get("chatterbot") is not None else {}),
                   "downstream": ft_conf["downstream"],
                   "downstream_limit": ft_conf.get("downstream_limit"), "eval_every": ft_conf["eval_every"]},
        "stages": {role: _stage_info(ctx.store, sid) for role, sid in roles.items()},
        "model": base_run["model"], "data": None,
        "training": {"base": base_run["training"]},
        "curve_base": base_run["curve"],
        "downstream": _downstream_provenance(base_run),
        "timings": {role: (ctx.store.manifest(sid) or {}).get("seconds") for role, sid in roles.items()},
    }
    m0_task, mf_task = _task_keys(base_run["metrics"]["post"]), _task_keys(base_run["metrics"]["finetuned"])
    if axes["n_edits"] == 0:
        result["metrics"] = {"M0": {"n": 0, **m0_task}, "M_f": {"n": 0, **mf_task}}
        result["decay"] = {"downstream": _downstream(result["metrics"])}
        result["curve"], result["requests"] = [], []
    else:
        patch_out = ctx.store.manifest(roles["patch"])["outputs"]
        base_eval = ctx.dep_json(roles["eval_base"], "outcomes.json")
        mf_eval = ctx.dep_json(roles["eval_finetuned_base"], "outcomes.json")
        edited_run = ctx.dep_json(roles["finetune_edited"], "run/result.json")
        rows = {"M0": base_eval["requests"], "M_f": mf_eval["requests"],
                "M_e": [r["post"] for r in edited_run["requests"]],
                "M_ef": [r["finetuned"] for r in edited_run["requests"]]}
        ids = {k: [r["case_id"] for r in v] for k, v in rows.items()}
        if any(v != patch_out["case_ids"] for v in ids.values()):
            raise EditDecayError(f"cell {ctx.stage.label}: the stages measured different requests "
                                 f"({ {k: len(v) for k, v in ids.items()} }); the edit data changed between stages")
        result["metrics"] = {
            "M0": {**base_eval["metrics"], **m0_task}, "M_e": edited_run["metrics"]["post"],
            "M_f": {**mf_eval["metrics"], **mf_task}, "M_ef": edited_run["metrics"]["finetuned"]}
        result["decay"] = {**edited_run["decay"], "downstream": _downstream(result["metrics"])}
        result["curve"] = edited_run["curve"]
        result["training"]["edited"] = edited_run["training"]
        result["config"].update(editor={"name": patch_out["editor"], **patch_out["editor_config"]},
                                requests=stage_of["patch"].config["requests"],
                                edited_layers=patch_out["layers"])
        result["data"] = patch_out["data"]
        table = []
        for i, case_id in enumerate(patch_out["case_ids"]):
            outs = {k: RequestOutcome(**rows[k][i]) for k in ("M0", "M_e", "M_f", "M_ef")}
            ok = {k: success(o) for k, o in outs.items()}
            table.append({"case_id": case_id, **{k: o.to_dict() for k, o in outs.items()}, "success": ok,
                          "margin": {k: o.margin for k, o in outs.items()}, "flipped": ok["M_e"] and not ok["M_ef"]})
        result["requests"] = table
    _check_finite("cell metrics", result["metrics"])
    result["environment"] = environment(None)
    write_result(ctx.out / "result.json", result)


def _cell_id(ctx: StageContext) -> str:
    for cell in ctx.plan.cells:
        if cell.stages.get("cell") == ctx.stage.id:
            return cell.id
    return ctx.stage.id


def _downstream(metrics: dict) -> dict:
    """decay.downstream: the embedded task's accuracy per model and its changes (top level, as always), and
    for lm-eval tasks the same per task and metric (`tasks`) and for their mean accuracy (`score`)."""
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
    "stats": run_stats, "patch": run_patch, "evaluate": run_evaluate, "finetune": run_finetune_stage,
    "cell": run_cell,
}

__all__ = ["EXECUTORS", "NonFiniteError", "StageContext", "stage_seed"]
