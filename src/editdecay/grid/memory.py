"""The memory plan of a command or a grid, before any weight is loaded (core.memory_plan does the sums).

`plan_edit` (editdecay edit), `plan_finetune` (editdecay finetune) and `plan_grid` (editdecay grid plan)
read the model's config.json (a meta-device model gives the parameter count and what a recipe trains),
resolve the editor preset and recipe exactly as the run will, and return `core.memory_plan.MemoryPlan`s;
`MemoryPlan.check()` refuses a stage that cannot fit (MemoryPlanError, exit 2) while nothing is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from editdecay.core.memory_plan import EditSetting, MemoryPlan, ModelDims, TrainSetting, plan_memory


@dataclass(frozen=True)
class MetaModel:
    dims: ModelDims
    model: object            # the model built on the meta device (shapes and names, no memory)
    name: str


def meta_model(name: str, *, dtype: str = "float32", trust_remote_code: bool = False,
               revision: str | None = None) -> MetaModel:
    """The model `name` (embedded, local directory or hub id: its config only) built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from editdecay.core.errors import ConfigError
    from editdecay.core.models import resolve_source

    source = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {name!r}: its config cannot be read for the memory plan "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return MetaModel(ModelDims.of_model(model, name=name, dtype=dtype), model, name)


def editor_config(editor: str, meta: MetaModel, overrides: dict):
    """The editor config the run will use: the preset of the model's family (or the embedded model's) plus
    overrides, validated (as edit.workflow.edit_config, without a loaded model)."""
    from editdecay.core.models import EMBEDDED_NAME
    from editdecay.edit import make_config
    from editdecay.edit.presets import preset_for

    fields = preset_for(editor.lower(), meta.dims.family, EMBEDDED_NAME if meta.name == EMBEDDED_NAME else None)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(editor.lower(), **fields)


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


def train_setting(recipe, dims: ModelDims, model=None, **sizes) -> TrainSetting:
    """`TrainSetting.from_recipe` with the trainable parameters counted on `model` when given."""
    return TrainSetting.from_recipe(recipe, dims, trainable=trainable_on(recipe, model) if model is not None else None,
                                    **sizes)


def plan_finetune(meta: MetaModel, recipe, device_bytes: int, *, devices: int = 1) -> MemoryPlan:
    return plan_memory(meta.dims, device_bytes, train=train_setting(recipe, meta.dims, meta.model, devices=devices))


def plan_grid(plan, device_bytes: int) -> list[dict]:
    """One memory plan per distinct (model, editor config, n) and (model, recipe) of a grid plan: rows of
    {"what", "plan": MemoryPlan}. Models whose config cannot be read are reported, not planned."""
    from editdecay.core.errors import ConfigError
    from editdecay.edit import make_config
    from editdecay.finetune.recipe import Recipe

    metas: dict[tuple, MetaModel | str] = {}
    rows, seen = [], set()

    def meta_for(ref: dict) -> MetaModel | str:
        key = (ref["name"], ref["dtype"])
        if key not in metas:
            try:
                metas[key] = meta_model(ref["name"], dtype=ref["dtype"], trust_remote_code=ref["trust_remote_code"],
                                        revision=ref["revision"])
            except ConfigError as e:
                metas[key] = str(e)
        return metas[key]

    for st in plan.stages.values():
        c = st.config
        if st.kind == "patch":
            meta = meta_for(c["model"])
            cfg = c["editor_config"]
            what = f"edit {st.label}"
            key = ("patch", c["model"]["name"], c["model"]["dtype"], str(cfg), c["requests"]["n"])
            if key in seen:
                continue
            seen.add(key)
            if isinstance(meta, str) or cfg is None:
                rows.append({"what": what, "plan": None, "note": meta if isinstance(meta, str) else
                             "editor preset resolved at run time; not planned"})
                continue
            rows.append({"what": what, "plan": plan_edit(meta, make_config(c["editor"], **cfg), c["requests"]["n"],
                                                         device_bytes)})
        elif st.kind == "finetune":
            key = ("finetune", c["model"]["name"], c["model"]["dtype"], str(c["recipe"]))
            if key in seen:
                continue
            seen.add(key)
            meta = meta_for(c["model"])
            what = f"fine-tune {st.label}"
            if isinstance(meta, str):
                rows.append({"what": what, "plan": None, "note": meta})
                continue
            rows.append({"what": what, "plan": plan_finetune(meta, Recipe.from_dict(c["recipe"]), device_bytes)})
    return rows


__all__ = ["MetaModel", "editor_config", "meta_model", "plan_edit", "plan_finetune", "plan_grid", "train_setting",
           "trainable_on"]
