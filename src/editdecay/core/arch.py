"""Architecture knowledge as data (docs/METHODS.md, architecture table).

Every module path that an editor, a statistics pass or a fine-tuner needs is
read from `ARCHITECTURES`; no other file spells `transformer.h` or
`model.layers`. To support a new family, add one `ArchSpec` row below with the
`model_type` values of its Hugging Face configs.

This module imports no torch: the grid file's validation and planning read the
table (`FAMILIES`, `arch_for_model_type`) without loading any model code. The
functions that take a model only call its methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from editdecay.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module-path templates of one model family. `{}` stands for the layer index."""

    family: str
    model_types: tuple[str, ...]   # values of `config.model_type` served by this row
    block: str                     # the transformer block, e.g. "model.layers.{}"
    mlp_out: str                   # W_out, the edited module ("down projection")
    final_norm: str
    unembed: str                   # "a|b": alternatives across transformers versions (NeoX: lm_head, was embed_out)
    embed: str
    conv1d: bool                   # True: weight stored (d_k, d) (GPT-2 Conv1D), else (d, d_k)
    attention: tuple[str, ...]     # linear modules of attention, relative to the block
    mlp: tuple[str, ...]           # linear modules of the MLP, relative to the block
    n_layers_attr: str             # config attribute holding the depth

    # Every name below is a *table name*: it may hold alternatives ("a|b"). Turn one into the module path of a
    # given model with `resolve_name(model, name)` (or fetch the module with `get_module`), never by hand.

    def block_name(self, layer: int) -> str:
        return "|".join(a.format(layer) for a in alternatives(self.block))

    def mlp_out_name(self, layer: int) -> str:
        return "|".join(a.format(layer) for a in alternatives(self.mlp_out))

    def in_block(self, layer: int, relative: str) -> str:
        """Table name of a block-relative module of one layer: every block alternative x every relative one."""
        return "|".join(f"{b}.{r}" for b in alternatives(self.block_name(layer)) for r in alternatives(relative))

    def module_names(self, layer: int, which: str) -> list[str]:
        """Table names of the `attention`, `mlp` or `all-linear` modules of one block."""
        rel = {"attention": self.attention, "mlp": self.mlp, "all-linear": self.attention + self.mlp}[which]
        return [self.in_block(layer, r) for r in rel]


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="gpt2", model_types=("gpt2",),
        block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte", conv1d=True,
        attention=("attn.c_attn", "attn.c_proj"), mlp=("mlp.c_fc", "mlp.c_proj"), n_layers_attr="n_layer",
    ),
    ArchSpec(
        family="gptj", model_types=("gptj",),
        block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.fc_out",
        final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte", conv1d=False,
        attention=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
        mlp=("mlp.fc_in", "mlp.fc_out"), n_layers_attr="n_layer",
    ),
    ArchSpec(
        family="gpt_neox", model_types=("gpt_neox",),
        block="gpt_neox.layers.{}", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm", unembed="lm_head|embed_out", embed="gpt_neox.embed_in", conv1d=False,
        attention=("attention.query_key_value", "attention.dense"),
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), n_layers_attr="num_hidden_layers",
    ),
    ArchSpec(
        family="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        block="model.layers.{}", mlp_out="model.layers.{}.mlp.down_proj",
        final_norm="model.norm", unembed="lm_head", embed="model.embed_tokens", conv1d=False,
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), n_layers_attr="num_hidden_layers",
    ),
)
FAMILIES: tuple[str, ...] = tuple(spec.family for spec in ARCHITECTURES)   # the model families editors have presets for


def unwrap_peft(model):
    """The transformers model inside a peft PeftModel (its adapter layers included), or the model itself.

    Module paths of the architecture table are relative to this model; every caller unwraps through here.
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def arch_for_model_type(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in ARCHITECTURES for t in s.model_types)
    raise ConfigError(
        f"model_type {model_type!r} is not in the architecture table (editdecay.core.arch.ARCHITECTURES); "
        f"supported: {', '.join(known)}. To add a family, add an ArchSpec row with its module-path "
        f"templates (block, mlp_out, final_norm, unembed, embed, attention, mlp) to editdecay/core/arch.py."
    )


def layer_of_module(name: str) -> int | None:
    """The layer index of a module path inside a block of any family in the table ("model.layers.3.mlp.down_proj"
    -> 3), or None when the path is in no block (an embedding, the unembedding) or in no known family. Read from
    the table's `block` templates, without a model (patch files are checked with it before any model loads)."""
    for spec in ARCHITECTURES:
        for block in alternatives(spec.block):
            prefix = block.split("{}")[0]
            if name.startswith(prefix):
                head = name[len(prefix):].split(".", 1)[0]
                if head.isdigit():
                    return int(head)
    return None


def arch_for(model: nn.Module) -> ArchSpec:
    return arch_for_model_type(getattr(model.config, "model_type", type(model).__name__))


def num_layers(model: nn.Module) -> int:
    return int(getattr(model.config, arch_for(model).n_layers_attr))


@dataclass(frozen=True)
class ConfigSizes:
    """The sizes of a transformers config under the names every family uses (GPT-2's `n_embd`, Llama's
    `hidden_size`, ...); the one reader of them for memory estimates and plans."""

    d: int           # hidden size
    d_ff: int        # MLP inner width (4 d when the config leaves it unset, as GPT-2 does)
    heads: int
    kv_heads: int    # key/value heads (grouped-query attention), `heads` when unset
    head_dim: int
    n_layers: int
    attention_dropout: float = 0.0   # dropout on the attention probabilities in training (GPT-2's attn_pdrop)

    @classmethod
    def of(cls, config) -> "ConfigSizes":
        d = int(_config_value(config, "hidden_size", "n_embd"))
        heads = int(_config_value(config, "num_attention_heads", "n_head") or 1)
        return cls(d=d, d_ff=int(_config_value(config, "intermediate_size", "n_inner") or 4 * d), heads=heads,
                   kv_heads=int(_config_value(config, "num_key_value_heads") or heads),
                   head_dim=int(_config_value(config, "head_dim") or d // heads),
                   n_layers=int(_config_value(config, "num_hidden_layers", "n_layer")),
                   attention_dropout=float(_config_value(config, "attention_dropout", "attn_pdrop") or 0.0))


def _config_value(config, *names):
    """The first of `names` that `config` sets to something other than None."""
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def alternatives(name: str) -> tuple[str, ...]:
    """The alternatives of a table name: "lm_head|embed_out" -> ("lm_head", "embed_out"); "a.b" -> ("a.b",)."""
    return tuple(part.strip() for part in name.split("|"))


def resolve_name(model: nn.Module, name: str) -> str:
    """The module path that a table name denotes in `model`: its first alternative that exists.

    The one place where alternatives are expanded. Every name read from `ARCHITECTURES` (or composed from it)
    goes through here (or `get_module`, which calls it) before it is looked up, hooked, wrapped by peft or
    stored as a key (patch deltas, statistics keys), so keys are always real module paths.
    Raises ConfigError naming every alternative tried.
    """
    options = alternatives(name)
    for option in options:
        try:
            model.get_submodule(option)
        except AttributeError:
            continue
        return option
    spec = _spec_or_none(model)
    row = f"; update the row of family {spec.family!r} in editdecay/core/arch.py" if spec else ""
    if len(options) == 1:
        raise ConfigError(f"module {options[0]!r} not found in {type(model).__name__}{row}")
    raise ConfigError(f"none of the modules {list(options)} exists in {type(model).__name__}{row}")


def _spec_or_none(model: nn.Module) -> ArchSpec | None:
    try:
        return arch_for(model)
    except (ConfigError, AttributeError):
        return None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule a table name (or a plain module path) denotes; alternatives expanded by `resolve_name`."""
    return model.get_submodule(resolve_name(model, name))


def unembed_module(model: nn.Module) -> nn.Module:
    """The unembedding (hidden -> vocabulary logits) named by the table, first alternative that exists."""
    return get_module(model, arch_for(model).unembed)


def check_layers(model: nn.Module, layers: list[int] | tuple[int, ...], field: str = "layers") -> tuple[int, ...]:
    """Validate layer indices against the model depth; returns them sorted, unique."""
    depth = num_layers(model)
    if not layers:
        raise ConfigError(f"{field}: empty list; give at least one layer index in [0, {depth - 1}]")
    bad = [l for l in layers if not (0 <= int(l) < depth)]
    if bad:
        raise ConfigError(f"{field}: layer index {bad[0]} is out of range; this model has {depth} layers (0..{depth - 1})")
    return tuple(sorted({int(l) for l in layers}))


def as_out_in(delta_or_weight: torch.Tensor, spec: ArchSpec) -> torch.Tensor:
    """View a stored weight/delta as (d_out, d_in) = (d, d_k), whatever the layout. Involutive."""
    return delta_or_weight.T if spec.conv1d else delta_or_weight
