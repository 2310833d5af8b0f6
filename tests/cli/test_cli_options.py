"""Command-line options generated from the configuration records: every field an option named like its grid key,
help from its description, values reaching the record, bad values failing with the grid's own sentences."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from editdecay.cli import _register, app
from editdecay.core.errors import ConfigError
from editdecay.data import sources as data_sources
from editdecay.edit.registry import editor_class, editor_names
from editdecay.finetune.recipe import Recipe
from editdecay.grid.plan import build_plan
from editdecay.grid.spec import grid_from_dict

_register()
COMMANDS = typer.main.get_command(app).commands


def options(command: str) -> dict[str, object]:
    """Every option name of a command (aliases and --no- forms included) -> its click parameter."""
    out = {}
    for p in COMMANDS[command].params:
        for name in (*p.opts, *p.secondary_opts):
            out[name] = p
    return out


def kebab(field: str) -> str:
    return "--" + field.replace("_", "-")


def test_every_recipe_field_is_a_finetune_option_named_like_the_grid_key():
    finetune = options("finetune")
    renamed = {"dtype": "--train-dtype"}          # beside the model's --dtype (grid: models[].dtype)
    for name, field in Recipe.model_fields.items():
        option = finetune.get(renamed.get(name, kebab(name)))
        assert option is not None, f"Recipe.{name} has no option"
        assert option.help.startswith(field.description), name


def test_every_editor_field_is_an_edit_option():
    """Every field of every registered editor's config (edit/registry.py)."""
    edit = options("edit")
    renamed = {"seed": "--context-seed"}         # --seed draws the sample of --n requests
    for editor in editor_names():
        for name, field in editor_class(editor).config_class.model_fields.items():
            option = edit.get(renamed.get(name, kebab(name)))
            assert option is not None and option.help.startswith(field.description), name


def test_every_data_source_setting_is_a_finetune_option():
    """Every field of the settings record of every registered data source that has one (data/source.py
    `settings`), named like its key in the grid's `shared.<settings_key>` section."""
    finetune = options("finetune")
    with_settings = data_sources.sources_with_settings()
    assert with_settings, "no data source declares settings"
    for key, source in with_settings.items():
        for name, field in source.settings.model_fields.items():
            option = finetune.get(f"--{key}-{name}".replace("_", "-"))
            assert option is not None and option.help.startswith(field.description), (key, name)


@pytest.mark.parametrize("command, old", [
    ("finetune", ["--lr", "--steps", "--scheduler", "--cutoff", "--rank", "--alpha", "--dropout", "--train-dtype",
                  "--task-train", "--task-test", "--chatterbot-format", "--eval-every", "--downstream",
                  "--downstream-limit", "--gradient-checkpointing", "--no-gradient-checkpointing", "--seed",
                  "--batch-size", "--grad-accum", "--warmup-steps", "--epochs", "--template", "--method", "--layers",
                  "--targets", "--model", "--dtype", "--device", "--threads", "--trust-remote-code",
                  "--allow-pickle", "--allow-foreign-patch", "--patch", "--data", "--preset", "--requests",
                  "--limit", "--task-eval", "--no-task-eval", "--save", "--overwrite", "--progress", "--out"]),
    ("edit", ["--model", "--editor", "--data", "--n", "--seed", "--layers", "--batch-size", "--stats-corpus",
              "--stats-tokens", "--mom2-update-weight", "--nullspace-threshold", "--v-lr", "--v-num-grad-steps",
              "--clamp-norm-factor", "--allow-pickle", "--trust-remote-code", "--zsre-target", "--strict", "--dtype",
              "--device", "--threads", "--out"]),
    ("eval-edits", ["--model", "--data", "--limit", "--seed", "--patch", "--allow-foreign-patch", "--allow-pickle",
                    "--trust-remote-code", "--zsre-target", "--strict", "--batch-size", "--dtype", "--device",
                    "--threads", "--out"]),
    ("report", ["--out", "--activation-shift", "--activation-cells", "--frequencies", "--frequency-method",
                "--cache-dir", "--device", "--trust-remote-code", "--threads"]),
])
def test_the_options_of_before_still_work(command, old):
    """README commands keep working: every option name of the hand-written commands is still accepted."""
    have = options(command)
    assert [o for o in old if o not in have] == []


class Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Run `finetune` up to the training call, with no model: returns what reached run_finetune."""
    import editdecay.finetune as finetune_pkg
    from editdecay.core.model_ref import ModelRef

    seen = {}

    def load(self, *, device, cache=None):
        seen.update(ref=self, device=device, cache=cache)
        return object()

    def run_finetune(lm, recipe, source, out, *, edits, measures, **kw):
        seen.update(recipe=recipe, source=source, edits=edits, measures=measures, **kw)
        raise ConfigError("stopped before training")

    monkeypatch.setattr(ModelRef, "load", load)
    monkeypatch.setattr(finetune_pkg, "run_finetune", run_finetune)

    def invoke(*args):
        seen.clear()
        res = CliRunner().invoke(app, ["finetune", "--out", "unused", *args], env={"COLUMNS": "250"})
        assert "stopped before training" in res.output, res.output
        return seen
    return invoke


def test_train_on_prompt_reaches_the_recipe(captured):
    assert captured()["recipe"].train_on_prompt is False
    assert captured("--train-on-prompt")["recipe"].train_on_prompt is True
    assert captured("--train-on-prompt", "--no-train-on-prompt")["recipe"].train_on_prompt is False


# A valid value other than the embedded LoRA preset's for the fields a number or a flag cannot stand for:
# (as written on the command line, as the recipe holds it).
WORDS = {"method": ("dora", "dora"), "layers": ("1-2", (1, 2)),
         "targets": ("mlp.down_proj,mlp.up_proj", ("mlp.down_proj", "mlp.up_proj")),
         "lr_scheduler": ("cosine", "cosine"), "template": ("alpaca", "alpaca"), "dtype": ("bfloat16", "bfloat16"),
         "optimizer": ("adamw8bit", "adamw8bit"), "attention_kernel": ("eager", "eager")}


def _other_value(name: str, value):
    """(args after the option, the value the recipe should hold)."""
    if name in WORDS:
        return [WORDS[name][0]], WORDS[name][1]
    if isinstance(value, bool):
        return None, not value
    if value is None and "bool" in str(Recipe.model_fields[name].annotation):    # unset flag: off is other
        return None, False
    if isinstance(value, int) or (value is None and "int" in str(Recipe.model_fields[name].annotation)):
        return [str((value or 0) + 1)], (value or 0) + 1
    number = value * 0.5 if value else 0.1
    return [str(number)], number


@pytest.mark.parametrize("name", list(Recipe.model_fields))
def test_every_recipe_field_given_on_the_command_line_reaches_the_recipe(captured, name):
    """For each field (a new one included): a value other than the preset's, given by its option, is the
    recipe's. A field that is neither a number nor a flag fails here until WORDS has a value for it."""
    from editdecay.finetune.recipe import preset

    base = getattr(preset("embedded", "lora"), name)
    assert name in WORDS or isinstance(base, (bool, int, float)) or base is None, f"add {name} to WORDS"
    given, want = _other_value(name, base)
    option = "--train-dtype" if name == "dtype" else kebab(name)
    args = [option, *given] if given is not None else [option if want else "--no-" + option[2:]]
    got = getattr(captured(*args)["recipe"], name)
    assert got == want and got != base


def test_model_evaluation_and_run_settings_reach_their_records(captured):
    seen = captured("--model", "org/name", "--revision", "abc", "--dtype", "bf16", "--trust-remote-code",
                    "--eval-every", "7", "--device", "cpu", "--cache-dir", "/tmp/c", "--task-train", "16",
                    "--embedded-task-n-test", "4")
    ref = seen["ref"]
    assert (ref.name, ref.revision, ref.dtype, ref.trust_remote_code, ref.allow_pickle) == (
        "org/name", "abc", "bfloat16", True, False)
    assert seen["measures"].eval_every == 7 and seen["device"] == "cpu" and str(seen["cache"].root) == "/tmp/c"
    task = seen["measures"].task
    assert (task.n_train, task.n_test) == (16, 4)


@pytest.mark.parametrize("command", ["edit", "eval-edits"])
def test_edit_and_eval_edits_load_the_model_ref_they_are_given(monkeypatch, tmp_path, command):
    """Every ModelRef field, --revision included, reaches the load of `edit` and `eval-edits` (both workflows
    take a ModelRef); the data is read first, the model is never loaded here."""
    from editdecay.core.model_ref import ModelRef

    seen = {}

    def load(self, *, device, cache=None):
        seen.update(ref=self, device=device)
        raise ConfigError("stopped before loading")

    monkeypatch.setattr(ModelRef, "load", load)
    args = [command, "--model", "org/name", "--revision", "abc", "--dtype", "bf16", "--allow-pickle",
            "--device", "cpu", *(["--out", str(tmp_path / "o")] if command == "edit" else [])]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 2 and "stopped before loading" in res.output, res.output
    ref = seen["ref"]
    assert (ref.name, ref.revision, ref.dtype, ref.trust_remote_code, ref.allow_pickle) == (
        "org/name", "abc", "bfloat16", False, True)
    assert seen["device"] == "cpu" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, field", [
    (["--lora-r", "x"], "recipe.lora_r='x' is not valid"),
    (["--rank", "0"], "recipe: lora_r=0 is not valid"),
    (["--layers", "4-x"], "recipe.layers='4-x' is not a layer list"),
    (["--targets", "mpl"], "recipe.targets='mpl' is not valid (did you mean 'mlp'?)"),
    (["--lr-scheduler", "cosin"], "lr_scheduler='cosin' is not valid (did you mean 'cosine'?)"),
    (["--device", "cdua"], "shared.device='cdua' is not valid (did you mean 'cuda'?)"),
    (["--dtype", "int8"], "model.dtype='int8' is not valid"),
    (["--eval-every", "-1"], "evaluation.eval_every=-1 is not valid"),
    (["--chatterbot-n-choices", "1", "--data", "chatterbot"], "chatterbot.n_choices=1 is not valid"),
])
def test_bad_values_exit_2_naming_field_value_and_what_is_valid(tmp_path, args, field):
    res = CliRunner().invoke(app, ["finetune", "--out", str(tmp_path / "o"), *args], env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and field in text and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


def _cli_error(args) -> str:
    res = CliRunner().invoke(app, ["finetune", "--out", "unused", *args], env={"COLUMNS": "400"})
    assert res.exit_code == 2
    return " ".join(res.output.split()).removeprefix("error: ")


def _grid_error(**changes) -> str:
    grid = {"models": ["smollm2-135m"], "n_edits": [0], "recipes": [{"method": "lora"}], **changes}
    with pytest.raises(ConfigError) as e:
        build_plan(grid_from_dict(grid))
    return " ".join(str(e.value).split())


@pytest.mark.parametrize("args, grid, cli_path, grid_path, sentence", [
    (["--device", "cdua"], {"shared": {"device": "cdua"}}, "shared.device", "shared.device",
     "='cdua' is not valid (did you mean 'cuda'?); use one of auto, cpu, cuda, balanced, mps or cuda:N"),
    (["--chatterbot-format", "choise", "--data", "chatterbot"], {"shared": {"chatterbot": {"format": "choise"}}},
     "chatterbot.format", "shared.chatterbot.format", "='choise' is not valid (did you mean 'choice'?); use one of "
                                                      "reply, choice"),
    (["--eval-every", "-3"], {"shared": {"evaluation": {"eval_every": -3}}}, "evaluation.eval_every",
     "shared.evaluation.eval_every", "=-3 is not valid; use an integer >= 0"),
    (["--layers", "edted"], {"recipes": [{"method": "lora", "layers": "edted"}]}, "recipe.layers",
     "recipes[0].layers[0]", "='edted' is not valid (did you mean 'edited'?); use one of all, edited, non-edited"),
    (["--lora-dropout", "1.5"], {"recipes": [{"method": "lora", "overrides": {"lora_dropout": 1.5}}]}, "recipe: ",
     "recipe: ", "lora_dropout=1.5 is not valid; it must be a number in [0, 1)"),
])
def test_the_cli_and_the_grid_word_an_error_alike(args, grid, cli_path, grid_path, sentence):
    """One formatter: the same sentence from the command line and from a grid file, each with its key path."""
    cli, in_grid = _cli_error(args), _grid_error(**grid)
    assert cli.startswith(cli_path + sentence), cli
    assert grid_path + sentence in in_grid, in_grid


@pytest.mark.parametrize("args, message", [
    (["edit", "--v-lr", "-1"], "memit config.v_lr=-1.0 is not valid: input should be greater than 0"),
    (["edit", "--layers", "4-x"], "memit config.layers='4-x' is not a layer list"),
    (["edit", "--editor", "rome"], "--editor='rome' is not valid; use one of memit, alphaedit"),
    (["edit", "--L2", "3"], "--L2 3.0 is a setting of --editor alphaedit; --editor memit does not use it"),
    (["edit", "--editor", "alphaedit", "--stats-dtype", "float16"], "alphaedit config.stats_dtype='float16' is not valid"),
    (["eval-edits", "--batch-size", "0"], "evaluation.batch_size=0 is not valid"),
    (["eval-edits", "--zsre-target", "alts"], "evaluation.zsre_target='alts' is not valid (did you mean 'alt'?)"),
    (["report", "results", "--out", "r", "--threads", "0"], "shared.threads=0 is not valid"),
])
def test_other_commands_validate_their_records_before_loading_anything(monkeypatch, tmp_path, args, message):
    import editdecay.core.models as models

    # Every command loads through ModelRef.load, which looks core.models.load_model up when it runs.
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    extra = ["--out", "o"] if args[0] == "edit" else []
    res = CliRunner().invoke(app, [*args, *extra], env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and message in text and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()
