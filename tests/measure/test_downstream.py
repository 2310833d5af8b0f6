"""Downstream scores through lm-evaluation-harness on models in memory: the authored multiple-choice task and
perplexity agree with scores computed here with plain torch, for plain and peft models; the embedded model is
well above chance on the authored task; bad specs and unreachable data fail before any model work; fine-tuning
runs and grid cells record the scores of every model.

Tiny random Llamas (d=32, weights scaled up so predictions are far from uniform) use the embedded tokenizer.
"""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch
from support.models import tiny_model, tok

from editdecay.core.errors import ConfigError, DataError
from editdecay.measure.downstream import (
    DownstreamSpec,
    evaluate_downstream,
    everyday,
    load_tasks,
    parse_tasks,
)

LIMIT = 24
CORPUS = ["The cat sat on the mat and looked at the garden.",
          "We walked to the market early in the morning, bought bread and apples, and came home before it rained.",
          "Water boils when it is heated enough."]


def scaled_tiny(seed: int = 0):
    return tiny_model("llama", seed=seed, scale=4.0)


@torch.no_grad()
def loglik(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one unpadded forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()          # (T, V)
    lp = torch.log_softmax(logits[start - 1:-1], dim=-1)                     # predicts ids[start:]
    return float(lp.gather(1, torch.tensor(ids[start:])[:, None]).sum())


def independent_mc(model, tokenizer, n: int) -> tuple[float, float]:
    """acc and acc_norm (log-likelihood per character of the option) of the first n items, by hand."""
    hits = hits_norm = 0
    for r in everyday.records()[:n]:
        context = f"Question: {r['question']}\nAnswer:"
        ctx = tokenizer.encode(context)
        lls = []
        for choice in r["choices"]:
            cont = tokenizer.encode(" " + choice)
            assert tokenizer.encode(context + " " + choice) == ctx + cont    # one tokenisation, either way
            lls.append(loglik(model, ctx + cont, len(ctx)))
        hits += int(np.argmax(lls)) == r["label"]
        hits_norm += int(np.argmax(np.array(lls) / [len(c) for c in r["choices"]])) == r["label"]
    return hits / n, hits_norm / n


def rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


# --------------------------------------------------------------------------- specs


def test_specs_are_canonical_and_unknown_names_fail_with_the_valid_list(tmp_path):
    got = parse_tasks("everyday, ARC_EASY,lm-eval:social_iqa,lm-eval:mmlu,obqa", base_dir=tmp_path)
    assert got == ("everyday", "arc-e", "siqa", "lm-eval:mmlu", "obqa")
    assert parse_tasks(["ppl:c.txt", "local:tasks"], base_dir=tmp_path) == (f"ppl:{tmp_path}/c.txt",
                                                                            f"local:{tmp_path}/tasks")
    with pytest.raises(ConfigError, match=r"'hellaswagg' is not known; use one of everyday, boolq.*did you mean "
                                          r"'hellaswag'"):
        parse_tasks(["everyday", "hellaswagg"])
    with pytest.raises(ConfigError, match="listed twice"):
        parse_tasks(["arc-e", "lm-eval:arc_easy"])
    with pytest.raises(ConfigError, match=r"\.txt, \.jsonl, \.json"):
        parse_tasks(["ppl:corpus.csv"])
    with pytest.raises(ConfigError, match="limit=0"):
        DownstreamSpec(("everyday",), limit=0)


def test_unknown_lm_eval_name_and_unreachable_data_fail_before_any_model_work(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # An lm-eval name that does not exist: ConfigError with lm-eval's close names, and no model was needed.
    with pytest.raises(ConfigError, match=r"lm-eval:hellaswag_x.*no task.*did you mean.*'hellaswag"):
        evaluate_downstream(None, None, ["everyday", "lm-eval:hellaswag_x"])
    # A study task whose data is not on this machine: DataError naming it, fast, pointing at local tasks.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'piqa' \(piqa\): its data could not be loaded.*use a local task"):
        load_tasks(["piqa"])
    with pytest.raises(DataError, match="does not exist"):
        load_tasks([f"ppl:{tmp_path}/missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="defines no lm-eval task"):
        load_tasks([f"local:{tmp_path}/empty"])


def test_everyday_items_are_valid_balanced_and_ask_no_capitals():
    items = everyday.records()
    assert len(items) == 110 and all(len(r["choices"]) == 4 for r in items)
    counts = np.bincount([r["label"] for r in items], minlength=4)
    assert counts.min() >= 27 and counts.max() <= 28                  # each slot right a quarter of the time
    assert not any("capital" in r["question"].lower() for r in items)
    assert len({r["question"] for r in items}) == len(items)


# --------------------------------------------------------------------------- scoring


def test_multiple_choice_scores_equal_an_independent_computation_for_plain_and_peft_models():
    from peft import LoraConfig, get_peft_model

    tokenizer = tok()
    model = scaled_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    rng = rng_states()
    res = evaluate_downstream(model, tokenizer, ["everyday"], limit=LIMIT, batch_size=7)
    scores = res.tasks[everyday.TASK_NAME]
    assert model.training                     # restored (lm-eval switches it to eval mode)
    model.eval()
    acc, acc_norm = independent_mc(model, tokenizer, LIMIT)
    assert scores["n"] == LIMIT and scores["acc"] == acc and scores["acc_norm"] == acc_norm
    assert res.score == acc and 0 < scores["acc_stderr"] < 0.2
    assert res.provenance["tasks"][everyday.TASK_NAME]["n_documents"] == 110
    assert res.provenance["lm_eval_version"] and res.provenance["limit"] == LIMIT
    # The model comes back as it went in: weights unchanged, and no random number generator moved.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    after = rng_states()
    assert after[0] == rng[0] and np.array_equal(after[1], rng[1]) and torch.equal(after[2], rng[2])

    # A PeftModel with unmerged adapters is scored with its adapters (random B, so they change the scores).
    peft_model = get_peft_model(scaled_tiny(), LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj",
                                                                                             "down_proj"],
                                                          init_lora_weights=False))
    peft_res = evaluate_downstream(peft_model, tokenizer, ["everyday"], limit=LIMIT)
    peft_scores = peft_res.tasks[everyday.TASK_NAME]
    assert (peft_scores["acc"], peft_scores["acc_norm"]) == independent_mc(peft_model, tokenizer, LIMIT)
    with peft_model.disable_adapter():
        assert independent_mc(peft_model, tokenizer, LIMIT) == (acc, acc_norm)     # same base weights
    assert type(peft_model).__name__.startswith("PeftModel")


def test_perplexity_equals_exp_mean_nll_computed_here(tmp_path):
    tokenizer = tok()
    model = scaled_tiny(seed=1)
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS) + "\n\n\n")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    res = evaluate_downstream(model, tokenizer, [f"ppl:{tmp_path}/corpus.txt"], batch_size=2)
    # lm-eval conditions a document's first token on the prefix token (BOS here) and scores every token.
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nll = n_tokens = n_words = 0
    for text in CORPUS:
        ids = tokenizer.encode(text)
        nll -= loglik(model, [prefix] + ids, 1)
        n_tokens += len(ids)
        n_words += len(re.split(r"\s+", text))
    got = res.tasks["ppl_corpus"]
    assert got["n"] == 3 and got["n_tokens"] == n_tokens
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-4)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-4)
    assert got["token_perplexity"] > 100            # a random model: far from a trained one's ~10-30
    # The same documents as JSON lines give the same numbers; limit takes the first documents.
    again = evaluate_downstream(model, tokenizer, [f"ppl:{tmp_path}/corpus.jsonl"], limit=2)
    first_two = sum(len(tokenizer.encode(t)) for t in CORPUS[:2])
    assert again.tasks["ppl_corpus"]["n"] == 2 and again.tasks["ppl_corpus"]["n_tokens"] == first_two


def test_local_task_directory_is_scored(tmp_path):
    """A user's lm-eval task directory: its YAML (absolute data path) is found and scored like ours."""
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in everyday.records()[:10]))
    (tmp_path / "tasks" / "mine.yaml").write_text(
        f"task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")
    tokenizer = tok()
    model = scaled_tiny()
    res = evaluate_downstream(model, tokenizer, [f"local:{tmp_path}/tasks", "everyday"], limit=10)
    assert set(res.tasks) == {"my_mc", everyday.TASK_NAME}
    assert res.tasks["my_mc"]["acc"] == res.tasks[everyday.TASK_NAME]["acc"] == independent_mc(model, tokenizer,
                                                                                                 10)[0]
    assert res.provenance["tasks"]["my_mc"]["spec"] == f"local:{tmp_path}/tasks"


@pytest.mark.slow
def test_embedded_model_is_well_above_chance_on_the_authored_task(embedded):
    res = evaluate_downstream(embedded.model, embedded.tokenizer, ["everyday"])
    scores = res.tasks[everyday.TASK_NAME]
    # Measured: acc 0.836, acc_norm 0.700 on all 110 items (chance 0.25).
    assert scores["n"] == 110 and scores["acc"] > 0.7 and scores["acc_norm"] > 0.55


# --------------------------------------------------------------------------- fine-tuning runs and grids


def test_run_finetune_records_downstream_for_pre_post_and_finetuned(tmp_path):
    from support.edits import synthetic_patch

    from editdecay.core.models import wrap
    from editdecay.finetune import EmbeddedTask, Recipe, load_source
    from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune

    task = EmbeddedTask(n_train=24, n_test=6)
    (tmp_path / "c.txt").write_text("\n\n".join(CORPUS))
    recipe = Recipe(method="lora", layers="all", targets="all-linear", max_steps=3, batch_size=4, lora_r=4,
                    learning_rate=5e-2, template="compact", cutoff_len=64)
    downstream = DownstreamSpec(("everyday", f"ppl:{tmp_path}/c.txt"), limit=12)

    def run(name, ds):
        model = scaled_tiny()
        patch = synthetic_patch(model)
        lm = wrap(model, tok(), name="tiny-llama", source="config")
        return run_finetune(lm, recipe, load_source("embedded", task=task), tmp_path / name, save="none",
                            edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply),
                            measures=Measures(task=task, downstream=ds), progress=False)

    r = run("with", downstream)
    m = r.result["metrics"]
    on_disk = json.loads((r.out / "result.json").read_text())
    assert on_disk["metrics"] == json.loads(json.dumps(m))
    assert on_disk["downstream"]["spec"]["limit"] == 12 and set(on_disk["downstream"]["seconds"]) == {
        "M0", "M_e", "M_ef"}
    for stage in ("M0", "M_e", "M_ef"):
        assert set(m[stage]["downstream"]) == {everyday.TASK_NAME, "ppl_c"}
        assert m[stage]["downstream"][everyday.TASK_NAME]["n"] == 12
        assert m[stage]["downstream_score"] == m[stage]["downstream"][everyday.TASK_NAME]["acc"]
    # M0 is the unedited model, M_e the patched one, M_ef the trained PeftModel the run returns.
    ref = scaled_tiny()
    assert evaluate_downstream(ref, tok(), downstream).tasks == m["M0"]["downstream"]
    synthetic_patch(ref).apply(ref)
    assert evaluate_downstream(ref, tok(), downstream).tasks == m["M_e"]["downstream"]
    assert evaluate_downstream(r.model, tok(), downstream).tasks == m["M_ef"]["downstream"]
    ppl = [m[s]["downstream"]["ppl_c"]["token_perplexity"] for s in ("M0", "M_e", "M_ef")]
    assert len(set(ppl)) == 3                        # the edit and the training both change the model
    # Scoring does not change the run: the same training without downstream gives the same numbers.
    plain = run("without", None).result
    assert plain["curve"] == r.result["curve"] and plain["training"]["final_loss"] == r.result["training"][
        "final_loss"]
    assert "downstream" not in plain["metrics"]["M_e"] and "downstream" not in plain


def test_grid_cell_holds_downstream_of_m0_and_mf_with_deltas(tmp_path):
    from support.models import save_tiny_model

    from editdecay.grid.plan import build_plan
    from editdecay.grid.runner import run_grid
    from editdecay.grid.spec import grid_from_dict
    from editdecay.grid.store import GridStore, result_row

    save_tiny_model(tmp_path / "model")
    grid = {"name": "ds", "models": [{"name": str(tmp_path / "model"), "label": "tiny"}], "n_edits": [0],
            "recipes": [{"method": "lora", "preset": "embedded",
                         "overrides": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "lora_r": 4}}],
            "shared": {"downstream": ["embedded", "everyday"], "downstream_limit": 8,
                       "embedded_task": {"n_train": 16, "n_test": 4}, "device": "cpu", "threads": 1,
                       "cache_dir": str(tmp_path / "cache")}}
    spec = grid_from_dict(grid, base_dir=tmp_path)
    plan = build_plan(spec)
    ft = next(s for s in plan.stages.values() if s.kind == "finetune")
    assert ft.spec.held_out.spec == "embedded" and ft.spec.downstream.tasks == ("everyday",)
    assert ft.spec.downstream.limit == 8 and ft.spec.downstream.digests["everyday"]
    # A grid with only the embedded task plans no lm-eval scoring.
    plain = build_plan(grid_from_dict({**grid, "shared": {**grid["shared"], "downstream": ["embedded"]}},
                                      base_dir=tmp_path))
    plain_ft = next(s for s in plain.stages.values() if s.kind == "finetune")
    assert plain_ft.spec.downstream is None and plain_ft.spec.held_out == ft.spec.held_out

    summary = run_grid(plan, tmp_path / "out", threads=1)
    assert not summary.failed, summary
    store = GridStore(tmp_path / "out")
    result = store.read_result(plan.cells[0].id)
    m = result["metrics"]
    name = everyday.TASK_NAME
    assert m["M0"]["downstream"][name]["n"] == 8 and m["M_f"]["downstream"][name]["n"] == 8
    assert m["M0"]["task_accuracy"] is not None                       # the embedded task is still scored
    delta = result["decay"]["downstream"]["tasks"][name]["acc"]
    assert delta["M0"] == m["M0"]["downstream"][name]["acc"]
    assert delta["delta_finetune_base"] == pytest.approx(m["M_f"]["downstream"][name]["acc"] - delta["M0"])
    assert result["decay"]["downstream"]["score"]["M_f"] == m["M_f"]["downstream_score"]
    assert result["downstream"]["provenance"]["tasks"][name]["spec"] == "everyday"
    assert result["config"]["downstream_limit"] == 8
    row = result_row(result)
    assert row[f"M0_{name}_acc"] == m["M0"]["downstream"][name]["acc"] and "M_f_downstream_score" in row


def test_cli_scores_downstream_tasks_and_rejects_unknown_ones_before_loading_the_model(tmp_path):
    from support.edits import synthetic_patch
    from typer.testing import CliRunner

    from editdecay.cli import _register, app

    model = scaled_tiny()
    model.save_pretrained(tmp_path / "model")
    tok().save_pretrained(tmp_path / "model")
    from editdecay.core.models import wrap

    patch = synthetic_patch(model)
    patch.model_identity = wrap(model, tok()).identity.to_dict()    # made on these weights (else: foreign, refused)
    patch.save(tmp_path / "patch")
    _register()

    def invoke(*args):
        r = CliRunner().invoke(app, ["finetune", "--method", "lora", "--steps", "2", "--task-train", "16",
                                     "--task-test", "4", "--batch-size", "4", "--rank", "4", "--no-progress", *args],
                               env={"COLUMNS": "250"})
        return r, " ".join(r.output.split())

    r, text = invoke("--model", str(tmp_path / "nonexistent"), "--downstream", "everyday,hellaswagg",
                     "--out", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "'hellaswagg' is not known" in text and "did you mean 'hellaswag'" in text
    r, text = invoke("--model", str(tmp_path / "model"), "--patch", str(tmp_path / "patch"), "--downstream",
                     "everyday", "--downstream-limit", "8", "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    scores = {s: res["metrics"][s]["downstream"][everyday.TASK_NAME] for s in ("M0", "M_e", "M_ef")}
    assert all(v["n"] == 8 for v in scores.values())
    assert f"downstream {everyday.TASK_NAME} (n=8): M0 (base) acc {100 * scores['M0']['acc']:.1f}%" in text


def test_held_out_tasks_have_their_headline_metric_and_stay_out_of_the_downstream_score():
    from editdecay.report.downstream import TaskScores, downstream_score, headline_key, primary_metric

    metrics = {"accuracy": 0.4, "prefix_accuracy": 0.4, "token_accuracy": 0.9, "nll": 0.2}
    assert headline_key({"task_name": "chatterbot-choice"}) == "task_accuracy"       # the answer, exact
    assert headline_key({"task_name": "chatterbot"}) == "task_token_accuracy"        # free text
    assert headline_key({}) == "task_accuracy"                                        # older results: embedded
    assert primary_metric(TaskScores("chatterbot-choice", metrics, 90)) == "accuracy"
    assert primary_metric(TaskScores("chatterbot", metrics, 60)) == "token_accuracy"
    tasks = {"chatterbot-choice": TaskScores("chatterbot-choice", metrics, 90),
             "boolq": TaskScores("boolq", {"acc": 0.6}, 100)}
    assert downstream_score(tasks) == (0.6, 1)
