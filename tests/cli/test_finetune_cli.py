"""`editdecay finetune` on a tiny saved Llama with a saved patch; bad recipes exit 2 naming the field."""

from __future__ import annotations

import json

import pytest
from support.edits import synthetic_patch
from support.models import tiny_model, tok
from typer.testing import CliRunner

from editdecay.cli import _register, app
from editdecay.core.models import wrap


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok().save_pretrained(root / "model")
    patch = synthetic_patch(model)
    patch.model_identity = wrap(model, tok()).identity.to_dict()    # made on these weights (else: foreign, refused)
    patch.save(root / "patch")
    return root


def invoke(args):
    _register()        # all subcommands, as `editdecay` has them (a lone command would become the whole app)
    result = CliRunner().invoke(app, ["finetune", *args], env={"COLUMNS": "250"})
    return result, " ".join(result.output.split())


def test_cli_runs_and_prints_the_three_stages(saved, tmp_path):
    out = tmp_path / "run"
    result, text = invoke(["--model", str(saved / "model"), "--patch", str(saved / "patch"), "--method", "lora",
                           "--layers", "edited", "--targets", "mlp", "--data", "embedded", "--steps", "4",
                           "--eval-every", "2", "--task-train", "24", "--task-test", "6", "--batch-size", "4",
                           "--rank", "4", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for words in ("M0 (base)", "M_e (edited)", "M_ef (edited, then fine-tuned)", "Edit Flip Ratio", "4 steps",
                  "tokens/s"):
        assert words in text
    res = json.loads((out / "result.json").read_text())
    assert res["recipe"]["layers"] == "edited" and res["recipe"]["targets"] == "mlp"
    assert res["plan"]["layers"] == [1, 2] and [p["step"] for p in res["curve"]] == [0, 2, 4]
    assert res["extra"]["patch"]["editor"] == "memit" and set(res["metrics"]) == {"M0", "M_e", "M_ef"}
    assert (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--layers", "9"], "layers: layer index 9 is beyond this model's depth; it has 4 layers"),
    (["--layers", "edited"], "layers='edited' needs the edited layers"),
    (["--lr", "-1"], "learning_rate=-1.0 is not valid"),
    (["--targets", "mlp.fc_out"], "targets: 'mlp.fc_out' is not a linear module"),
    (["--method", "dora", "--targets", "all"], "targets='all'"),
    (["--data", "instructions:/nonexistent.json"], "does not exist"),
    (["--template", "alpaca", "--cutoff", "20"], "cutoff_len=20 is shorter than the prompt template"),
    (["--data", "chatterbot", "--chatterbot-format", "choise"], "format='choise' is not valid (did you mean 'choice'?)"),
])
def test_bad_recipes_fail_before_training_naming_the_field(saved, tmp_path, args, message):
    result, text = invoke(["--model", str(saved / "model"), "--steps", "2", "--no-progress",
                           "--out", str(tmp_path / "bad"), *args])
    assert result.exit_code == 2, result.output
    assert message in text
    assert not (tmp_path / "bad" / "train_log.jsonl").exists()


def test_chatterbot_choice_format_trains_and_scores_the_choice_records(saved, tmp_path):
    out = tmp_path / "choice"
    result, text = invoke(["--model", str(saved / "model"), "--data", "chatterbot", "--chatterbot-format", "choice",
                           "--steps", "2", "--eval-every", "0", "--batch-size", "4", "--cutoff", "160",
                           "--rank", "4", "--no-progress", "--save", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "result.json").read_text())
    assert res["data"]["name"] == "chatterbot-choice" and res["data"]["format"] == "choice"
    assert res["data"]["n_choices"] == 3 and res["data"]["licence"] == "BSD-3-Clause"
    end = res["curve"][-1]
    assert end["task_name"] == "chatterbot-choice" and 0 < end["n_task"] <= 150
