"""Recipe validation and resolution against a model: bad settings fail before training, naming the field."""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_model
from torch import nn

from editdecay.core.errors import ConfigError
from editdecay.finetune.recipe import Recipe, preset
from editdecay.finetune.trainable import resolve_plan


def steps(**kw) -> Recipe:
    return Recipe(max_steps=2, **kw)


@pytest.mark.parametrize("kw, field", [
    (dict(method="qlora"), "method"),
    (dict(layers="edit"), "layers"),
    (dict(layers=()), "layers"),
    (dict(layers=(1, 1)), "layers"),
    (dict(layers=(-1,)), "layers"),
    (dict(targets="mlps"), "targets"),
    (dict(targets=()), "targets"),
    (dict(targets="all", method="lora"), "targets"),
    (dict(lora_r=0), "lora_r"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(lr_scheduler="cosin"), "lr_scheduler"),
    (dict(warmup_steps=5, warmup_ratio=0.1), "warmup_ratio"),
    (dict(lr_scheduler="constant", warmup_steps=5), "constant_with_warmup"),
    (dict(epochs=1.0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(cutoff_len=1), "cutoff_len"),
    (dict(dtype="float16"), "float16"),
    (dict(dtype="int8"), "dtype"),
    (dict(template="chatml"), "template"),
])
def test_conflicting_or_invalid_settings_are_rejected_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        steps(**kw)


def test_neither_epochs_nor_steps_is_rejected():
    with pytest.raises(ConfigError, match="epochs"):
        Recipe()


def test_typo_in_a_choice_suggests_the_valid_value():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        steps(lr_scheduler="cosin")


def test_every_field_has_a_help_text():
    helps = Recipe.help()
    assert set(helps) == set(Recipe.model_fields)
    assert all(len(h) > 10 for h in helps.values())


def test_presets_follow_the_protocol_settings():
    lora = preset("study", "lora")
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.learning_rate) == (32, 64.0, 0.05, 2e-4)
    assert (lora.epochs, lora.batch_size, lora.cutoff_len, lora.warmup_steps) == (3.0, 16, 256, 100)
    assert preset("study", "dora").method == "dora"
    full = preset("study", "full")
    assert (full.learning_rate, full.warmup_ratio, full.dtype, full.cutoff_len) == (5e-6, 0.1, "bfloat16", 1024)
    assert Recipe(max_steps=1).targets == "all-linear"          # the stated default
    small = preset("embedded", "lora", max_steps=7)
    assert small.max_steps == 7 and small.epochs is None and small.cutoff_len == 64


def test_preset_override_switches_length_setting_and_revalidates():
    r = preset("study", "lora", max_steps=10)
    assert (r.max_steps, r.epochs) == (10, None)
    with pytest.raises(ConfigError, match="lora_r"):
        preset("study", "lora", lora_r=-1)
    with pytest.raises(ConfigError, match="lora_rank: unknown field.*lora_r"):
        preset("study", "lora", lora_rank=8)
    with pytest.raises(ConfigError, match="did you mean 'study'"):
        preset("stdy")


def test_round_trip_through_a_dict():
    r = steps(layers=(1, 3), targets=("mlp.down_proj",), method="dora")
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict({**r.to_dict(), "layers": [1, 3]}).layers == (1, 3)


# -- resolution against a model (still before any training) ------------------------------------------

def test_layer_beyond_depth_names_the_field_and_the_depth():
    with pytest.raises(ConfigError, match=r"layers: layer index 7 .* 4 layers \(valid indices 0..3\)"):
        resolve_plan(steps(layers=(1, 7)), tiny_model("llama"))


def test_edited_without_a_patch_is_rejected():
    for spec in ("edited", "non-edited"):
        with pytest.raises(ConfigError, match=f"layers='{spec}' needs the edited layers"):
            resolve_plan(steps(layers=spec), tiny_model("gpt2"), edited_layers=None)


def test_edited_layers_outside_the_model_are_rejected():
    with pytest.raises(ConfigError, match="edited_layers"):
        resolve_plan(steps(layers="edited"), tiny_model("gpt2"), edited_layers=(2, 9))


def test_layer_choices_resolve_through_the_architecture_table():
    m = tiny_model("llama")
    edited = resolve_plan(steps(layers="edited", targets="mlp"), m, edited_layers=(2, 1))
    assert edited.layers == (1, 2)
    assert "model.layers.1.mlp.down_proj" in edited.modules          # the edited module itself trains
    assert all(".mlp." in n for n in edited.modules) and len(edited.modules) == 6
    rest = resolve_plan(steps(layers="non-edited"), m, edited_layers=(1, 2))
    assert rest.layers == (0, 3) and len(rest.modules) == 2 * 7
    attn = resolve_plan(steps(targets="attention"), tiny_model("gpt2"))
    assert attn.modules[:2] == ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj")


def test_unknown_target_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="targets: 'mlp.fc_out' .*mlp.down_proj"):
        resolve_plan(steps(targets=("mlp.fc_out",)), tiny_model("llama"))


def test_non_edited_with_every_layer_edited_is_rejected():
    with pytest.raises(ConfigError, match="nothing is left"):
        resolve_plan(steps(layers="non-edited"), tiny_model("gpt2"), edited_layers=(0, 1, 2, 3))


class Gated(nn.Module):
    """A projection peft has no LoRA/DoRA layer for."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.inner(x) * self.gate


def test_dora_on_a_module_type_peft_cannot_wrap_is_rejected():
    m = tiny_model("llama")
    m.model.layers[2].mlp.down_proj = Gated(m.model.layers[2].mlp.down_proj)
    with pytest.raises(ConfigError, match=r"method='dora': module model.layers.2.mlp.down_proj is a Gated"):
        resolve_plan(steps(method="dora", targets="mlp"), m)
    # The same layer choice without that module, or with full fine-tuning, is fine.
    resolve_plan(steps(method="dora", targets="attention"), m)
    resolve_plan(steps(method="full", targets="mlp"), m)


def test_dora_on_gpt2_conv1d_is_allowed():
    # peft wraps transformers' Conv1D in its Linear layer with fan_in_fan_out=True and supports DoRA there;
    # test_finetune_adapters checks that the merged DoRA model equals the unmerged one on GPT-2.
    plan = resolve_plan(steps(method="dora"), tiny_model("gpt2"))
    assert "transformer.h.3.mlp.c_proj" in plan.modules
