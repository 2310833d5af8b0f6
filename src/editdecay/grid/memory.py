"""The memory plan of a command or a grid, before any weight is loaded (core.memory_plan does the sums).

`plan_edit` (editdecay edit), `plan_finetune` (editdecay finetune) and `plan_grid` (editdecay grid plan)
read the model's config.json (a meta-device model gives the parameter count and what a recipe trains),
resolve the editor preset and recipe exactly as the run will, and return `core.memory_plan.MemoryPlan`s;
`MemoryPlan.check()` refuses a stage that cannot fit (MemoryPlanError, exit 2) while nothing is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from editdecay.core.memory_plan import EditSetting, MemoryPlan, ModelDims, TrainSetting, plan_memory
from editdecay.core.model_ref import ModelRef


@dataclass(frozen=True)
class MetaModel:
    dims: ModelDims
    model: object            # the model built on the meta device (shapes and names, no memory)
    name: str


def meta_model(ref: ModelRef, cache=None) -> MetaModel:
    """The model of `ref` (embedded, local directory or hub id: its config only) built on the meta device.
    Raises ConfigError naming the model when its config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from editdecay.core.errors import ConfigError
    from editdecay.core.models import resolve_source

    source = resolve_source(ref.name, cache)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=ref.trust_remote_code, revision=ref.revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {ref.name!r}: its config cannot be read for the memory plan "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)
    return MetaModel(ModelDims.of_model(model, name=ref.name, dtype=ref.dtype), model, ref.name)


def editor_config(editor: str, meta: MetaModel, overrides: dict):
    """The editor config the run will use: the preset of the model's family (or the embedded model's) plus
    overrides, validated (edit/registry.py `resolve_config`, as edit.workflow.edit_config without a loaded model)."""
    from editdecay.edit.registry import resolve_config

    return resolve_config(editor, meta.dims.family, meta.name, overrides)


def plan_edit(meta: MetaModel, cfg, n_requests: int, device_bytes: int, *, eval_batch: int = 32,
              stats_batch: int = 16) -> MemoryPlan:
    setting = EditSetting.from_config(cfg, n_requests, eval_batch=eval_batch, stats_batch=stats_batch)
    return plan_memory(meta.dims, device_bytes, edit=setting)


def trainable_on(recipe, model) -> tuple[int, int] | None:
    """(trainable parameters, blocks a backward pass reaches) of `recipe` on `model` (real or meta-device),
    counted as fine-tuning will choose them (`finetune.trainable`); None when the recipe needs edited layers
    that are not known here (`layers='edited'` without a patch). The model's requires_grad flags are kept."""
    from editdecay.core.arch import get_module, num_layers
    from editdecay.core.errors import ConfigError
    from editdecay.finetune.trainable import prepare_model, resolve_plan

    try:
        plan = resolve_plan(recipe, model)
    except ConfigError:
        return None
    depth = num_layers(model) - (min(plan.layers) if plan.layers else 0)
    if recipe.method == "full":
        flags = {p: p.requires_grad for p in model.parameters()}
        try:
            prepare_model(model, recipe, plan)
            n = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        finally:
            for p, f in flags.items():
                p.requires_grad_(f)
        return n, depth
    n = 0
    for name in plan.modules:
        w = get_module(model, name).weight
        o, i = w.shape[0], w.shape[1]
        n += recipe.lora_r * (i + o) + (o if recipe.method == "dora" else 0)
    return n, depth


def train_setting(recipe, dims: ModelDims, model=None, *, device: str | None = None, **sizes) -> TrainSetting:
    """`TrainSetting.from_recipe` with the trainable parameters counted on `model` when given, and the attention
    matrices of eager attention where the trainer runs it on `device` (finetune/attention.py: "cpu", "cuda",
    "auto" - the CUDA device when there is one - or None: not known, counted only for `attention_kernel: eager`)."""
    from editdecay.finetune.attention import eager_attention_bytes, kernel_for

    kind = _device_type(device)
    per_layer = 0
    if kernel_for(recipe, kind or "unknown", dims.heads, dims.n_layers, dims.attention_dropout) == "eager":
        per_layer = eager_attention_bytes(dims.heads, 1, recipe.batch_size, sizes.get("seq_len") or recipe.cutoff_len,
                                          dims.attention_dropout)
    return TrainSetting.from_recipe(recipe, dims, trainable=trainable_on(recipe, model) if model is not None else None,
                                    attention_per_layer=per_layer, **sizes)


def _device_type(device: str | None) -> str | None:
    """The torch device type a run on `device` ("cpu", "cuda:1", "auto", ...) uses, without touching a device."""
    from editdecay.core.placement import resolve_device

    if device is None:
        return None
    return str(resolve_device(device) if device == "auto" else device).split(":")[0]


def plan_finetune(meta: MetaModel, recipe, device_bytes: int, *, devices: int = 1,
                  device: str | None = None) -> MemoryPlan:
    return plan_memory(meta.dims, device_bytes, train=train_setting(recipe, meta.dims, meta.model, devices=devices,
                                                                    device=device))


def plan_grid(plan, device_bytes: int) -> list[dict]:
    """One memory plan per distinct (model, editor config, requests) and (model, recipe) of a grid plan: rows of
    {"what", "plan": MemoryPlan} (`plan` None with a `note` where it cannot be planned: a model whose config
    cannot be read, an editor preset known only once the model loads)."""
    from editdecay.core.errors import ConfigError
    from editdecay.edit.registry import make_config
    from editdecay.grid.specs import FinetuneSpec, PatchSpec

    metas: dict[str, MetaModel | str] = {}
    rows, seen = [], set()

    def meta_for(ref: ModelRef) -> MetaModel | str:
        key = ref.model_dump_json()
        if key not in metas:
            try:
                metas[key] = meta_model(ref)
            except ConfigError as e:
                metas[key] = str(e)
        return metas[key]

    for st in plan.stages.values():
        spec = st.spec
        if isinstance(spec, PatchSpec):
            key = ("patch", spec.model.model_dump_json(), spec.editor.model_dump_json(), spec.requests.data,
                   spec.requests.n)
            if key in seen:
                continue
            seen.add(key)
            meta, what = meta_for(spec.model), f"edit {st.label}"
            if isinstance(meta, str) or spec.editor.config is None:
                rows.append({"what": what, "plan": None, "note": meta if isinstance(meta, str) else
                             "editor preset resolved at run time; not planned"})
                continue
            n = spec.requests.n if spec.requests.n is not None else len(spec.requests.load().requests)
            rows.append({"what": what, "plan": plan_edit(meta, make_config(spec.editor.name, **spec.editor.config), n,
                                                         device_bytes)})
        elif isinstance(spec, FinetuneSpec):
            key = ("finetune", spec.model.model_dump_json(), spec.recipe.model_dump_json())
            if key in seen:
                continue
            seen.add(key)
            meta, what = meta_for(spec.model), f"fine-tune {st.label}"
            if isinstance(meta, str):
                rows.append({"what": what, "plan": None, "note": meta})
                continue
            devices = int(plan.runtime.get("finetune_devices") or 1)
            rows.append({"what": what, "plan": plan_finetune(meta, spec.recipe, device_bytes, devices=devices,
                                                             device=plan.runtime.get("device"))})
    return rows


__all__ = ["MetaModel", "editor_config", "meta_model", "plan_edit", "plan_finetune", "plan_grid", "train_setting",
           "trainable_on"]
