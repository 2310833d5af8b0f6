"""One fine-tuning experiment: measure, (edit), fine-tune with a decay curve, measure, write a self-describing result.

`result.json` names the models as everywhere else (core/schema.py MODELS, docs/METHODS.md E7):
- `metrics.M0`          the unedited base model (measured first when the edit is applied here: `EditsUnderTest.apply`)
- `metrics.M_e` / `M0`  the model as handed to fine-tuning (M_e when it carries the edit; step 0 of the curve)
- `metrics.M_ef` / `M_f` after the last step (M_ef when edited, M_f when not; the last point of the curve)
With `downstream` tasks (editdecay.measure.downstream, scored through lm-eval on the model in memory), each model also
has `downstream` ({lm-eval task: {metric: value, ..., n}}) and `downstream_score` (mean accuracy, the study's
DS), and `result.downstream` records the task specs, lm-eval's provenance and the seconds each scoring took.
The same model objects are scored as the edit metrics: M0 before the edit, the handed model before training,
the fine-tuned one after the last step (a PeftModel with its adapters unmerged).
plus the curve, per-request outcomes under each model, the Edit Flip Ratio and relative decreases between the
model before and after fine-tuning, the recipe, the resolved plan and trainable parameter names, data identity,
timings and the environment. With control facts (`EditsUnderTest.control`, measure/knowledge.py) `control` holds
their per-model outcomes and `decay` the knowledge flip ratio, the edits-vs-known test and the survival curves
(measure/decay_time.py); with the edit's deltas (`EditsUnderTest.deltas`) `mechanism` holds the interference
measure per edited layer and request (measure/interference.py). Results written before the models were named
this way (`pre`, `post`,
`finetuned`) read through core/schema.py under these names.

Files in the output directory:
  result.json          written atomically at the end (also on divergence, with `status: diverged`)
  train_log.jsonl      one line per optimiser step (+ eval events), flushed as it goes
  curve.jsonl          one line per evaluation, flushed as it goes
  request_curve.jsonl  one line per evaluation: each edit's success and margin, each control fact's (measure/decay_time.py)
  downstream_predictions.jsonl   with `commonsense:` downstream tasks: one line per (model, task, record): the
                       generated response, the extracted answer word, the gold answer, correct or not
  adapter/             LoRA/DoRA adapter (peft format, safetensors)
  weights.safetensors  merged / fine-tuned tensors (only the ones fine-tuning can change), by model name
Both are written under unique temporary names and renamed into place when complete; with overwrite, every
output of the previous run (adapter/ included) is removed first.

The model object is changed in place (edit applied, weights trained or adapters merged); the returned
`FinetuneRun.model` is the model to use afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from editdecay.core.cache import ordinary_permissions, temp_dir, temp_file
from editdecay.core.devices import input_device
from editdecay.core.errors import ConfigError, EditDecayError
from editdecay.core.outputs import check_output_dir
from editdecay.core.models import LoadedModel, check_same_weights
from editdecay.core.request import EditRequest
from editdecay.core.results import Timer, environment, write_result
from editdecay.data.instructions import tokenize
from editdecay.data.source import HeldOutTask, Source
from editdecay.finetune.callback import DecayCallback, measure, stage_from
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.train import DivergedError, TrainOutcome, total_optimizer_steps, train, warmup_steps
from editdecay.finetune.trainable import changed_tensors, merge, module_edits, resolve_plan
from editdecay.measure.decay import edit_flip_ratio, relative_decrease, success
from editdecay.measure.decay_time import REQUEST_CURVE_FILE
from editdecay.measure.downstream import DownstreamSpec

if TYPE_CHECKING:
    from editdecay.finetune.distributed import DistContext

log = logging.getLogger(__name__)

SAVE_CHOICES = ("auto", "adapter", "merged", "both", "none")
RESULT_FILE, LOG_FILE, CURVE_FILE = "result.json", "train_log.jsonl", "curve.jsonl"
PREDICTIONS_FILE = "downstream_predictions.jsonl"
ADAPTER_DIR, WEIGHTS_FILE = "adapter", "weights.safetensors"


@dataclass
class FinetuneRun:
    result: dict
    out: Path
    model: nn.Module        # merged plain model when merged, else the trained model (PeftModel for unmerged adapters)


@dataclass(frozen=True)
class EditsUnderTest:
    """The edits a fine-tuning run measures (explicit, so it does not depend on patch internals).

    `requests`: measured at every curve point (E6); `layers`: the edited layers, what `edited`/`non-edited` recipes
    train; `apply(model)`: applies the edit in place after M0 is measured; `applied`: the model handed in carries
    the edit already. With `apply` or `applied` the models are M0 -> M_e -> M_ef, else M0 -> M_f."""

    requests: Sequence[EditRequest] = ()
    layers: tuple[int, ...] | None = None
    apply: Callable[[nn.Module], object] | None = None
    applied: bool = False
    control: Sequence[EditRequest] = ()        # knowledge-control facts (not edited), measured like `requests`
    deltas: dict | None = None                 # the edit's weight deltas by module name (mechanism measure)

    @property
    def edited(self) -> bool:
        return self.apply is not None or self.applied

    @property
    def models(self) -> tuple[str, str]:
        """(the model handed to fine-tuning, the fine-tuned model), as results name them."""
        return ("M_e", "M_ef") if self.edited else ("M0", "M_f")


@dataclass(frozen=True)
class Measures:
    """What a fine-tuning run scores besides the edits: `task`'s held-out split at every curve point (anything with
    `records() -> (train, test)` and `identity()`, data/source.py HeldOutTask; None: no task), at the steps `eval_every`
    steps (0: first and last only), and lm-eval `downstream` tasks before and after (None: none)."""

    task: HeldOutTask | None = None
    eval_every: int | tuple[int, ...] = 0       # finetune/schedule.py: every k steps, or a list of steps
    downstream: DownstreamSpec | Sequence[str] | None = None


def run_finetune(lm: LoadedModel, recipe: Recipe, source: Source, out: Path, *, edits: EditsUnderTest | None = None,
                 measures: Measures | None = None, save: str = "auto", overwrite: bool = False,
                 progress: bool = True, extra: dict | None = None, dist: "DistContext | None" = None) -> FinetuneRun:
    """Run one fine-tuning experiment and write `out/result.json` (see module docstring).

    `edits`: the edits under test (default: none); `measures`: the held-out task, curve spacing and lm-eval tasks
    (default: none). `extra` is recorded as is under `extra` (e.g. patch provenance).
    `dist`: this process's share of a sharded run (`finetune.distributed`; full fine-tuning, no downstream
    tasks): every process trains and evaluates, process 0 writes the directory and gets the result; the
    others return a FinetuneRun with an empty result.
    Raises ConfigError for a bad `save` or recipe/data conflict before anything is measured.
    """
    edits, measures = edits or EditsUnderTest(), measures or Measures()
    out = Path(out)
    if save not in SAVE_CHOICES:
        raise ConfigError(f"save={save!r} is not valid; use one of {', '.join(SAVE_CHOICES)}")
    if save == "auto":
        save = "merged" if recipe.method == "full" else "adapter"
    if recipe.method == "full" and save in ("adapter", "both"):
        raise ConfigError(f"save={save!r}: method='full' has no adapter; use save='merged' or 'none'")
    check_output_dir(out, kind="finetune", overwrite=overwrite, overwrite_flag="overwrite=True (--overwrite)")
    if dist is not None:
        from editdecay.finetune.distributed import check_shardable

        if recipe.method != "full" or measures.downstream:
            raise ConfigError(f"--devices {dist.world}: sharded runs support method='full' without downstream "
                              f"tasks (got method={recipe.method!r}, downstream={measures.downstream!r})")
        check_shardable(lm.model, recipe, dist.world)
    main = dist is None or dist.main
    timer = Timer()
    model, tok = lm.model, lm.tokenizer
    # Everything that can be wrong with the recipe or the data fails here, before any evaluation or training.
    plan = resolve_plan(recipe, model, edits.layers)
    with timer("tokenize"):
        data = tokenize(source, tok, cutoff_len=recipe.cutoff_len, template=recipe.template,
                        train_on_prompt=recipe.train_on_prompt)
    log.info("%s fine-tuning: layers %s, %d target modules, %d examples (%d loss tokens)", recipe.method,
             list(plan.layers), len(plan.modules), len(data.examples), data.identity["n_loss_tokens"])
    scorer = _Downstream.load(measures.downstream, timer, out) if measures.downstream else None   # bad task: now
    warnings = _zero_effect(recipe, len(data.examples))
    for w in warnings:
        log.warning(w)
    if main:                            # every setting is valid: only now is an old run's output removed
        _prepare_dir(out, overwrite)
    if dist is not None:
        import torch.distributed

        torch.distributed.barrier()         # process 0 has cleared the directory
    task = measures.task
    task_records = task.records()[1] if task is not None else ()
    task_name = task.identity().get("name") if task is not None else None
    callback = DecayCallback(edits.requests, task_records, every=measures.eval_every, template=recipe.template,
                             path=out / CURVE_FILE if main else None, task_name=task_name, control=edits.control,
                             examples_per_step=recipe.batch_size * recipe.grad_accum,
                             request_path=out / REQUEST_CURVE_FILE if main else None)
    device = input_device(model)
    before, after = edits.models
    result = {
        "kind": "finetune", "status": "running", "model": lm.identity.to_dict(), "recipe": recipe.to_dict(),
        "plan": plan.to_dict(), "data": data.identity, "task": task.identity() if task is not None else None,
        "eval_every": measures.eval_every, "models": {"before": before, "after": after}, "extra": extra or {},
        "warnings": warnings,
    }
    if scorer is not None:
        result["downstream"] = scorer.record
    base_outcomes = base_control = None
    if edits.apply is not None:
        with timer("eval_pre"):
            measured, base_task = measure(model, tok, [*edits.requests, *edits.control], task_records,
                                          template=recipe.template)
            base_outcomes, base_control = measured[:len(edits.requests)], measured[len(edits.requests):]
        if scorer is not None:
            scorer.score("M0", model, tok)
        with timer("apply_edit"):
            edits.apply(model)
        # A patch of module state (GRACE) attaches modules: the plan records them and whether they train.
        plan = dataclasses.replace(plan, module_edits=module_edits(model))
        result["plan"] = plan.to_dict()
    if scorer is not None:
        scorer.score(before, model, tok)
    mechanism = _Mechanism.prepare(model, tok, edits) if edits.deltas and edits.requests else None
    try:
        with timer("train"):
            outcome = train(model, tok, recipe, data, plan=plan, callback=callback, log_path=out / LOG_FILE,
                            progress=progress, dist=dist)
    except DivergedError as e:
        if not main:
            raise
        result.update(status="diverged", error=str(e), curve=callback.points, timings=timer.seconds,
                      environment=environment(device=str(device)))
        write_result(out / RESULT_FILE, result)
        raise
    last = outcome.steps
    if dist is not None:
        from editdecay.finetune.distributed import gather_state

        state = gather_state(outcome.model, dist)          # every process takes part; process 0 gets the tensors
        if not main:
            return FinetuneRun({}, out, outcome.model)
        outcome.model = _unsharded(lm, state)
    if scorer is not None:
        scorer.score(after, outcome.model, tok)
    metrics = {before: callback.stage_metrics(0), after: callback.stage_metrics(last)}
    if base_outcomes is not None:
        metrics = {"M0": stage_from(base_outcomes, base_task, task_name), **metrics}
    if scorer is not None:
        for name in metrics:
            metrics[name].update(scorer.stage(name))
    mech = mechanism.measure(outcome.model, plan, _survived(callback, last)) if mechanism else None
    final_model, outputs, merge_check = _save(outcome, save, out, timer, tok)
    result.update(
        status="done", trainable_parameters=outcome.trainable_parameters,
        n_trainable_parameters=outcome.n_trainable, training=_training_summary(outcome), metrics=metrics,
        decay=_decay(callback, metrics, last, before, after, edits) if edits.requests or edits.control else None,
        curve=[{k: p[k] for k in p if k != "eval_seconds"} for p in callback.points],
        requests=_per_request(edits.requests, base_outcomes, callback.outcomes[0], callback.outcomes[last],
                              before, after),
        control=_control(edits, base_control if base_outcomes is not None else None, callback, last, before,
                         after),
        mechanism=mech,
        outputs=outputs, merge_check=merge_check, measured_model=_measured_model(outcome, lm, outputs), timings=timer.seconds,
        environment=environment(device=str(device)),
    )
    write_result(out / RESULT_FILE, result)
    return FinetuneRun(result, out, final_model)


@dataclass
class _Downstream:
    """The downstream tasks of one run: loaded once (data read before any model work), scored per stage."""

    loaded: object                                 # downstream.LoadedTasks
    timer: Timer
    out: Path
    results: dict = field(default_factory=dict)    # stage -> DownstreamResult
    record: dict = field(default_factory=dict)     # `result.downstream`, filled in as stages are scored

    @classmethod
    def load(cls, downstream, timer: Timer, out: Path) -> "_Downstream":
        from editdecay.measure.downstream import load_tasks

        spec = downstream if isinstance(downstream, DownstreamSpec) else DownstreamSpec.parse(downstream)
        with timer("downstream_load"):
            loaded = load_tasks(spec)
        return cls(loaded, timer, out, record={"spec": spec.to_dict(), "tasks": loaded.names, "provenance": None,
                                               "seconds": {}})

    def score(self, stage: str, model: nn.Module, tokenizer) -> None:
        from editdecay.measure.downstream import evaluate_downstream

        log.info("downstream (%s): scoring %s", stage, ", ".join(self.loaded.names))
        with self.timer(f"downstream_{stage}"):
            res = evaluate_downstream(model, tokenizer, self.loaded)
        self.results[stage] = res
        self.record["provenance"] = res.provenance
        self.record["seconds"][stage] = round(res.seconds, 3)
        if res.predictions:
            from editdecay.core.cache import dumps_json

            with open(self.out / PREDICTIONS_FILE, "a", encoding="utf-8") as f:
                for task, rows in res.predictions.items():
                    for row in rows:
                        f.write(dumps_json({"model": stage, "task": task, **row}) + "\n")
            self.record["predictions"] = PREDICTIONS_FILE

    def stage(self, stage: str) -> dict:
        res = self.results[stage]
        return {"downstream": res.tasks, "downstream_score": res.score}


def load_finetuned(lm: LoadedModel, run_dir: Path) -> nn.Module:
    """Base model + the fine-tuned weights of a finished run directory (`run_finetune(out=run_dir)`): the adapter
    (LoRA/DoRA, unmerged, as it was measured during training) or the saved tensors (full fine-tuning).
    Returns the model to measure. Raises EditDecayError if the run was made on other weights."""
    from editdecay.core.schema import read_result

    result = read_result(run_dir / RESULT_FILE, kind="finetune").model_dump(mode="json")
    check_same_weights(lm.identity, result.get("model"), f"fine-tuning run {run_dir}")
    outputs = result.get("outputs", {})
    if "adapter" in outputs:
        from peft import PeftModel

        adapter = run_dir / outputs["adapter"]
        if not (adapter / "adapter_model.safetensors").is_file():
            # peft would fall back to a pickled adapter_model.bin; editdecay loads safetensors only (core.models)
            files = sorted(p.name for p in adapter.iterdir()) if adapter.is_dir() else []
            raise EditDecayError(f"fine-tuning run {run_dir}: {adapter} holds no adapter_model.safetensors "
                                 f"(files: {', '.join(files) or 'none'}); editdecay loads adapters from safetensors only")
        return PeftModel.from_pretrained(lm.model, str(adapter))
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / outputs["weights"]))
    params = dict(lm.model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise EditDecayError(f"fine-tuned weights in {run_dir} name {unknown[0]!r}, which this model does not have")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
    return lm.model


def _prepare_dir(out: Path, overwrite: bool) -> None:
    """Make `out` ready for this run, once every setting is known to be valid (`check_output_dir` refused a
    directory holding another run, or this kind's without overwrite, before anything was computed).

    With overwrite, every output of the old run is removed, `adapter/` included, so nothing of it can be mistaken
    for this run's. Outputs of a run that was interrupted (logs or a curve, but no result.json) are removed with a
    warning naming them: such a run cannot be resumed (its optimiser state was never saved), and its partial logs
    are no result anyone could lose. Leftovers of killed saves go too."""
    check_output_dir(out, kind="finetune", overwrite=overwrite, overwrite_flag="overwrite=True (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    stale = [out / n for n in (RESULT_FILE, LOG_FILE, CURVE_FILE, WEIGHTS_FILE, ADAPTER_DIR, PREDICTIONS_FILE,
                               REQUEST_CURVE_FILE) if os.path.lexists(out / n)]
    if stale and not overwrite:         # no result.json (check_output_dir): an interrupted run's partial outputs
        log.warning("%s holds the partial outputs of an interrupted fine-tuning run (%s, no %s); removing them and "
                    "starting again (a run is not resumed from its logs)", out, ", ".join(p.name for p in stale),
                    RESULT_FILE)
    for p in stale + [p for n in (ADAPTER_DIR, WEIGHTS_FILE) for p in out.glob(f".{n}.*.tmp")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _zero_effect(recipe: Recipe, n_examples: int) -> list[str]:
    """Warnings for a run that cannot do what its recipe says: a warm-up as long as the run keeps the learning rate
    below `learning_rate` at every step (the study preset's 100 warm-up steps with --steps 3 train at 2e-6..6e-6)."""
    total = total_optimizer_steps(recipe, n_examples)
    warm = warmup_steps(recipe, total)
    if warm >= total and recipe.lr_scheduler != "constant":
        peak = recipe.learning_rate * total / warm if warm else recipe.learning_rate
        return [f"the run never leaves warm-up: {warm} warm-up step(s) for a run of {total}, so the learning rate "
                f"rises to {peak:.2g} at most, not learning_rate={recipe.learning_rate:g}; shorten the warm-up "
                f"(--warmup-steps) or train longer (--steps)"]
    return []


def _training_summary(o: TrainOutcome) -> dict:
    return {"steps": o.steps, "epochs_seen": round(o.epochs_seen, 4), "tokens": o.tokens,
            "loss_tokens": o.loss_tokens, "train_seconds": o.train_seconds,
            "tokens_per_second": round(o.tokens_per_second, 2), "final_loss": o.final_loss,
            "precision": o.precision}


def _save(o: TrainOutcome, save: str, out: Path, timer: Timer, tokenizer=None) -> tuple[nn.Module, dict, dict | None]:
    """Write the adapter and/or the merged weights; returns the model to use afterwards."""
    from safetensors.torch import save_file

    outputs = {"result": RESULT_FILE, "log": LOG_FILE, "curve": CURVE_FILE}
    model, merge_check = o.model, None
    with timer("save"):
        if save in ("adapter", "both"):
            _publish(out / ADAPTER_DIR, lambda tmp: model.save_pretrained(tmp), directory=True)
            outputs["adapter"] = ADAPTER_DIR
        if save in ("merged", "both"):
            if o.plan.method != "full":
                model, merge_check, tensors = _merge_checked(model, o.plan, tokenizer)
            else:
                tensors = changed_tensors(model, o.plan)
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
            _publish(out / WEIGHTS_FILE, lambda tmp: save_file(
                tensors, str(tmp), metadata={"method": o.plan.method, "content": "tensors changed by fine-tuning",
                                             "dtype": ",".join(dtypes)}))
            outputs["weights"] = WEIGHTS_FILE
            outputs["weights_dtype"] = ",".join(dtypes)
    return model, outputs, merge_check


def _publish(target: Path, write: Callable[[Path], object], directory: bool = False) -> None:
    """Write an output under a unique temporary name beside `target`, then rename it into place (replacing an
    older one). A save that fails or is killed leaves no half-written `adapter/` or weights file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target) if directory else temp_file(target)      # ordinary permissions, like every result
    try:
        write(tmp)
        ordinary_permissions(tmp)           # safetensors and save_pretrained write 0600 files
        if directory and target.exists():     # a directory cannot be renamed over: move the old one aside first
            aside = temp_dir(target)
            os.replace(target, aside / target.name)
            os.rename(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


MERGE_RTOL = 1e-4          # of max(1, max |logit|): the float32 merge against the float32 unmerged model
MERGE_PROBE = "The capital of France is Paris, and the capital of Italy is Rome. Water boils at 100 degrees"


@torch.no_grad()
def _merge_checked(model: nn.Module, plan, tokenizer=None) -> tuple[nn.Module, dict, dict[str, torch.Tensor]]:
    """Merge the adapters in float32, check the merge, and return the float32 tensors to save.

    The run's metrics are measured on the trained model: the base in the model's dtype plus the unmerged
    adapters (float32). In bfloat16, W + dW rounded back to bfloat16 loses every part of the update smaller
    than half a bfloat16 step of W, so the merge is computed in float32: the model is cast to float32 (the
    base values are exact in float32), the logits of a fixed probe (MERGE_PROBE, plain text; token ids
    0..15 without a tokenizer) are taken unmerged and merged, and a difference above
    MERGE_RTOL * max(1, max |logit|) logs a warning and is recorded (`within_tolerance: false`).
    `weights.safetensors` stores these float32 merged tensors. The returned in-memory model is cast back
    to the model's dtype; how far *it* is from the trained model is recorded as
    `in_memory_max_abs_logit_diff` (in bfloat16 it can be large: that model is not what was measured).
    Returns (merged model, merge_check record, tensors to save).
    """
    model.eval()
    device = input_device(model)
    base_dtype = next(model.get_base_model().parameters()).dtype
    if tokenizer is not None:
        from editdecay.core.tokens import encode_prompt

        probe = torch.tensor([encode_prompt(tokenizer, MERGE_PROBE)], device=device)           # (1, T)
    else:
        vocab = model.get_input_embeddings().weight.shape[0]
        probe = torch.arange(16, device=device).remainder(vocab)[None]   # (1, 16) fixed token ids
    trained = model(input_ids=probe, use_cache=False).logits.float()      # what was measured
    model.to(torch.float32)
    before = model(input_ids=probe, use_cache=False).logits.float() if base_dtype != torch.float32 else trained
    merged = merge(model)
    after = merged(input_ids=probe, use_cache=False).logits.float()
    tensors = changed_tensors(merged, plan)                             # float32: the saved merged weights
    merged.to(base_dtype)
    in_memory = merged(input_ids=probe, use_cache=False).logits.float() if base_dtype != torch.float32 else after
    diff = float((before - after).abs().max())
    tol = MERGE_RTOL * max(1.0, float(before.abs().max()))
    check = {"max_abs_logit_diff": diff, "tolerance": tol, "within_tolerance": diff <= tol,
             "probe_tokens": int(probe.shape[1]), "probe": MERGE_PROBE if tokenizer is not None else "token ids 0..15",
             "merged_dtype": "float32", "model_dtype": str(base_dtype).removeprefix("torch."),
             "in_memory_max_abs_logit_diff": float((trained - in_memory).abs().max()),
             # the same trained weights in float32 vs the model's dtype: the arithmetic's share of any difference
             "float32_vs_trained_max_abs_logit_diff": float((trained - before).abs().max())}
    if not check["within_tolerance"]:
        check["warning"] = (f"the merged weights differ from the trained model by up to {diff:.3g} in logits on the "
                            f"probe (tolerance {tol:.3g}): weights.safetensors does not reproduce the reported "
                            f"metrics, which belong to the unmerged adapters (use adapter/)")
        log.warning("%s", check["warning"])
    return merged, check, tensors


def _measured_model(o: TrainOutcome, lm: LoadedModel, outputs: dict) -> str:
    """Which object the fine-tuned model's metrics, the curve and downstream scores were measured on, and which of
    the outputs written (`outputs`, as `_save` returns them) reproduces it: only files that exist are named."""
    saved = outputs.get("weights") == WEIGHTS_FILE
    if o.plan.method == "full":
        kept = (f"{WEIGHTS_FILE} holds its changed tensors as they were" if saved else
                "its weights were not saved (save='none')")
        return f"the fine-tuned model in memory ({lm.identity.dtype}); {kept}"
    parts = [f"the base model ({lm.identity.dtype}) with the unmerged {o.plan.method} adapters (float32) as trained"]
    if "adapter" in outputs:
        parts.append(f"{ADAPTER_DIR}/ reproduces it")
    if saved:
        parts.append(f"{WEIGHTS_FILE} holds the merge computed and stored in float32, checked against it in "
                     f"merge_check")
    if len(parts) == 1:
        parts.append("neither the adapters nor a merge were saved (save='none')")
    return "; ".join(parts)


def _unsharded(lm: LoadedModel, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model holding the gathered weights of a sharded run (built on the meta device, then assigned)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(lm.model.config)
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    return model.eval()


def _decay(callback: DecayCallback, metrics: dict, last: int, before: str, after: str, edits: EditsUnderTest) -> dict:
    """E7 between the models before and after fine-tuning; with control facts the knowledge flip ratio beside
    the EFR and the per-run Fisher test of edits vs known facts (measure/knowledge.py); the survival curves of
    edits and known facts over the checkpoints (measure/decay_time.py)."""
    from editdecay.measure.decay_time import read_request_curve, survival_curve
    from editdecay.measure.knowledge import compare_flips, knowledge_flip

    out: dict = {}
    curve = read_request_curve(callback.request_path) if callback.request_path else []
    if edits.requests:
        out["edit_flip_ratio"] = edit_flip_ratio(callback.outcomes[0], callback.outcomes[last])
        out["relative_decrease"] = relative_decrease(metrics[before], metrics[after])
        out["survival"] = survival_curve(curve)
    if edits.control:
        kfr = knowledge_flip(callback.control_outcomes[0], callback.control_outcomes[last])
        out["knowledge_flip_ratio"] = kfr.to_dict()
        out["survival_control"] = survival_curve(curve, group="control")
        if edits.requests:
            efr = out["edit_flip_ratio"]
            out["edits_vs_known"] = compare_flips(efr["n_flipped"], efr["n_success_edited"], kfr.n_flipped,
                                                  kfr.n_known)
    return out


def _survived(callback: DecayCallback, last: int) -> dict[str, bool]:
    """Survival of the edits that succeeded before fine-tuning: case id -> still succeeding after."""
    after = {o.case_id: success(o) for o in callback.outcomes[last]}
    return {o.case_id: after[o.case_id] for o in callback.outcomes[0] if success(o)}


@dataclass
class _Mechanism:
    """The mechanism measure of one run (measure/interference.py): keys and the edited modules taken before
    training, the ratio and cosine per edited layer and request after it, related to survival."""

    names: dict                     # layer -> module name
    deltas: dict                    # layer -> the edit's delta
    keys: dict                      # layer -> (d_k, n)
    before: dict                    # layer -> module copy
    case_ids: list
    conv1d: bool

    @classmethod
    def prepare(cls, model: nn.Module, tok, edits: EditsUnderTest) -> "_Mechanism":
        from editdecay.core.arch import arch_for, num_layers, resolve_name, unwrap_peft
        from editdecay.edit.context import ContextTemplates
        from editdecay.edit.keys import compute_keys
        from editdecay.measure.interference import snapshot

        base = unwrap_peft(model)
        arch = arch_for(base)
        by_name = {resolve_name(base, arch.mlp_out_name(l)): l for l in range(num_layers(base))}
        names = {by_name[n]: n for n in edits.deltas if n in by_name}
        keys = compute_keys(base, tok, list(edits.requests), sorted(names), ContextTemplates((("{}",),)))
        return cls(names, {l: edits.deltas[n] for l, n in names.items()}, keys, snapshot(base, names),
                   [r.case_id for r in edits.requests], arch.conv1d)

    def measure(self, model: nn.Module, plan, survived: dict) -> dict:
        from editdecay.measure.interference import interference, relate

        trained = [l for l, n in self.names.items()
                   if l in plan.layers and (plan.whole_blocks or n in plan.modules)]
        res = interference(model, self.before, self.names, self.deltas, self.keys, self.case_ids,
                           conv1d=self.conv1d, trained=trained)
        res["layers"] = {str(l): v for l, v in res["layers"].items()}
        res["relation"] = {k: relate(res["per_request"], survived, key=k) for k in ("ratio", "cosine")}
        return res


def _control(edits: EditsUnderTest, base, callback: DecayCallback, last: int, before: str, after: str) -> list[dict]:
    """One row per control fact: its outcome under each model and whether each model knows it."""
    from editdecay.measure.knowledge import knows

    rows = []
    for i, r in enumerate(edits.control):
        row = {"case_id": r.case_id}
        outs = ({"M0": base[i]} if base is not None else {}) | {before: callback.control_outcomes[0][i],
                                                                  after: callback.control_outcomes[last][i]}
        row.update({k: o.to_dict() for k, o in outs.items()})
        row["known"] = {k: knows(o) for k, o in outs.items()}
        row["flipped"] = row["known"][before] and not row["known"][after]
        rows.append(row)
    return rows


def _per_request(requests, base, before_outcomes, after_outcomes, before: str, after: str) -> list[dict]:
    """One row per request: its outcome under each model, whether it succeeds under the models before and after
    fine-tuning, and `flipped` (successful before, not after)."""
    rows = []
    for i, r in enumerate(requests):
        row = {"case_id": r.case_id}
        if base is not None:
            row["M0"] = base[i].to_dict()
        row[before], row[after] = before_outcomes[i].to_dict(), after_outcomes[i].to_dict()
        row["success"] = {before: success(before_outcomes[i]), after: success(after_outcomes[i])}
        row["flipped"] = row["success"][before] and not row["success"][after]
        rows.append(row)
    return rows
