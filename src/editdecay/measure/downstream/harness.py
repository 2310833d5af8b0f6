"""Score an in-memory model on downstream tasks through lm-evaluation-harness (docs/METHODS.md E7, downstream DS).

Two steps, so that everything that can fail without a model fails first:

1. `load_tasks(spec)` resolves the specs (spec.py) into lm-eval Task objects and
   reads their data: named tasks from the Hugging Face hub (or its local cache),
   `local:` directories through lm-eval's TaskManager, `everyday` and `ppl:` as
   in-memory configs. An unknown lm-eval name is a ConfigError with a "did you
   mean"; data that cannot be read is a DataError naming the task. Set
   HF_DATASETS_OFFLINE=1 on a machine without network: the hub is then not
   asked at all, instead of after ~25 s of retries per task.
2. `evaluate_downstream(model, tokenizer, tasks)` wraps the model object in
   lm-eval's HFLM (no save/reload) and runs lm-eval's `simple_evaluate` on the
   loaded tasks. A `PeftModel` with unmerged adapters is passed through as it is:
   HFLM only calls the module and reads its `config`/`device`, which a PeftModel
   forwards to its base model, so the adapters are part of every forward pass.

Invariants: the model comes back as it went in. HFLM puts it in eval mode and
re-ties its output embedding; the training flag and the output-embedding
parameter are restored afterwards. Random number generators (python, numpy,
torch) are left untouched (lm-eval is told not to reseed them and their states
are restored), so scoring inside a fine-tuning run does not change the run.
The tokenizer is copied when lm-eval would have to add a padding token to it.
Scoring runs on the model's device (HFLM ignores a device argument for a model
object).

Results are typed (`DownstreamResult`): per lm-eval task {metric: value, ...,
"n": documents scored}, with stderr where lm-eval computes one, plus the
provenance a reader needs to redo the numbers (lm-eval version, task versions
and configs' sources, limit, few-shot count).

`commonsense:DIR` specs are not lm-eval tasks: they are read by `commonsense.load` in step 1 and scored
by generation (`commonsense.score`) in step 2, after the lm-eval tasks; their scores sit beside lm-eval's
under 'commonsense:<task>', their per-record predictions in `DownstreamResult.predictions`, and every
task's provenance names its `protocol` ("loglikelihood" or "generation"). Without lm-eval tasks,
lm-eval is not imported at all.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from editdecay.core.config import did_you_mean
from editdecay.core.errors import ConfigError, DataError
from editdecay.measure.downstream import commonsense, everyday, perplexity
from editdecay.measure.downstream.score import GENERATION, LOGLIKELIHOOD, accuracy_by_protocol, mean_accuracy
from editdecay.measure.downstream.spec import (
    EVERYDAY,
    DownstreamSpec,
    is_generation,
    lm_eval_name,
    task_digest,
)

log = logging.getLogger(__name__)



@dataclass
class LoadedTasks:
    """lm-eval Task objects with their data, ready to score any number of models (re-used across phases of a
    fine-tuning run: the data is read once). `source` maps each lm-eval task name to the spec it came from."""

    spec: DownstreamSpec
    tasks: dict                                   # lm-eval task name -> lm_eval.api.task.Task
    source: dict[str, str]                        # task name (lm-eval's or 'commonsense:<task>') -> its spec
    manager: object                               # the lm_eval TaskManager (None without lm-eval tasks)
    digests: dict[str, str | None] = field(default_factory=dict)
    generation: tuple = ()                        # commonsense.CommonsenseTasks, scored by generation

    @property
    def names(self) -> list[str]:
        return list(self.tasks) + [k for g in self.generation for k in g.keys]


@dataclass(frozen=True)
class DownstreamResult:
    """Scores of one model. `tasks`: lm-eval task name -> {metric: value, ..., "n": documents scored};
    `score`: mean accuracy over the tasks that report one (the study's DS), None if none does."""

    tasks: dict[str, dict]
    provenance: dict
    seconds: float
    predictions: dict[str, list[dict]] = field(default_factory=dict)   # generation tasks: per-record rows

    @property
    def score(self) -> float | None:
        """DS: the mean accuracy of one protocol's tasks (score.py `mean_accuracy`)."""
        return mean_accuracy(self.tasks)[0]

    def to_dict(self) -> dict:
        """Scores and provenance (predictions are written apart: they can be long)."""
        return {"tasks": self.tasks, "score": self.score, "provenance": self.provenance,
                "seconds": round(self.seconds, 3)}


# --------------------------------------------------------------------------- loading


def load_tasks(spec: DownstreamSpec | Sequence[str] | str) -> LoadedTasks:
    """Resolve every spec into lm-eval tasks and read their data (see module docstring). No model needed."""
    if not isinstance(spec, DownstreamSpec):
        spec = DownstreamSpec.parse(spec)
    with _rng_preserved():           # importing lm-eval and datasets the first time draws random numbers
        return _load_tasks(spec)


def _load_tasks(spec: DownstreamSpec) -> LoadedTasks:
    generation, source, digests = [], {}, {}
    for s in spec.tasks:
        if is_generation(s):
            loaded = commonsense.load(s)
            digests[s] = task_digest(s)
            for key in loaded.keys:
                if key in source:
                    raise ConfigError(f"downstream tasks {source[key]!r} and {s!r} both score {key!r}; list it once")
                source[key] = s
            generation.append(loaded)
    if all(is_generation(s) for s in spec.tasks):
        return LoadedTasks(spec, {}, source, None, digests, tuple(generation))
    loaded = _load_lm_eval(spec)
    clash = sorted(set(loaded.source) & set(source))
    if clash:
        raise ConfigError(f"downstream task {clash[0]!r} is named twice; list it once")
    return LoadedTasks(spec, loaded.tasks, {**loaded.source, **source}, loaded.manager,
                       {**loaded.digests, **digests}, tuple(generation))


def _load_lm_eval(spec: DownstreamSpec) -> LoadedTasks:
    from lm_eval.tasks import TaskManager

    local_dirs = [Path(s.split(":", 1)[1]) for s in spec.tasks if s.startswith("local:")]
    for d in local_dirs:
        if not d.exists():
            raise DataError(f"downstream task 'local:{d}': {d} does not exist; give a directory of lm-eval task "
                            f"YAML files or one YAML file")
    named = [s for s in spec.tasks if lm_eval_name(s) is not None]
    # Indexing lm-eval's ~15k built-in tasks takes seconds: only done when a named task needs it.
    manager = TaskManager(include_path=[str(d) for d in local_dirs if d.is_dir()] or None,
                          include_defaults=bool(named))
    tasks, source, digests = {}, {}, {}
    for s in spec.tasks:
        if is_generation(s):
            continue
        digests[s] = task_digest(s)
        for item in _items(s, manager, digests[s]):
            loaded = _load_one(manager, item, s)
            for name, task in loaded["tasks"].items():
                if name in tasks:
                    raise ConfigError(f"downstream tasks {source[name]!r} and {s!r} both define lm-eval task "
                                      f"{name!r}; list it once")
                tasks[name], source[name] = task, s
    return LoadedTasks(spec, tasks, source, manager, digests)


def _items(s: str, manager, digest: str | None) -> list:
    """What to hand `TaskManager.load` for one spec: names, YAML paths or config dicts."""
    if s == EVERYDAY:
        return [everyday.lm_eval_config()]
    if s.startswith("ppl:"):
        return [perplexity.lm_eval_config(Path(s.split(":", 1)[1]), digest)]
    if s.startswith("local:"):
        path = Path(s.split(":", 1)[1])
        if path.is_file():
            return [str(path)]
        return _local_task_names(manager, path, s)
    name = lm_eval_name(s)
    if name not in manager.all_tasks:
        raise ConfigError(f"downstream task {s!r}: lm-eval has no task, group or tag named {name!r}"
                          f"{did_you_mean(name, manager.all_tasks, n=3)}")
    return [name]


def _local_task_names(manager, path: Path, s: str) -> list[str]:
    """The tasks a directory of lm-eval YAML files defines, from the manager's index (its groups and tags are
    left out: their member tasks are scored one by one)."""
    root = path.resolve()
    names = sorted(n for n, e in manager.task_index.items()
                   if getattr(e.kind, "name", "") in ("TASK", "PY_TASK") and getattr(e, "yaml_path", None)
                   and root in Path(e.yaml_path).resolve().parents)
    if not names:
        raise DataError(f"downstream task {s!r}: {path} defines no lm-eval task (no YAML file with a 'task' key)")
    return names


def _load_one(manager, item, s: str) -> dict:
    what = item if isinstance(item, str) else item.get("task")
    try:
        with _quiet("lm_eval"):
            return manager.load([item])
    except (ConfigError, DataError):
        raise
    except Exception as e:       # lm-eval and datasets raise many kinds (ConnectionError, FileNotFoundError, ...)
        named = lm_eval_name(s) is not None
        hint = ("its data comes from the Hugging Face hub, which may be unreachable from here: without network "
                "use a local task instead (everyday, local:DIR, ppl:FILE), or fill the datasets cache on a "
                "machine with network and set HF_DATASETS_OFFLINE=1") if named else \
            "check the task's YAML and data files"
        raise DataError(f"downstream task {s!r} ({what}): its data could not be loaded "
                        f"({type(e).__name__}: {str(e)[:300]}); {hint}") from e


# --------------------------------------------------------------------------- scoring


def evaluate_downstream(model, tokenizer, tasks: LoadedTasks | DownstreamSpec | Sequence[str] | str, *,
                        limit: int | None = None, batch_size: int | None = None,
                        num_fewshot: int | None = None) -> DownstreamResult:
    """Score `model` (a transformers causal LM or a PeftModel, in memory) on `tasks` with lm-eval.

    `tasks`: loaded tasks (re-usable), a DownstreamSpec, or spec strings (loaded here). `limit`,
    `batch_size` and `num_fewshot` override the spec's values when given.
    """
    loaded = tasks if isinstance(tasks, LoadedTasks) else load_tasks(tasks)
    spec = loaded.spec
    limit = spec.limit if limit is None else limit
    batch_size = spec.batch_size if batch_size is None else batch_size
    num_fewshot = spec.num_fewshot if num_fewshot is None else num_fewshot
    DownstreamSpec(spec.tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)   # validates overrides

    t0 = time.perf_counter()
    scores, raw, lm = {}, None, None
    if loaded.tasks:
        rolling = [n for n, t in loaded.tasks.items() if t.OUTPUT_TYPE == "loglikelihood_rolling"]
        with _model_preserved(model), _rng_preserved(model), _quiet("lm_eval.models.huggingface"):
            import lm_eval
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=_tokenizer_for(tokenizer), batch_size=batch_size)
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=list(loaded.tasks.values()), task_manager=loaded.manager, limit=limit,
                num_fewshot=num_fewshot, log_samples=bool(rolling), bootstrap_iters=1000,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        for name in loaded.tasks:
            scores[name] = _metrics(raw["results"][name])
            scores[name]["n"] = int(raw["n-samples"][name]["effective"])
            if name in rolling:
                scores[name].update(perplexity.token_perplexity(raw["samples"][name], lm.tok_encode))
    predictions, generation = {}, {}
    if loaded.generation:
        settings = commonsense.GenerationSettings(num_beams=spec.num_beams, max_new_tokens=spec.max_new_tokens,
                                                  batch_size=batch_size, prompt=spec.prompt)
        with _rng_preserved(model):
            for g in loaded.generation:
                got, preds, generation = commonsense.score(model, tokenizer, g, settings, limit=limit)
                scores.update(got)
                predictions.update(preds)
    seconds = time.perf_counter() - t0
    return DownstreamResult(scores, _provenance(loaded, raw, limit, num_fewshot, batch_size, generation, scores),
                            seconds, predictions)


def _metrics(row: dict) -> dict:
    """lm-eval's "metric,filter" keys -> "metric" (filter "none") or "metric,filter"; "N/A" -> None."""
    out = {}
    for key, value in row.items():
        if "," not in key:
            continue                                       # name, alias, sample_len
        metric, filt = key.split(",", 1)
        k = metric if filt == "none" else key
        out[k] = None if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)) \
            else float(value)
    return out


def _provenance(loaded: LoadedTasks, raw: dict | None, limit, num_fewshot, batch_size, generation: dict,
                scores: dict) -> dict:
    tasks = {}
    version = None
    if raw is not None:
        import lm_eval

        version = getattr(lm_eval, "__version__", None)
        if version is None:
            import importlib.metadata

            version = importlib.metadata.version("lm_eval")
        for name, task in loaded.tasks.items():
            tasks[name] = {"spec": loaded.source[name], "protocol": LOGLIKELIHOOD, "version": raw["versions"].get(name),
                           "num_fewshot": raw["n-shot"].get(name), "output_type": task.OUTPUT_TYPE,
                           "n_documents": int(raw["n-samples"][name]["original"]),
                           "digest": loaded.digests.get(loaded.source[name])}
    for g in loaded.generation:
        for task, records in g.records.items():
            key = commonsense.task_key(task)
            tasks[key] = {"spec": g.spec, "protocol": GENERATION, "output_type": "generate_until",
                          "n_documents": len(records), "digest": loaded.digests.get(g.spec)}
    by = accuracy_by_protocol(scores)
    return {"harness": "lm-evaluation-harness" if raw is not None else None, "lm_eval_version": version,
            "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "tasks": tasks,
            "generation": generation or None,
            "score_protocol": GENERATION if GENERATION in by else (LOGLIKELIHOOD if by else None),
            "accuracy_by_protocol": {p: {"mean_acc": v, "n_tasks": n} for p, (v, n) in by.items()}}


def _tokenizer_for(tokenizer):
    """HFLM sets a padding token on a tokenizer that has none: give it a copy so the caller's is unchanged."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        return copy.deepcopy(tokenizer)
    return tokenizer


@contextlib.contextmanager
def _model_preserved(model):
    """Restore the training flag and the output-embedding parameter that HFLM's set-up changes."""
    was_training = model.training
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    try:
        yield
    finally:
        if out is not None and out.weight is not weight:
            out.weight = weight
        model.train(was_training)


@contextlib.contextmanager
def _rng_preserved(model=None):
    """Python's, numpy's and torch's generators (CPU, and the model's CUDA device) as they were before."""
    import numpy as np
    import torch

    from editdecay.core.devices import input_device     # here: importing the package needs no torch

    py, npy = random.getstate(), np.random.get_state()
    device = input_device(model) if model is not None else None
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Raise one library logger to ERROR for a block: lm-eval warns on every use of a model object."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


__all__ = ["DownstreamResult", "LoadedTasks", "evaluate_downstream", "load_tasks"]
