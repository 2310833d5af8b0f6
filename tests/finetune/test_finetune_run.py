"""One experiment end to end on a tiny model with a synthetic patch: stages, curve, E7 measures, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support.edits import synthetic_patch
from support.models import tiny_model, tok

from editdecay.core.errors import ConfigError
from editdecay.core.models import wrap
from editdecay.data import load_source
from editdecay.data.embedded_task import EmbeddedTask
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune
from editdecay.finetune.train import DivergedError
from editdecay.measure.decay import edit_flip_ratio, relative_decrease
from editdecay.measure.metrics import RequestOutcome, aggregate, evaluate_requests

TASK = EmbeddedTask(n_train=24, n_test=6)


def run(tmp_path, recipe, name="out", eval_every=0, **kw):
    model = tiny_model("llama")
    patch = synthetic_patch(model)
    lm = wrap(model, tok(), name="tiny-llama", source="config")
    result = run_finetune(lm, recipe, load_source("embedded", task=TASK), tmp_path / name, progress=False,
                          edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply),
                          measures=Measures(task=TASK, eval_every=eval_every), **kw)
    return result, patch


def test_result_holds_stages_curve_decay_and_trainable_names(tmp_path):
    recipe = Recipe(method="lora", layers="edited", targets="mlp", max_steps=4, batch_size=4, lora_r=4,
                    learning_rate=5e-2, template="compact", cutoff_len=64)
    r, patch = run(tmp_path, recipe, eval_every=2, save="both")
    res = r.result
    on_disk = json.loads((r.out / "result.json").read_text())
    assert on_disk["status"] == "done" and on_disk["schema_version"] >= 1
    assert set(res["metrics"]) == {"M0", "M_e", "M_ef"} and res["models"] == {"before": "M_e", "after": "M_ef"}
    assert [p["step"] for p in res["curve"]] == [0, 2, 4]
    for stage, point in (("M_e", res["curve"][0]), ("M_ef", res["curve"][-1])):
        for k in ("efficacy", "paraphrase", "neighborhood", "task_accuracy"):
            assert res["metrics"][stage][k] == point[k]
    assert res["metrics"]["M_e"]["n"] == 4 and res["metrics"]["M_e"]["n_task"] == 6
    # M0 is the unedited model: measured before the patch, so its margins differ from M_e's.
    assert any(row["M0"]["margin"] != row["M_e"]["margin"] for row in res["requests"])
    # M_e equals a direct measurement of the patched model.
    fresh = tiny_model("llama")
    patch.apply(fresh)
    direct = aggregate(evaluate_requests(fresh, tok(), patch.requests))
    assert res["metrics"]["M_e"]["efficacy"] == direct["efficacy"]
    assert res["metrics"]["M_e"]["margin"] == pytest.approx(direct["margin"], abs=1e-5)
    # Trainable parameters: adapters on the edited MLP modules only.
    names = res["trainable_parameters"]
    assert names and all("lora_" in n and (".layers.1.mlp." in n or ".layers.2.mlp." in n) for n in names)
    assert "model.layers.1.mlp.down_proj" in res["plan"]["modules"]
    # E7 bookkeeping is consistent with the per-request rows.
    efr = res["decay"]["edit_flip_ratio"]
    assert efr["n_flipped"] == sum(row["flipped"] for row in res["requests"])
    assert efr["n_success_edited"] == sum(row["success"]["M_e"] for row in res["requests"])
    assert res["merge_check"]["max_abs_logit_diff"] < 1e-4
    assert res["training"]["steps"] == 4 and res["training"]["tokens_per_second"] > 0
    assert res["data"]["kind"] == "embedded" and res["data"]["n_examples"] == 24
    assert res["recipe"] == recipe.to_dict()
    assert {"train", "tokenize", "eval_pre", "apply_edit", "save"} <= set(res["timings"])
    # The step log and curve file were written line by line.
    log = [json.loads(l) for l in (r.out / "train_log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log if "event" not in l] == [1, 2, 3, 4]
    assert len((r.out / "curve.jsonl").read_text().splitlines()) == 3


def test_a_list_schedule_and_epochs_give_the_curve_its_steps_and_dose(tmp_path):
    """One epoch of 24 examples at batch 4 is 6 steps; the curve is measured at the listed steps, the last step
    and step 0, each point with the epochs trained so far."""
    recipe = Recipe(method="lora", targets="mlp", epochs=1, batch_size=4, lora_r=4, template="compact",
                    cutoff_len=64)
    r, _ = run(tmp_path, recipe, eval_every=[1, 3, 9])
    curve = r.result["curve"]
    assert [p["step"] for p in curve] == [0, 1, 3, 6]
    assert [p["epoch"] for p in curve] == [0.0, pytest.approx(4 / 24, abs=1e-4), 0.5, 1.0]
    assert r.result["eval_every"] == (1, 3, 9) or r.result["eval_every"] == [1, 3, 9]


def test_saved_outputs_reproduce_the_fine_tuned_model(tmp_path):
    from peft import PeftModel

    recipe = Recipe(method="dora", layers="edited", max_steps=3, batch_size=4, lora_r=4, learning_rate=5e-2,
                    template="compact", cutoff_len=64)
    r, patch = run(tmp_path, recipe, save="both")
    ids = torch.tensor([[5, 17, 300, 42, 7, 9]])
    with torch.no_grad():
        want = r.model(input_ids=ids).logits
        rebuilt = tiny_model("llama")
        patch.apply(rebuilt)
        weights = load_file(str(r.out / "weights.safetensors"))
        assert set(weights) >= {"model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"}
        assert not any(".layers.0." in k or ".layers.3." in k for k in weights)
        missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
        assert not unexpected
        assert torch.equal(rebuilt(input_ids=ids).logits, want)
        base = tiny_model("llama")
        patch.apply(base)
        adapted = PeftModel.from_pretrained(base, str(r.out / "adapter")).eval()
        assert (adapted(input_ids=ids).logits - want).abs().max() < 1e-4


def test_full_fine_tuning_without_edits_records_task_only(tmp_path):
    model = tiny_model("gpt2")
    lm = wrap(model, tok(), name="tiny-gpt2", source="config")
    recipe = Recipe(method="full", layers=(0, 1), max_steps=2, batch_size=4, template="compact", cutoff_len=64)
    r = run_finetune(lm, recipe, load_source("embedded", task=TASK), tmp_path / "o", measures=Measures(task=TASK),
                     progress=False)
    res = r.result
    assert set(res["metrics"]) == {"M0", "M_f"} and res["decay"] is None and res["requests"] == []
    assert res["metrics"]["M0"]["n"] == 0 and res["metrics"]["M_f"]["n_task"] == 6
    weights = load_file(str(r.out / "weights.safetensors"))
    assert set(weights) == {n for n in res["trainable_parameters"]}
    assert all(n.startswith(("transformer.h.0.", "transformer.h.1.")) for n in weights)
    with pytest.raises(ConfigError, match="already holds a fine-tuning run"):
        run_finetune(lm, recipe, load_source("embedded", task=TASK), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="method='full' has no adapter"):
        run_finetune(lm, recipe, load_source("embedded", task=TASK), tmp_path / "p", save="adapter")


def test_divergence_writes_a_result_marked_diverged(tmp_path):
    model = tiny_model("llama")
    patch = synthetic_patch(model)
    calls = {"n": 0}

    def poison(module, args, output):     # the second training forward pass produces NaN
        calls["n"] += module.training
        return output * float("nan") if calls["n"] >= 2 else output

    def edit_then_poison(m):
        patch.apply(m)
        m.get_input_embeddings().register_forward_hook(poison)

    lm = wrap(model, tok(), name="tiny-llama", source="config")
    recipe = Recipe(method="full", max_steps=5, batch_size=4, template="compact", cutoff_len=64)
    with pytest.raises(DivergedError, match="at step 2 of 5"):
        run_finetune(lm, recipe, load_source("embedded", task=TASK), tmp_path / "out", measures=Measures(task=TASK),
                     edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=edit_then_poison),
                     progress=False)
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["status"] == "diverged" and "loss became nan" in res["error"] and res["curve"][0]["step"] == 0
    log = [json.loads(l) for l in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == [1, 2] and log[-1]["event"] == "diverged"


def outcome(case_id, efficacy):
    return RequestOutcome(case_id=case_id, style="counterfact", efficacy=efficacy, paraphrase=None,
                          neighborhood=None, efficacy_acc=efficacy, paraphrase_acc=None, neighborhood_acc=None)


def test_edit_flip_ratio_counts_successes_lost_after_fine_tuning():
    edited = [outcome("a", 1.0), outcome("b", 1.0), outcome("c", 0.0), outcome("d", 0.5)]
    tuned = [outcome("d", 0.4), outcome("c", 1.0), outcome("b", 1.0), outcome("a", 0.0)]   # order differs
    efr = edit_flip_ratio(edited, tuned)
    assert (efr["n_success_edited"], efr["n_flipped"], efr["value"]) == (3, 2, pytest.approx(2 / 3))
    assert efr["flipped"] == ["a", "d"]
    assert edit_flip_ratio([outcome("a", 0.0)], [outcome("a", 1.0)])["value"] is None
    with pytest.raises(ValueError, match="case_id 'a'"):
        edit_flip_ratio([outcome("a", 1.0)], [outcome("b", 1.0)])
    rd = relative_decrease({"efficacy": 0.8, "paraphrase": 0.0, "neighborhood": None},
                           {"efficacy": 0.6, "paraphrase": 0.1, "neighborhood": 0.5})
    assert rd == {"efficacy": pytest.approx(0.25), "paraphrase": None, "neighborhood": None}


def test_a_finished_run_loads_back_and_a_pickled_adapter_is_refused(tmp_path):
    # load_finetuned (used by the grid's evaluate stage and the report) reproduces the trained model's logits, and
    # never lets peft fall back to a pickled adapter_model.bin.
    from editdecay.core.errors import EditDecayError
    from editdecay.finetune.run import load_finetuned

    recipe = Recipe(method="lora", layers="all", targets="mlp", max_steps=2, batch_size=4, lora_r=4,
                    learning_rate=5e-2, template="compact", cutoff_len=64)
    model = tiny_model("llama")
    lm = wrap(model, tok(), name="tiny-llama", source="config")
    ft = run_finetune(lm, recipe, load_source("embedded", task=TASK), tmp_path / "run", measures=Measures(task=TASK),
                      progress=False, save="adapter")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        want = ft.model.eval()(input_ids=ids).logits                 # eval: no adapter dropout
    fresh = wrap(tiny_model("llama"), tok(), name="tiny-llama", source="config")
    with torch.no_grad():
        got = load_finetuned(fresh, tmp_path / "run").eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    adapter = tmp_path / "run" / "adapter"
    st = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(st)), adapter / "adapter_model.bin")
    st.unlink()
    with pytest.raises(EditDecayError, match="no adapter_model.safetensors.*adapter_model.bin"):
        load_finetuned(wrap(tiny_model("llama"), tok(), name="tiny-llama", source="config"), tmp_path / "run")
