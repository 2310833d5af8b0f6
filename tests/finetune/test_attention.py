"""The training passes' attention kernel (finetune/attention.py): which kernel `auto` picks, that only the training
passes switch (evaluations keep the model's own kernel), that the kernel is restored and recorded, and that both
kernels train the same model up to float rounding."""

from __future__ import annotations

import json

import pytest
import torch
from support.models import tiny_model, tok

from editdecay.core.errors import ConfigError
from editdecay.data import load_source
from editdecay.data.embedded_task import EmbeddedTask
from editdecay.data.instructions import tokenize
from editdecay.finetune.attention import (
    EAGER_CPU_LIMIT_BYTES,
    attention_kernel,
    current_kernel,
    eager_attention_bytes,
    training_kernel,
)
from editdecay.finetune.callback import DecayCallback
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.train import train
from editdecay.finetune.trainable import resolve_plan

TASK = EmbeddedTask(n_train=24, n_test=8)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fit(model, recipe, **kw):
    data = tokenize(load_source("embedded", task=TASK), tok(), cutoff_len=64, template="compact")
    return train(model, tok(), recipe, data, plan=resolve_plan(recipe, model), progress=False, **kw)


def test_recipe_names_the_field_and_the_value_of_an_unknown_kernel():
    with pytest.raises(ConfigError, match=r"attention_kernel.*'flash'"):
        Recipe(method="lora", max_steps=1, attention_kernel="flash")
    # the default is left out of the recipe's JSON (stage ids of recipes without it are unchanged)
    assert "attention_kernel" not in Recipe(method="lora", max_steps=1).to_dict()
    assert Recipe(method="lora", max_steps=1, attention_kernel="sdpa").to_dict()["attention_kernel"] == "sdpa"


def test_auto_is_eager_on_the_cpu_for_short_sequences_only():
    model = tiny_model("llama")
    cfg = model.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    short = Recipe(method="lora", max_steps=1, batch_size=8, cutoff_len=160)
    assert eager_attention_bytes(heads, layers, 8, 160) == 8 * heads * 160 ** 2 * layers * 8
    # with attention dropout eager attention also keeps the mask and the dropped probabilities
    assert eager_attention_bytes(heads, layers, 8, 160, dropout=0.1) == 8 * heads * 160 ** 2 * layers * 12
    assert training_kernel(model, short, CPU) == "eager"
    assert training_kernel(model, short, CUDA) is None                  # GPUs keep the model's own kernel
    # sequences whose attention matrices pass the limit keep the model's kernel on the CPU too
    n = 2
    while eager_attention_bytes(heads, layers, 16, n) <= EAGER_CPU_LIMIT_BYTES:
        n *= 2
    assert training_kernel(model, short.replace(batch_size=16, cutoff_len=n), CPU) is None
    assert training_kernel(model, short.replace(batch_size=16, cutoff_len=n // 2), CPU) == "eager"
    # a named kernel is used as named, on any device
    assert training_kernel(model, short.replace(attention_kernel="sdpa"), CPU) == "sdpa"
    assert training_kernel(model, short.replace(attention_kernel="eager"), CUDA) == "eager"
    # GPT-2 names its heads, layers and attention dropout differently: read through core.arch.ConfigSizes
    gpt2 = tiny_model("gpt2", attn_pdrop=0.1)
    assert gpt2.config.attn_pdrop == 0.1
    m = 2
    while eager_attention_bytes(gpt2.config.n_head, gpt2.config.n_layer, 16, m, dropout=0.1) <= EAGER_CPU_LIMIT_BYTES:
        m *= 2
    assert training_kernel(gpt2, short.replace(batch_size=16, cutoff_len=m // 2), CPU) == "eager"
    assert training_kernel(gpt2, short.replace(batch_size=16, cutoff_len=m), CPU) is None


def test_the_kernel_switches_inside_and_is_restored_after_errors():
    model = tiny_model("llama")
    own = current_kernel(model)
    other = "eager" if own != "eager" else "sdpa"
    with attention_kernel(model, other) as used:
        assert current_kernel(model) == other == used
    assert current_kernel(model) == own
    with pytest.raises(RuntimeError, match="boom"):
        with attention_kernel(model, other):
            raise RuntimeError("boom")
    assert current_kernel(model) == own
    with attention_kernel(model, None):
        assert current_kernel(model) == own


def test_training_uses_eager_on_the_cpu_evaluations_keep_the_models_kernel(tmp_path):
    model = tiny_model("llama")
    own = current_kernel(model)
    assert own == "sdpa"                 # transformers' default: the switch below is a real one
    seen_in_forward, seen_in_eval = [], []

    def spy(module, args):
        seen_in_forward.append(current_kernel(model))

    class Spy(DecayCallback):
        def evaluate(self, m, tokenizer, step, epoch=None):
            seen_in_eval.append(current_kernel(m))
            return {"step": step}

    model.model.layers[0].register_forward_pre_hook(spy)
    out = fit(model, Recipe(method="lora", max_steps=3, batch_size=4, lora_r=4), callback=Spy(every=1))
    assert set(seen_in_eval) == {own} and len(seen_in_eval) == 4                   # steps 0-3
    assert seen_in_forward.count("eager") == 3                                     # one micro-batch per step
    assert out.precision["attention_kernel"] == "eager"
    assert current_kernel(out.model) == own


def test_eager_and_sdpa_train_the_same_model_up_to_rounding(tmp_path):
    outs = {}
    for kernel in ("eager", "sdpa"):
        log = tmp_path / f"{kernel}.jsonl"
        o = fit(tiny_model("llama"), Recipe(method="full", max_steps=4, batch_size=4, attention_kernel=kernel),
                log_path=log)
        outs[kernel] = ([json.loads(line)["loss"] for line in log.read_text().splitlines()],
                        {k: v.clone() for k, v in o.model.state_dict().items()})
        assert o.precision["attention_kernel"] == kernel
    (l_e, w_e), (l_s, w_s) = outs["eager"], outs["sdpa"]
    assert l_e == pytest.approx(l_s, rel=1e-4)
    assert l_e[-1] < l_e[0]                                                        # it trained
    for k in w_e:
        torch.testing.assert_close(w_e[k], w_s[k], rtol=1e-4, atol=1e-5)


def test_a_model_that_cannot_switch_trains_on_its_own_kernel_and_says_so(monkeypatch):
    model = tiny_model("llama")
    calls = []
    # as transformers does for a model class that cannot switch: a logged warning, the kernel unchanged
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, k: calls.append(k), raising=False)
    out = fit(model, Recipe(method="lora", max_steps=3, batch_size=4, lora_r=4))
    assert out.precision["attention_kernel"] == "sdpa" == current_kernel(model)
    assert calls == ["eager"]                      # asked once, not at every step


def test_the_memory_plan_counts_eager_attention_where_the_trainer_runs_it():
    from editdecay.core.memory_plan import ModelDims
    from editdecay.grid.memory import train_setting

    model = tiny_model("llama")
    dims = ModelDims.of_model(model)
    recipe = Recipe(method="full", max_steps=1, batch_size=8, cutoff_len=96)
    cpu = train_setting(recipe, dims, model=model, device="cpu")
    assert cpu.attention_matrices == eager_attention_bytes(dims.heads, cpu.layers_trained, 8, 96) > 0
    assert train_setting(recipe, dims, model=model, device="cuda").attention_matrices == 0
    assert train_setting(recipe, dims, model=model).attention_matrices == 0          # device not known
    assert train_setting(recipe.replace(attention_kernel="eager"), dims, model=model).attention_matrices > 0
    assert train_setting(recipe.replace(attention_kernel="sdpa"), dims, model=model,
                         device="cpu").attention_matrices == 0
