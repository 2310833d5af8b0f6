"""Which parameters train: resolve a recipe against a model, then wrap (LoRA/DoRA) or freeze (full).

The invariant this file guarantees, and the tests check bit for bit: nothing
outside the resolved plan changes. For `full`, every parameter outside the plan
has `requires_grad=False` and is not in the optimiser; for LoRA/DoRA, adapters
exist on exactly the planned modules (checked after peft has wrapped them) and
the base weights are frozen.

Module names come from the architecture table (`ArchSpec.module_names`,
`.attention`, `.mlp`, `.block`); nothing here spells a model's module paths.

Edits kept as modules (core/module_edit.py, e.g. a GRACE codebook applied from a patch) are not part of
the base model: whatever the recipe, their parameters train only when the edit says so (`trains`), and
their buffers never do. The plan records each attached edit and whether it trains (`module_edits`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from editdecay.core.arch import (
    ArchSpec,
    alternatives,
    arch_for,
    check_layers,
    get_module,
    num_layers,
    resolve_name,
)
from editdecay.core.errors import ConfigError
from editdecay.finetune.recipe import Recipe


@dataclass(frozen=True)
class TrainingPlan:
    """A recipe resolved against one model: concrete layers and module names."""

    method: str
    layers: tuple[int, ...]               # blocks that train, sorted
    relative_targets: tuple[str, ...]     # block-relative module names, e.g. ("mlp.down_proj",); () for targets='all'
    modules: tuple[str, ...]              # full module names that train (empty for targets='all')
    whole_blocks: bool                    # targets='all': every parameter of the blocks trains
    outside_blocks: bool                  # targets='all' with layers='all': embeddings, final norm, unembedding too
    edited_layers: tuple[int, ...] | None
    module_edits: dict[str, str] = field(default_factory=dict)   # attached module edit -> "frozen" | "trained"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def trained_edits(self) -> tuple[str, ...]:
        return tuple(n for n, how in self.module_edits.items() if how == "trained")


def resolve_layers(spec, depth: int, edited_layers: tuple[int, ...] | None) -> tuple[int, ...]:
    """`all | edited | non-edited | (indices)` -> sorted layer indices, checked against the depth."""
    if spec in ("edited", "non-edited"):
        if not edited_layers:
            raise ConfigError(f"layers={spec!r} needs the edited layers: give a patch (--patch) or edited_layers; "
                              f"without one use layers='all' or explicit indices")
        bad = [l for l in edited_layers if not 0 <= l < depth]
        if bad:
            raise ConfigError(f"edited_layers: layer {bad[0]} is out of range for this model with {depth} layers "
                              f"(0..{depth - 1}); was the patch made for another model?")
        if spec == "edited":
            return tuple(sorted(set(edited_layers)))
        rest = tuple(l for l in range(depth) if l not in set(edited_layers))
        if not rest:
            raise ConfigError(f"layers='non-edited': every layer (0..{depth - 1}) is edited, nothing is left to train")
        return rest
    if spec == "all":
        return tuple(range(depth))
    bad = [l for l in spec if not 0 <= l < depth]
    if bad:
        raise ConfigError(f"layers: layer index {bad[0]} is beyond this model's depth; it has {depth} layers "
                          f"(valid indices 0..{depth - 1})")
    return tuple(sorted(spec))


def resolve_targets(spec, arch: ArchSpec, block: nn.Module | None = None) -> tuple[str, ...]:
    """`attention | mlp | all-linear | (names)` -> block-relative module names from the architecture table.

    With `block` (a block of the model), table names with alternatives ("a|b") are resolved to the module
    paths that exist in it (`arch.resolve_name`); peft matches these names literally.
    """
    if spec == "all":
        return ()
    if isinstance(spec, str):
        names = {"attention": arch.attention, "mlp": arch.mlp, "all-linear": arch.attention + arch.mlp}[spec]
    else:
        known = [a for t in arch.attention + arch.mlp for a in alternatives(t)]
        bad = [t for t in spec if t not in known]
        if bad:
            raise ConfigError(f"targets: {bad[0]!r} is not a linear module of a {arch.family} block; valid names: "
                              f"{', '.join(known)} (or attention | mlp | all-linear)")
        names = spec
    if block is not None:
        names = [resolve_name(block, n) for n in names]
    return tuple(dict.fromkeys(names))


def wrappable_types() -> tuple[type, ...]:
    """Module types that peft's LoRA and DoRA both wrap, among those the architecture table names.

    GPT-2's transformers `Conv1D` goes through peft's Linear layer with fan_in_fan_out=True. DoRA there is
    supported since peft PR #1588 (weight norm on the transposed weight; peft >= 0.10, we require >= 0.13) and
    is checked here by the merge-equivalence test on GPT-2 (tests/finetune/test_finetune_adapters.py). Its *unmerge*
    was wrong on fan_in_fan_out layers until peft PR #3532 (issue #3531); this package never unmerges (it
    only calls merge_and_unload), so that bug cannot reach a result.
    """
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def resolve_plan(recipe: Recipe, model: nn.Module, edited_layers: tuple[int, ...] | None = None) -> TrainingPlan:
    """Check a recipe against a model and list what will train. Raises ConfigError before any training."""
    arch = arch_for(model)
    depth = num_layers(model)
    if edited_layers is not None:
        edited_layers = check_layers(model, list(edited_layers), field="edited_layers")
    layers = resolve_layers(recipe.layers, depth, edited_layers)
    rel = resolve_targets(recipe.targets, arch, get_module(model, arch.block_name(layers[0])) if layers else None)
    whole = recipe.targets == "all"
    modules = tuple(resolve_name(model, arch.in_block(l, r)) for l in layers for r in rel)
    supported = wrappable_types()
    for name in modules:
        module = get_module(model, name)
        if recipe.method != "full" and not isinstance(module, supported):
            raise ConfigError(
                f"method={recipe.method!r}: module {name} is a {type(module).__name__}, which peft's "
                f"{recipe.method.upper()} cannot wrap (supported: {', '.join(t.__name__ for t in supported)}); "
                f"choose other targets or method='full'")
    return TrainingPlan(recipe.method, layers, rel, modules, whole, whole and recipe.layers == "all", edited_layers,
                        module_edits(model))


def module_edits(model: nn.Module) -> dict[str, str]:
    """Every module edit attached to `model` (core/module_edit.py) -> "trained" | "frozen" (`ModuleEdit.trains`)."""
    from editdecay.core.module_edit import attached_edits

    return {name: "trained" if edit.trains else "frozen" for name, edit in attached_edits(model)}


def prepare_model(model: nn.Module, recipe: Recipe, plan: TrainingPlan) -> nn.Module:
    """Make exactly the planned parameters trainable. Returns the model to train (a PeftModel for LoRA/DoRA).

    Full fine-tuning works in place on `model`; LoRA/DoRA wrap it (the base weights stay untouched until merge).
    """
    if recipe.method == "full":
        _freeze_outside(model, plan)
        _set_module_edits(model)
        return model
    from peft import LoraConfig, get_peft_model

    arch = arch_for(model)
    config = LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules=list(plan.relative_targets), layers_to_transform=list(plan.layers),
        # The container of the blocks, e.g. "layers" in "model.layers.{}", "h" in "transformer.h.{}".
        layers_pattern=resolve_name(model, arch.block_name(plan.layers[0])).split(".")[-2],
        use_dora=recipe.method == "dora",
        fan_in_fan_out=arch.conv1d, bias="none", task_type="CAUSAL_LM",
    )
    torch.manual_seed(recipe.seed)        # adapter initialisation (lora_A is random)
    peft_model = get_peft_model(model, config)
    got = adapted_modules(peft_model)
    if set(got) != set(plan.modules):
        raise RuntimeError(f"peft wrapped {sorted(set(got) ^ set(plan.modules))[:5]} unlike the plan; "
                           f"please report this with the model type")
    _set_module_edits(peft_model)
    return peft_model


def _set_module_edits(model: nn.Module) -> None:
    """The parameters of attached module edits train iff the edit says so (`ModuleEdit.trains`), whatever the
    recipe: they are not part of the base model."""
    from editdecay.core.module_edit import attached_edits

    for _, edit in attached_edits(model):
        for p in edit.parameters():
            p.requires_grad_(edit.trains)


def _freeze_outside(model: nn.Module, plan: TrainingPlan) -> None:
    if plan.outside_blocks:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    arch = arch_for(model)
    if plan.whole_blocks:
        roots = [resolve_name(model, arch.block_name(l)) for l in plan.layers]
    else:
        roots = list(plan.modules)
    for name in roots:
        for p in get_module(model, name).parameters():
            p.requires_grad_(True)


def adapted_modules(model: nn.Module) -> list[str]:
    """Names (in the unwrapped model's naming) of modules that carry a LoRA/DoRA adapter."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out.append(_base_name(name))
    return out


def _base_name(name: str) -> str:
    """"base_model.model.model.layers.3.mlp.down_proj" -> "model.layers.3.mlp.down_proj"."""
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters with requires_grad, as the training model names them (recorded with every result)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA adapters into the base weights and return the plain model (no-op for full).

    The merge W + dW is computed in the base weights' dtype: in bfloat16, the part of dW smaller than
    half a bfloat16 step of W is lost. `finetune.run` casts the model to float32 before merging.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def changed_tensors(model: nn.Module, plan: TrainingPlan) -> dict[str, torch.Tensor]:
    """The tensors fine-tuning can have changed, by plain-model name: what `weights.safetensors` stores.

    For LoRA/DoRA call this after `merge`: the planned modules' merged weights (and biases). For full: every
    trainable tensor. Tied tensors appear once.
    """
    if plan.method == "full" and (plan.whole_blocks or plan.outside_blocks):
        arch = arch_for(model)
        if plan.outside_blocks:
            names = [n for n, _ in model.named_parameters()]
        else:
            blocks = [resolve_name(model, arch.block_name(l)) for l in plan.layers]
            names = [f"{b}.{n}" for b in blocks for n, _ in get_module(model, b).named_parameters()]
    else:
        names = [f"{m}.{n}" for m in plan.modules for n, _ in get_module(model, m).named_parameters()]
    # A module edit's parameters belong to the patch, not to the model: saved here only when they trained.
    from editdecay.core.module_edit import attached_edits

    edit_params = {f"{e}.{n}": edit.trains for e, edit in attached_edits(model) for n, _ in edit.named_parameters()}
    names = [n for n in names if edit_params.get(n, True)] + [n for n, t in edit_params.items() if t and n not in names]
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in dict.fromkeys(names)}
