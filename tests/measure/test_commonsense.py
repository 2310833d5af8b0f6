"""The study's downstream protocol (`commonsense:DIR`): prompts equal to the original code's, answer-word
extraction on the tricky cases, batched left-padded generation equal to unbatched generation, accuracy over
LLM-Adapters-format test files, the spec syntax, and the protocol named in every result.

Generation is checked two ways: a scripted stand-in model whose reply to each prompt is known (so accuracy
and extraction are exact), and a tiny random Llama whose batched, left-padded responses must equal responses
generated one prompt at a time by plain `transformers` calls written here.
"""

from __future__ import annotations

import json

import pytest
import torch
from support.models import tiny_model, tok
from torch import nn

from editdecay.core.errors import ConfigError, DataError
from editdecay.measure.downstream import DownstreamSpec, evaluate_downstream, parse_tasks
from editdecay.measure.downstream import commonsense as cs
from editdecay.measure.downstream.score import accuracy_by_protocol, mean_accuracy, protocol_of
from editdecay.measure.downstream.spec import is_generation

FIXTURE = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "commonsense"


def write_task(root, task, rows):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / "test.json").write_text(json.dumps(rows))


def row(instruction, answer, input=""):
    return {"instruction": instruction, "input": input, "output": f"the correct answer is {answer}",
            "answer": answer}


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("task, response, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "I cannot tell.", ""),                                   # no match
    ("boolq", "True", ""),                                             # case-sensitive, as the original
    ("boolq", "it is untrue", "true"),                                 # no word boundaries: inside a word
    ("boolq", "false, or maybe true", "false"),                        # two words: the leftmost one
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("social_i_qa", "answer12", "answer1"),                            # inside a longer token
    ("ARC-Easy", "answer5 then answer3", "answer5"),
    ("hellaswag", "ending4", "ending4"),
    ("hellaswag", "ending5 and ending3", "ending3"),                   # not an answer word of the task
    ("winogrande", "option3 option2", "option2"),
    ("openbookqa", "  answer2  ", "answer2"),
])
def test_answer_extraction_follows_the_original_regex(task, response, expected):
    assert cs.extract_answer(task, response) == expected


def test_the_response_is_the_text_after_the_answer_prefix_as_each_codebase_cuts_it():
    decoded = "prompt ### Response:\n  the answer is answer2 ### Response: answer3"
    # memit_cyj: split(prefix)[-1]; LLM-Adapters: split("### Response:")[1]
    assert cs.response_of(decoded, "study", "### Response:") == "answer3"
    assert cs.response_of(decoded, "llm-adapters", "### Response:") == "the answer is answer2"
    assert cs.response_of("Question: q\nAnswer: true", "study", "Answer:") == "true"


# --------------------------------------------------------------------------- prompts

# Rendered by the original functions (memit_cyj util/edit_inherit.py customize_prompt for a "llama" model,
# LLM-Adapters commonsense_evaluate.py generate_prompt) for instruction "Q?" and input "I": trailing spaces
# and indentation matter to the tokens the model sees.
S20, S16 = " " * 20, " " * 16
STUDY_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  f"request.  \n\n{S20}### Instruction:\n{S20}Q?\n\n{S20}### Response:\n{S20}")
STUDY_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               f"Write a response that appropriately completes the request. \n\n{S20}### Instruction:\n{S20}Q?\n\n"
               f"{S20}### Input:\n{S20}I\n\n{S20}### Response:\n{S20}")
ADAPTERS_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     f"the request. \n\n{S16}### Instruction:\n{S16}Q?\n\n{S16}### Response:\n{S16}")


def test_prompts_equal_the_original_templates_and_gpt_models_get_the_question_prompt():
    assert cs.render("study-alpaca", "Q?") == STUDY_NO_INPUT
    assert cs.render("study-alpaca", "Q?", "I") == STUDY_INPUT
    assert cs.render("llm-adapters", "Q?") == ADAPTERS_NO_INPUT
    assert cs.render("study-gpt", "Q?") == "Question: Q?\nAnswer: "
    assert cs.render("study-alpaca", "a {brace}") .count("a {brace}") == 1       # braces are not a format string
    assert cs.template_for("study", "llama") == ("study-alpaca", "### Response:")
    assert cs.template_for("study", "gpt2") == ("study-gpt", "Answer:")
    assert cs.template_for("llm-adapters", "gpt2") == ("llm-adapters", "### Response:")
    with pytest.raises(ConfigError, match="prompt='alpaca'"):
        cs.template_for("alpaca", "llama")


# --------------------------------------------------------------------------- a scripted model


class Scripted(nn.Module):
    """Generates a fixed reply per prompt: the reply of the first key of `replies` found in the prompt. Records
    the prompts it saw (decoded without pads) and the width of every batch."""

    def __init__(self, replies: dict[str, str], model_type: str = "llama"):
        super().__init__()
        self.config = type("C", (), {"model_type": model_type, "eos_token_id": tok().eos_token_id})()
        self.embed = nn.Embedding(1, 1)
        self.replies, self.prompts, self.batches = replies, [], []

    def get_input_embeddings(self):
        return self.embed

    def generate(self, input_ids, attention_mask, generation_config):
        self.batches.append((tuple(input_ids.shape), generation_config.num_beams, generation_config.max_new_tokens))
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask.tolist() == sorted(mask.tolist()), "left padding: pads first"
            prompt = tok().decode(ids[mask.bool()])
            self.prompts.append(prompt)
            reply = next(v for k, v in self.replies.items() if k in prompt)
            out.append(ids.tolist() + tok().encode(reply) + [tok().eos_token_id])
        width = max(len(x) for x in out)
        return torch.tensor([x + [tok().eos_token_id] * (width - len(x)) for x in out])


def test_accuracy_on_scripted_replies_with_left_padded_batches_and_inputs_in_the_prompt(tmp_path):
    write_task(tmp_path, "boolq", [row("Is the sky green?", "false"), row("Is water wet?", "true"),
                                   row("Is fire cold?", "false", input="Fire burns."),
                                   row("Is ice hot at all, by any measure whatsoever?", "false")])
    write_task(tmp_path, "piqa", [row("Open a jar.", "solution1"), row("Boil an egg.", "solution2")])
    model = Scripted({"sky": "the correct answer is false", "water": "true. (not false)", "fire": "False",
                      "ice": "untrue", "jar": "solution12", "egg": "I would use solution1"})
    spec = DownstreamSpec([f"commonsense:{tmp_path}:boolq,piqa"], batch_size=3, num_beams=2, max_new_tokens=7)
    res = evaluate_downstream(model, tok(), spec)
    assert res.tasks["commonsense:boolq"] == {"acc": 0.5, "n": 4, "n_no_answer": 1}
    assert res.tasks["commonsense:piqa"] == {"acc": 0.5, "n": 2, "n_no_answer": 0}
    assert res.score == pytest.approx(0.5)
    boolq = res.predictions["commonsense:boolq"]
    assert [r["prediction"] for r in boolq] == ["false", "true", "", "true"]
    assert [r["correct"] for r in boolq] == [True, True, False, False]
    assert boolq[1]["response"] == "true. (not false)" and boolq[3]["index"] == 3
    # Batches of 3 then 1 (boolq) and 2 (piqa), beams and new tokens passed through.
    assert [(b[0][0], b[1], b[2]) for b in model.batches] == [(3, 2, 7), (1, 2, 7), (2, 2, 7)]
    assert model.prompts[2] == cs.render("study-alpaca", "Is fire cold?", "Fire burns.")
    assert "### Input:" not in model.prompts[0]
    prov = res.provenance
    assert prov["tasks"]["commonsense:boolq"]["protocol"] == "generation"
    assert prov["generation"]["num_beams"] == 2 and prov["generation"]["template"] == "study-alpaca"
    assert prov["score_protocol"] == "generation" and prov["harness"] is None
    assert prov["tasks"]["commonsense:piqa"]["digest"] == cs.digest(spec.tasks[0]) != "missing"


def test_gpt_models_get_the_question_prompt_and_the_text_after_answer(tmp_path):
    write_task(tmp_path, "winogrande", [row("Pick one: option1 or option2?", "option2")])
    model = Scripted({"Pick": "option2"}, model_type="gpt2")
    res = evaluate_downstream(model, tok(), [f"commonsense:{tmp_path}:winogrande"])
    assert model.prompts == ["Question: Pick one: option1 or option2?\nAnswer: "]
    assert res.tasks["commonsense:winogrande"]["acc"] == 1.0
    # The prompt itself names option1 first, so cutting at the wrong place would extract option1.
    assert res.predictions["commonsense:winogrande"][0]["prediction"] == "option2"


def test_defaults_are_the_studys_four_beams_and_32_new_tokens():
    spec = DownstreamSpec([f"commonsense:{FIXTURE}:boolq"])
    assert (spec.num_beams, spec.max_new_tokens, spec.prompt) == (4, 32, "study")


# --------------------------------------------------------------------------- a tiny model end to end


def reference_responses(model, prompts, beams, new):
    """One prompt at a time, no padding: plain transformers generate, decode, split at the last prefix."""
    from transformers import GenerationConfig

    out = []
    for p in prompts:
        ids = torch.tensor([tok().encode(p)])
        cfg = GenerationConfig(do_sample=False, num_beams=beams, max_new_tokens=new,
                               pad_token_id=tok().pad_token_id, eos_token_id=tok().eos_token_id)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        out.append(tok().decode(seq[0], skip_special_tokens=True).split("### Response:")[-1].strip())
    return out


def test_tiny_model_batched_responses_equal_unbatched_ones_on_the_real_fixture():
    model = tiny_model("llama", seed=3, scale=4.0)
    spec = DownstreamSpec([f"commonsense:{FIXTURE}:boolq,ARC-Easy"], limit=3, batch_size=3, num_beams=2,
                          max_new_tokens=5)
    res = evaluate_downstream(model, tok(), spec)
    loaded = cs.load(spec.tasks[0])
    for task in ("boolq", "ARC-Easy"):
        rows = res.predictions[cs.task_key(task)]
        prompts = [cs.render("study-alpaca", r.instruction, r.input) for r in loaded.records[task][:3]]
        assert [r["response"] for r in rows] == reference_responses(model, prompts, 2, 5)
        assert all(r["response"] for r in rows)                     # something was generated
        assert res.tasks[cs.task_key(task)]["n"] == 3
    assert not model.training


# --------------------------------------------------------------------------- specs and files


def test_spec_syntax_task_lists_and_mixing_with_lm_eval_tasks(tmp_path):
    d = str(FIXTURE)
    assert parse_tasks(f"commonsense:{d}:boolq,piqa") == (f"commonsense:{d}:boolq,piqa",)
    assert parse_tasks(f"commonsense:{d},piqa") == (f"commonsense:{d}", "piqa")        # all eight + lm-eval piqa
    assert parse_tasks(f"commonsense:{d}:arc-e+obqa") == (f"commonsense:{d}:ARC-Easy,openbookqa",)
    rel = parse_tasks("commonsense:fixtures/commonsense:boolq", base_dir=FIXTURE.parent.parent)
    assert rel == (f"commonsense:{d}:boolq",)
    assert is_generation(rel[0]) and not is_generation("piqa")
    with pytest.raises(ConfigError, match=r"'boolk' is not a commonsense task \(did you mean 'boolq'"):
        parse_tasks(f"commonsense:{d}:boolk")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_tasks(f"commonsense:{d}:boolq,boolq")
    with pytest.raises(ConfigError, match="give a directory"):
        parse_tasks("commonsense:")


def test_unusable_files_fail_before_any_model_work_naming_file_and_record(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        cs.load(f"commonsense:{tmp_path}/nowhere:boolq")
    write_task(tmp_path, "boolq", [row("ok?", "true")])
    with pytest.raises(DataError, match=r"no piqa/test.json .* commonsense:.*:boolq"):
        cs.load(f"commonsense:{tmp_path}:boolq,piqa")
    write_task(tmp_path, "piqa", [row("ok", "solution1"), row("bad", "true"), {"input": "x", "answer": "solution1"}])
    with pytest.raises(DataError, match=r"(?s)piqa/test.json: 2 unusable record\(s\).*record 1: answer 'true' is not one "
                                        r"of piqa's answer words.*record 2: field 'instruction'"):
        cs.load(f"commonsense:{tmp_path}:piqa")
    assert cs.digest(f"commonsense:{tmp_path}:boolq") != cs.digest(f"commonsense:{tmp_path}:piqa")


def test_every_fixture_task_reads_and_every_answer_is_one_of_its_words():
    loaded = cs.load(f"commonsense:{FIXTURE}")
    assert list(loaded.records) == list(cs.TASKS)
    for task, records in loaded.records.items():
        assert len(records) >= 10 and {r.answer for r in records} <= set(cs.ANSWER_WORDS[task])
        assert all(r.input == "" for r in records)          # the public test sets carry no inputs


def test_accuracies_of_the_two_protocols_are_never_averaged_together():
    tasks = {"commonsense:boolq": {"acc": 1.0}, "commonsense:piqa": {"acc": 0.5}, "hellaswag": {"acc": 0.0},
             "ppl_c": {"token_perplexity": 9.0}}
    assert protocol_of("commonsense:boolq") == "generation" and protocol_of("hellaswag") == "loglikelihood"
    assert accuracy_by_protocol(tasks) == {"generation": (0.75, 2), "loglikelihood": (0.0, 1)}
    assert mean_accuracy(tasks) == (0.75, 2)
    assert mean_accuracy({"hellaswag": {"acc,none": 0.25}}) == (0.25, 1)
    assert mean_accuracy({"ppl_c": {"token_perplexity": 9.0}}) == (None, 0)


# --------------------------------------------------------------------------- in a fine-tuning run


def test_finetune_run_saves_per_record_predictions_of_every_model(tmp_path):
    from support.edits import synthetic_patch

    from editdecay.core.models import wrap
    from editdecay.finetune import EmbeddedTask, Recipe, load_source
    from editdecay.finetune.run import PREDICTIONS_FILE, EditsUnderTest, Measures, run_finetune

    task = EmbeddedTask(n_train=16, n_test=4)
    recipe = Recipe(method="lora", layers="all", targets="all-linear", max_steps=2, batch_size=4, lora_r=4,
                    learning_rate=5e-2, template="compact", cutoff_len=64)
    spec = DownstreamSpec([f"commonsense:{FIXTURE}:boolq,winogrande", "everyday"], limit=2, num_beams=1,
                          max_new_tokens=3)
    model = tiny_model("llama", scale=4.0)
    patch = synthetic_patch(model)
    lm = wrap(model, tok(), name="tiny-llama", source="config")
    r = run_finetune(lm, recipe, load_source("embedded", task=task), tmp_path / "run", save="none",
                     edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply),
                     measures=Measures(task=task, downstream=spec), progress=False)
    lines = [json.loads(x) for x in (r.out / PREDICTIONS_FILE).read_text().splitlines()]
    assert {(x["model"], x["task"]) for x in lines} == {(m, t) for m in ("M0", "M_e", "M_ef")
                                                        for t in ("commonsense:boolq", "commonsense:winogrande")}
    assert len(lines) == 3 * 2 * 2 and {"response", "prediction", "answer", "correct", "index"} <= set(lines[0])
    result = json.loads((r.out / "result.json").read_text())
    assert result["downstream"]["predictions"] == PREDICTIONS_FILE
    ds = result["metrics"]["M0"]["downstream"]
    assert set(ds) == {"commonsense:boolq", "commonsense:winogrande", "editdecay_everyday"}
    assert ds["commonsense:boolq"]["n"] == 2
    # DS is the study's protocol's mean, never mixed with lm-eval's accuracy on `everyday`.
    acc = [ds[k]["acc"] for k in ("commonsense:boolq", "commonsense:winogrande")]
    assert result["metrics"]["M0"]["downstream_score"] == pytest.approx(sum(acc) / 2)


def test_grid_cell_scores_commonsense_beside_lm_eval_with_the_grids_generation_settings(tmp_path):
    from support.models import save_tiny_model

    from editdecay.grid.plan import build_plan
    from editdecay.grid.runner import run_grid
    from editdecay.grid.spec import grid_from_dict
    from editdecay.grid.store import GridStore

    save_tiny_model(tmp_path / "model")
    grid = {"name": "cs", "models": [{"name": str(tmp_path / "model"), "label": "tiny"}], "n_edits": [0],
            "recipes": [{"method": "lora", "preset": "embedded",
                         "overrides": {"max_steps": 1, "batch_size": 4, "warmup_steps": 0, "lora_r": 4}}],
            "shared": {"downstream": ["embedded", f"commonsense:{FIXTURE}:boolq", "everyday"], "downstream_limit": 2,
                       "downstream_num_beams": 1, "downstream_max_new_tokens": 3,
                       "embedded_task": {"n_train": 8, "n_test": 4}, "device": "cpu", "threads": 1,
                       "cache_dir": str(tmp_path / "cache")}}
    plan = build_plan(grid_from_dict(grid, base_dir=tmp_path))
    ft = next(s for s in plan.stages.values() if s.kind == "finetune")
    assert (ft.spec.downstream.num_beams, ft.spec.downstream.max_new_tokens) == (1, 3)
    assert ft.spec.downstream.digests[f"commonsense:{FIXTURE}:boolq"] == cs.digest(f"commonsense:{FIXTURE}:boolq")
    summary = run_grid(plan, tmp_path / "out", threads=1)
    assert not summary.failed, summary
    result = GridStore(tmp_path / "out").read_result(plan.cells[0].id)
    m = result["metrics"]
    assert m["M0"]["downstream"]["commonsense:boolq"]["n"] == 2 and "editdecay_everyday" in m["M_f"]["downstream"]
    prov = result["downstream"]["provenance"]
    assert prov["tasks"]["commonsense:boolq"]["protocol"] == "generation"
    assert prov["tasks"]["editdecay_everyday"]["protocol"] == "loglikelihood"
    assert prov["generation"]["num_beams"] == 1 and prov["score_protocol"] == "generation"
    assert m["M_f"]["downstream_score"] == m["M_f"]["downstream"]["commonsense:boolq"]["acc"]


@pytest.mark.slow
def test_embedded_model_on_real_boolq_records_as_checked_by_hand(embedded, tmp_path):
    # Records 11 and 16 of the boolq fixture: the only boolq responses of SmolLM2-135M (4 beams, 32 tokens, all
    # 150 fixture records scored) that hold an answer word. Read by hand: record 11 answers "1. The show bloodline
    # is based on a true story. ..." -> the original regex finds 'true' inside "true story" (gold: false);
    # record 16 answers "1. Yes. 2. No. Question: Was the movie strangers based on a true story? ..." -> 'true'
    # from the echoed question (gold: true; right by accident). The base model never writes the answer format.
    rows = json.loads((FIXTURE / "boolq" / "test.json").read_text())
    write_task(tmp_path, "boolq", [rows[11], rows[16]])
    res = evaluate_downstream(embedded.model, embedded.tokenizer, [f"commonsense:{tmp_path}:boolq"], batch_size=2)
    preds = res.predictions["commonsense:boolq"]
    assert preds[0]["response"].startswith("1. The show bloodline is based on a true story.")
    assert [p["prediction"] for p in preds] == ["true", "true"] and res.tasks["commonsense:boolq"]["acc"] == 0.5
