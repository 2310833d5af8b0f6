"""bfloat16 full fine-tuning: master weights train, plain bf16 AdamW stops after its first step (finetune.guard),
and the other ways of training nothing stop with their own named error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from editdecay.data.instructions import IGNORE_INDEX, Example, TrainingSet
from editdecay.finetune.guard import (
    NoTrainableParametersError,
    UpdatesLostError,
    ZeroGradientsError,
    check_trainable,
)
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.train import train
from editdecay.finetune.trainable import resolve_plan


class Tok:
    pad_token_id = 0
    eos_token_id = 2


def tiny_bf16(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, max_position_embeddings=64, vocab_size=101)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def data(labelled: bool = True) -> TrainingSet:
    gen = torch.Generator().manual_seed(3)
    ex = []
    for _ in range(8):
        ids = torch.randint(3, 101, (12,), generator=gen).tolist()
        ex.append(Example(tuple(ids), tuple(ids if labelled else [IGNORE_INDEX] * 12)))
    return TrainingSet(tuple(ex), {"name": "random"})


def study_like(**kw) -> Recipe:
    """The study's full fine-tuning learning rate (5e-6), no warm-up so step 1 is the checked one."""
    base = dict(method="full", targets="all", learning_rate=5e-6, max_steps=3, batch_size=4, warmup_steps=0,
                cutoff_len=16, dtype="bfloat16")
    return Recipe(**{**base, **kw})


def fit(model, recipe, ds=None):
    return train(model, Tok(), recipe, ds or data(), plan=resolve_plan(recipe, model), progress=False)


def test_bf16_weights_without_master_weights_stop_after_the_first_step():
    model = tiny_bf16()
    with pytest.raises(UpdatesLostError, match=r"step 1 .*rounded away.*master_weights"):
        fit(model, study_like(master_weights=False))


def test_bf16_weights_with_master_weights_train():
    model = tiny_bf16()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = fit(model, study_like())                                     # master weights: the default for bf16
    assert out.precision["master_weights"] is True and out.precision["weights"] == "bfloat16"
    assert out.precision["update_check"]["changed_share"] > 0.5
    # Every matrix moved in bf16 after 3 steps; norm weights (1.0, bf16 spacing 2^-7) move once their float32
    # master copies have drifted by half a step, hundreds of steps at lr 5e-6.
    moved = {n for n, p in model.named_parameters() if (p.detach() != before[n]).any()}
    assert moved == {n for n, p in before.items() if p.dim() == 2}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the model keeps its bf16 weights


def test_master_weights_follow_float32_training():
    """bf16 weights + float32 master weights take the steps float32 training takes, up to bf16 rounding of
    the forward pass: the master weights after 3 steps are within bf16 resolution of float32 training."""
    ref = tiny_bf16(torch.float32)
    fit(ref, study_like(dtype="float32", learning_rate=1e-3))
    model = tiny_bf16()
    fit(model, study_like(dtype="float32", learning_rate=1e-3))
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert (a.detach() - b.detach().float()).abs().max() <= 2e-2 * max(1.0, float(a.abs().max())), n


def test_all_gradients_zero_stops_after_the_first_step():
    model = tiny_bf16(torch.float32)
    with pytest.raises(ZeroGradientsError, match="every gradient is zero"):
        fit(model, study_like(dtype="float32"), data(labelled=False))


def test_warm_up_from_zero_checks_the_first_step_with_a_learning_rate():
    model = tiny_bf16()
    with pytest.raises(UpdatesLostError, match="step 2 "):
        fit(model, study_like(master_weights=False, warmup_steps=2))


def test_no_trainable_parameter_is_refused():
    with pytest.raises(NoTrainableParametersError, match="no parameter is trainable"):
        check_trainable(0, "full fine-tuning of layers []")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (editdecay[lowmem]) not installed")
def test_8bit_adamw_with_stochastic_rounding_trains_bf16_weights():
    model = tiny_bf16()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = fit(model, study_like(optimizer="adamw8bit"))
    assert out.precision["stochastic_rounding"] is True and out.precision["master_weights"] is False
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0


def test_adamw_uses_the_fused_kernel_for_plain_tensors_with_the_same_arithmetic():
    """make_optimizer's AdamW is torch's fused kernel for plain tensors (the CPU default loops over tensors in
    Python): its steps equal the single-tensor loop's up to float rounding; master weights keep the loop."""
    from editdecay.finetune.precision import make_optimizer

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 4, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    finals = {}
    for per_tensor in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make_optimizer("adamw", params, lr=1e-2, weight_decay=0.1, stochastic_round=False,
                             per_tensor=per_tensor)
        assert bool(opt.defaults.get("fused")) is not per_tensor
        for g in grads:
            for p, x in zip(params, g):
                p.grad = x.clone()
            opt.step()
        finals[per_tensor] = [p.detach() for p in params]
    for a, b, s in zip(finals[False], finals[True], start):
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, s)
