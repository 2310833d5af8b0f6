"""The training loop: divergence stops the run with its log kept, seeding, accumulation, precision options."""

from __future__ import annotations

import json

import pytest
import torch
from support.models import snapshot, tiny_model, tok

from editdecay.data.embedded_task import EmbeddedTask
from editdecay.data import load_source
from editdecay.data.instructions import tokenize
from editdecay.finetune.callback import DecayCallback
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.train import DivergedError, total_optimizer_steps, train
from editdecay.finetune.trainable import resolve_plan

TASK = EmbeddedTask(n_train=24, n_test=8)


def data(cutoff=64):
    return tokenize(load_source("embedded", task=TASK), tok(), cutoff_len=cutoff, template="compact")


def fit(model, recipe, **kw):
    return train(model, tok(), recipe, data(), plan=resolve_plan(recipe, model), progress=False, **kw)


def losses(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_nan_loss_stops_the_run_and_keeps_the_log(tmp_path):
    model = tiny_model("llama")
    calls = {"n": 0}

    def poison(module, args, output):   # from the 3rd forward pass on, the embeddings are NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 3 else output

    model.get_input_embeddings().register_forward_hook(poison)
    log = tmp_path / "log.jsonl"
    with pytest.raises(DivergedError, match=r"loss became nan at step 3 of 10.*learning_rate"):
        fit(model, Recipe(method="lora", max_steps=10, batch_size=4, lora_r=4), log_path=log)
    rows = losses(log)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in rows[:2]) and rows[2]["event"] == "diverged"


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    log = tmp_path / "log.jsonl"
    with pytest.raises(DivergedError, match="became (nan|inf)"):
        fit(tiny_model("gpt2"), Recipe(method="full", max_steps=50, learning_rate=1e12, batch_size=4,
                                       max_grad_norm=None), log_path=log)
    rows = losses(log)
    assert rows[-1]["event"] == "diverged" and len(rows) >= 2


def test_training_is_seeded_and_reduces_the_loss(tmp_path):
    runs = []
    for i in range(2):
        log = tmp_path / f"log{i}.jsonl"
        fit(tiny_model("llama"), Recipe(method="lora", max_steps=8, learning_rate=5e-3, batch_size=4, lora_r=4,
                                  seed=7), log_path=log)
        runs.append([r["loss"] for r in losses(log)])
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0]
    other = tmp_path / "other.jsonl"
    fit(tiny_model("llama"), Recipe(method="lora", max_steps=8, learning_rate=5e-3, batch_size=4, lora_r=4, seed=8),
        log_path=other)
    assert [r["loss"] for r in losses(other)] != runs[0]


def test_gradient_accumulation_equals_one_large_batch():
    # One step over 8 examples either as 1x8 or 4x2: the token-weighted loss makes the updates equal.
    results = []
    for bs, acc in ((8, 1), (2, 4)):
        model = tiny_model("llama")
        out = fit(model, Recipe(method="full", max_steps=1, batch_size=bs, grad_accum=acc, learning_rate=1e-3,
                                max_grad_norm=None))
        results.append((snapshot(model), out.loss_tokens, out.tokens))
    (a, la, ta), (b, lb, tb) = results
    assert (la, ta) == (lb, tb)
    # Adam's first step is lr * g / (|g| + eps): where |g| is near eps the order of float summation
    # (one batch of 8 vs 4 micro-batches of 2) moves the update by up to ~0.3% of lr (2.8e-6 with
    # transformers 5.24 / torch 2.13). A wrong loss weighting moves it by O(lr) = 1e-3.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    fresh = snapshot(tiny_model("llama"))
    assert any(not torch.equal(a[k], fresh[k]) for k in a)          # the step did change the weights


def test_gradient_checkpointing_gives_the_same_training():
    logs = []
    for gc in (False, True):
        model = tiny_model("llama")
        out = fit(model, Recipe(method="lora", max_steps=3, batch_size=4, lora_r=4, lora_dropout=0.0,
                                gradient_checkpointing=gc))
        logs.append((out.final_loss, snapshot(out.model)))
    assert logs[0][0] == pytest.approx(logs[1][0], abs=1e-5)
    assert max((logs[0][1][k] - logs[1][1][k]).abs().max().item() for k in logs[0][1]) < 1e-5


def test_bf16_autocast_trains_on_the_models_device():
    model = tiny_model("gpt2")
    out = fit(model, Recipe(method="lora", max_steps=2, batch_size=4, lora_r=4, dtype="bfloat16"))
    assert out.final_loss is not None and out.final_loss > 0
    assert next(model.parameters()).dtype == torch.float32        # weights keep their dtype


def test_epochs_set_the_step_count():
    r = Recipe(epochs=2.0, batch_size=5, grad_accum=2)
    assert total_optimizer_steps(r, 24) == 5        # 5 micro-batches per epoch, 10 in all, 2 per step
    assert total_optimizer_steps(Recipe(epochs=0.01, batch_size=5), 24) == 1


def test_callback_measures_step_zero_before_training_and_every_k(tmp_path):
    model = tiny_model("llama")
    cb = DecayCallback(task_records=TASK.records()[1], every=2, path=tmp_path / "curve.jsonl")
    fit(model, Recipe(method="lora", max_steps=5, batch_size=4, lora_r=4), callback=cb)
    assert [p["step"] for p in cb.points] == [0, 2, 4, 5]
    assert [json.loads(l)["step"] for l in (tmp_path / "curve.jsonl").read_text().splitlines()] == [0, 2, 4, 5]
    assert all(p["n_task"] == 8 and 0 <= p["task_accuracy"] <= 1 for p in cb.points)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_loss_on_selected_positions_equals_the_models_own_loss(family, method):
    from editdecay.finetune.train import collate, token_loss_sum
    from editdecay.finetune.trainable import prepare_model

    model = tiny_model(family)
    recipe = Recipe(method=method, max_steps=1, lora_r=4)
    model = prepare_model(model, recipe, resolve_plan(recipe, model)).eval()
    batch = collate(list(data().examples[:5]), tok().pad_token_id, torch.device("cpu"))
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        ours = token_loss_sum(model, batch) / n
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_group_by_length_pads_less_and_still_sees_every_example_once_per_epoch():
    """`group_by_length` draws micro-batches of similar length (transformers' length-grouped sampler): fewer padded
    positions than the plain shuffle, and one epoch is still a permutation of the examples."""
    from editdecay.finetune.train import _micro_batches

    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    examples = tuple(SimpleNamespace(input_ids=[1] * int(k)) for k in torch.randint(5, 200, (60,), generator=gen))
    n, bs = len(examples), 4
    batches = {}
    for grouped in (False, True):
        stream = _micro_batches(examples, bs, seed=0, group_by_length=grouped)
        epoch = [next(stream) for _ in range(-(-n // bs))]
        assert sorted(id(e) for mb in epoch for e in mb) == sorted(id(e) for e in examples)
        batches[grouped] = sum(max(len(e.input_ids) for e in mb) * len(mb) for mb in epoch)
    assert batches[True] < batches[False]


def test_group_by_length_is_left_out_of_the_recipe_json_at_its_default():
    """Stage ids hash the recipe's JSON: recipes without the option keep their ids; with it, the id changes."""
    plain = Recipe(max_steps=2)
    assert "group_by_length" not in plain.model_dump_json()
    assert '"group_by_length":true' in plain.replace(group_by_length=True).model_dump_json()


def test_group_by_length_trains_with_the_same_step_count_and_reduces_the_loss(tmp_path):
    recipe = Recipe(method="lora", lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=8, batch_size=4,
                    warmup_steps=0, template="compact", group_by_length=True)
    out = fit(tiny_model("llama"), recipe, log_path=tmp_path / "log.jsonl")
    rows = losses(tmp_path / "log.jsonl")
    assert out.steps == 8 and len(rows) == 8
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
