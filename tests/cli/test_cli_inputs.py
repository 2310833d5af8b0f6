"""Faults a user meets through the command line, each tested as a kind.

Every test goes through the CLI (typer's CliRunner) and checks what the user sees:
the exit code, a message naming the field/value/path, and that nothing half-written is left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from editdecay.cli import _register, app

_register()
runner = CliRunner(env={"COLUMNS": "1000"})    # no wrapping inside paths in messages


def _text(res) -> str:
    return " ".join(res.output.split())


def make_patch(directory: Path, lm, *, n: int = 3, layer: int = 4, fingerprint: str | None = None,
               scale: float = 0.0) -> "object":
    """A small hand-made patch for `lm`: `n` worldfacts requests, one delta on layer `layer`'s MLP output."""
    from editdecay.core.arch import arch_for, get_module
    from editdecay.data import load_edit_data
    from editdecay.edit.patch import EditPatch

    name = arch_for(lm.model).mlp_out_name(layer)
    w = get_module(lm.model, name).weight
    g = torch.Generator().manual_seed(0)
    delta = scale * torch.randn(w.shape, generator=g)
    identity = lm.identity.to_dict()
    if fingerprint is not None:
        identity["fingerprint"] = fingerprint
    reqs = load_edit_data("worldfacts", limit=n, seed=7).requests
    patch = EditPatch({name: delta}, (layer,), "memit", {}, tuple(reqs), identity)
    patch.save(directory)
    return patch


# --------------------------------------------------------------------------- 1: defaults vs documented behaviour


@pytest.mark.slow
def test_eval_edits_patch_without_data_uses_the_patch_requests(tmp_path, embedded):
    """`eval-edits --patch DIR` evaluates the patch's own requests (README, --help), not worldfacts."""
    patch = make_patch(tmp_path / "p", embedded, n=3)
    out = tmp_path / "post.json"
    res = runner.invoke(app, ["eval-edits", "--patch", str(tmp_path / "p"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["metrics"]["M_e"]["n"] == 3
    assert [x["case_id"] for x in r["requests"]] == [q.case_id for q in patch.requests]
    assert r["data"]["name"].startswith("patch:") and r["data"]["n_kept"] == 3
    # --limit applies to the patch's requests as its help says
    res = runner.invoke(app, ["eval-edits", "--patch", str(tmp_path / "p"), "--limit", "2",
                              "--out", str(tmp_path / "two.json")])
    assert res.exit_code == 0, res.output
    r2 = json.loads((tmp_path / "two.json").read_text())
    assert [x["case_id"] for x in r2["requests"]] == [q.case_id for q in patch.requests[:2]]


@pytest.mark.parametrize("args", [["eval-edits", "--seed", "3"], ["edit", "--seed", "3", "--out", "x"]])
def test_seed_without_a_sample_size_is_refused(args):
    """--seed only draws a sample of --limit/--n requests: alone it would silently do nothing."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "--seed 3" in _text(res) and ("--limit" in _text(res) or "--n" in _text(res))
    assert not Path("x").exists()


def test_editor_setting_of_the_other_editor_is_refused():
    """An option documented for one editor is not silently dropped for the other (fails before any model)."""
    res = runner.invoke(app, ["edit", "--editor", "alphaedit", "--mom2-update-weight", "100", "--out", "x"])
    assert res.exit_code == 2 and "--mom2-update-weight" in _text(res) and "memit" in _text(res)
    res = runner.invoke(app, ["edit", "--editor", "memit", "--nullspace-threshold", "0.1", "--out", "x"])
    assert res.exit_code == 2 and "--nullspace-threshold" in _text(res) and "alphaedit" in _text(res)
    assert not Path("x").exists()


# --------------------------------------------------------------------------- 2: a patch made on other weights


@pytest.mark.slow
def test_foreign_patch_is_refused_by_every_entry_point_unless_allowed(tmp_path, embedded):
    """Same shapes, other fingerprint: eval-edits and finetune refuse (exit 2, both fingerprints named,
    nothing written); --allow-foreign-patch applies it and records both fingerprints."""
    make_patch(tmp_path / "p", embedded, n=2, fingerprint="0123456789abcdef")
    mine = embedded.identity.fingerprint
    out = tmp_path / "post.json"
    res = runner.invoke(app, ["eval-edits", "--patch", str(tmp_path / "p"), "--out", str(out)])
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "0123456789abcdef" in text and mine in text and "--allow-foreign-patch" in text
    assert "Traceback" not in res.output and not out.exists()

    ft_out = tmp_path / "ft"
    res = runner.invoke(app, ["finetune", "--patch", str(tmp_path / "p"), "--steps", "1", "--task-train", "8",
                              "--task-test", "4", "--no-progress", "--out", str(ft_out)])
    assert res.exit_code == 2, res.output
    assert "0123456789abcdef" in _text(res) and "--allow-foreign-patch" in _text(res)
    assert not ft_out.exists()

    res = runner.invoke(app, ["eval-edits", "--patch", str(tmp_path / "p"), "--allow-foreign-patch",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["patch"]["patch_model_fingerprint"] == "0123456789abcdef"
    assert r["patch"]["model_fingerprint"] == mine and r["patch"]["foreign"] is True
    assert r["patch"]["allowed_foreign"] is True


@pytest.mark.slow
def test_own_patch_records_matching_fingerprints(tmp_path, embedded):
    make_patch(tmp_path / "p", embedded, n=1)
    out = tmp_path / "post.json"
    res = runner.invoke(app, ["eval-edits", "--patch", str(tmp_path / "p"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    p = json.loads(out.read_text())["patch"]
    assert p["foreign"] is False and p["patch_model_fingerprint"] == p["model_fingerprint"]


# --------------------------------------------------------------------------- 3: models flagged as quantised


@pytest.mark.slow
def test_embedded_model_is_a_plain_float_checkpoint(embedded):
    """The converted GGUF model carries no quantization_config: casts and saving work."""
    import copy

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded.identity.source)
    assert getattr(config, "quantization_config", None) is None
    assert not getattr(embedded.model, "is_quantized", False)
    m = copy.deepcopy(embedded.model)
    assert m.half().dtype == torch.float16 and m.float().dtype == torch.float32     # raised for a "quantised" model


def test_model_flagged_as_quantised_is_refused_by_name(tmp_path, tokenizer):
    from support.models import make_tiny

    lm = make_tiny("llama", tokenizer)
    lm.model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval-edits", "--model", str(tmp_path / "m"), "--limit", "1", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "quantization_config" in _text(res) and "'gguf'" in _text(res) and str(tmp_path / "m") in _text(res)
    assert not out.exists()


# --------------------------------------------------------------------------- 8: model names and weight files


@pytest.mark.parametrize("command", [["eval-edits"], ["edit", "--out", "{tmp}/edit-out"],
                                     ["finetune", "--steps", "1", "--task-train", "8", "--task-test", "4",
                                      "--out", "{tmp}/ft-out"]])
def test_missing_local_model_path_is_named_not_a_traceback(tmp_path, command):
    missing = tmp_path / "models" / "no-such-model"
    res = runner.invoke(app, [c.format(tmp=tmp_path) for c in command] + ["--model", str(missing)])
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert str(missing) in text and "no such directory" in text and "hub id" in text
    assert "Traceback" not in res.output and not (tmp_path / "edit-out").exists() and not (tmp_path / "ft-out").exists()


def test_unreachable_hub_id_names_both_readings(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no network: fail at once
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["eval-edits", "--model", "no-such-org-xyz/model"])
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "the hub id 'no-such-org-xyz/model'" in text and "no local directory" in text
    assert str(tmp_path / "no-such-org-xyz" / "model") in text and "Traceback" not in res.output


def test_pickled_weights_load_only_with_allow_pickle(tmp_path, tokenizer):
    from support.models import make_tiny

    lm = make_tiny("gpt2", tokenizer)
    lm.model.config.save_pretrained(tmp_path / "m")       # transformers 5 saves safetensors only: pickle by hand
    torch.save(lm.model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    tokenizer.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "pytorch_model.bin").exists() and not list((tmp_path / "m").glob("*.safetensors"))
    out = tmp_path / "r.json"
    args = ["eval-edits", "--model", str(tmp_path / "m"), "--limit", "1", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "pytorch_model.bin" in text and "--allow-pickle" in text and str(tmp_path / "m") in text
    assert not out.exists()
    res = runner.invoke(app, args + ["--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["config"]["model"]["allow_pickle"] is True


# --------------------------------------------------------------------------- 5, 6: rejected records


def _cf_record(case_id, prompt="The mother tongue of {} is", subject="Danielle Darrieux", new="English",
               true="French", **over):
    rec = {"case_id": case_id,
           "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new},
                                 "target_true": {"str": true}, "relation_id": "P103"},
           "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["Léon Blum speaks"]}
    rec.update(over)
    return rec


def test_all_records_rejected_lists_every_record_without_strict(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([
        _cf_record(0, subject=""),                                            # one problem
        _cf_record(1, neighborhood_prompts=[4], paraphrase_prompts=[3]),                  # two problems, one record
        _cf_record(2, prompt="{} and {} share the tongue"),                   # 6: two slots
    ]))
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval-edits", "--data", f"counterfact:{path}", "--out", str(out)])
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "no usable records out of 3" in text and "3 record(s) rejected (4 problems)" in text
    for line in ("record 0: field 'requested_rewrite.subject'", "record 1: field 'neighborhood_prompts[0]'",
                 "record 1: field 'paraphrase_prompts[0]'", "record 2: field 'requested_rewrite.prompt'"):
        assert line in text, line                     # 'paraphrase_prompts[0]' survives the console (no markup)
    assert "has 2 '{}' slots" in text and "is not in the prompt" not in text    # 6: the real reason
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.slow
def test_counts_are_records_kept_plus_rejected_is_total(tmp_path, embedded):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_cf_record(0), _cf_record(1, neighborhood_prompts=[4], paraphrase_prompts=[3]),
                                _cf_record(2, prompt="The tongue of Danielle Darrieux is")]))
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval-edits", "--data", f"counterfact:{path}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())["data"]
    assert (d["n_records"], d["n_usable"], d["n_rejected"], d["n_kept"]) == (3, 1, 2, 1)
    assert len(d["rejected"]) == 3                     # problems are all listed, but counted per record
    reason = next(r["reason"] for r in d["rejected"] if r["index"] == 2)
    assert "writes the subject 'Danielle Darrieux' out" in reason


def test_error_messages_quote_user_text_verbatim(tmp_path):
    """User text in a message (here a path with brackets) is printed as is, never read as console markup."""
    path = tmp_path / "[bold]facts[/x].json"
    res = runner.invoke(app, ["eval-edits", "--data", f"counterfact:{path}"])
    assert res.exit_code == 2, res.output
    assert str(path) in _text(res) and "does not exist" in _text(res)


# --------------------------------------------------------------------------- 9: results directories are not trusted


def test_report_never_takes_trust_remote_code_from_a_results_directory(tmp_path):
    """A results directory that names a model with its own code and trust_remote_code: true must not make
    `report --activation-shift` run that code; the cell is listed as not measured, naming the flag."""
    from support.results import build_results_dir

    from editdecay.edit.patch import EditPatch
    from editdecay.grid.store import GridStore

    evil = tmp_path / "evil-model"
    evil.mkdir()
    sentinel = tmp_path / "code-ran"
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "configuration_evil.EvilConfig"}}))
    (evil / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    root = tmp_path / "results"
    cells = build_results_dir(root)
    store = GridStore(root)
    path = store.result_path(cells["A"].id)
    r = json.loads(path.read_text())
    r["config"]["model"] = {"name": str(evil), "trust_remote_code": True, "dtype": "float32"}
    r["config"]["recipe"].update(max_steps=1)          # a valid recipe: nothing else stops the loading first
    r["stages"] = {"patch": {"id": "patch-evil"}, "finetune_base": {"id": "finetune-base-lora-all"}}
    path.write_text(json.dumps(r))
    EditPatch({"w": torch.zeros(1, 1)}, (0,), "memit", {"layers": [0]}, (), {"fingerprint": "0"}).save(
        root / "stages" / "patch-evil" / "patch")

    out = tmp_path / "report"
    res = runner.invoke(app, ["report", str(root), "--out", str(out), "--activation-shift", "--activation-cells", "1",
                              "--no-frequencies"])
    assert res.exit_code == 0, res.output
    assert not sentinel.exists(), "the results directory's trust_remote_code ran the model's code"
    md = " ".join((out / "report.md").read_text().split())
    assert "not measured" in md and "--trust-remote-code" in md and str(evil) in md


def test_results_directory_copy_of_the_grid_never_supplies_shell_lines(tmp_path):
    """slurm.setup (shell) and ray.runtime_env (code installs) are rejected from a plan read back from a
    results directory; `grid status` on such a directory still works."""
    from editdecay.grid.plan import Plan
    from editdecay.grid.store import GridStore

    runtime = {"slurm": {"setup": [f"touch {tmp_path / 'pwned'}"], "timeout_min": 5},
               "ray": {"address": None, "runtime_env": {"pip": ["evil"]}}, "device": "cpu"}
    store = GridStore(tmp_path / "results")
    store.write_plan(Plan("copied", (), {}, runtime))
    got = store.read_plan().runtime
    assert got["slurm"]["setup"] == [] and got["ray"]["runtime_env"] == {}
    assert got["rejected"]["slurm.setup"] == runtime["slurm"]["setup"] and got["slurm"]["timeout_min"] == 5
    res = runner.invoke(app, ["grid", "status", str(tmp_path / "results"), "--json"])
    assert res.exit_code == 0, res.output


# --------------------------------------------------------------------------- 4: merged weights of a bf16 run


def _bf16_model_dir(tmp_path, tokenizer) -> Path:
    """A tiny Llama whose linear weights are large (x64), saved in bfloat16: a bf16 step of W is then larger
    than a few LoRA steps' update, so a merge rounded to bfloat16 loses the update."""
    from support.models import make_tiny

    lm = make_tiny("llama", tokenizer)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "proj" in name:
                p.mul_(64.0)
    lm.model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _probe_logits(model, tokenizer) -> torch.Tensor:
    from editdecay.core.tokens import encode_prompt
    from editdecay.finetune.run import MERGE_PROBE

    with torch.no_grad():
        return model(input_ids=torch.tensor([encode_prompt(tokenizer, MERGE_PROBE)])).logits.float()


def test_bf16_lora_merged_weights_reproduce_the_trained_model(tmp_path, tokenizer):
    """`finetune --dtype bfloat16 --save both`: weights.safetensors, loaded onto the base, computes what the
    trained model (base + adapter/) computes; the result says which object the metrics belong to."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = _bf16_model_dir(tmp_path, tokenizer)
    out = tmp_path / "run"
    res = runner.invoke(app, ["finetune", "--model", str(model_dir), "--dtype", "bfloat16", "--method", "lora",
                              "--save", "both", "--steps", "4", "--lr", "1e-3", "--task-train", "16", "--task-test", "4",
                              "--batch-size", "4", "--rank", "4", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "result.json").read_text())
    check = r["merge_check"]
    assert check["within_tolerance"] and check["merged_dtype"] == "float32" and check["model_dtype"] == "bfloat16"
    assert "unmerged lora adapters" in r["measured_model"] and r["outputs"]["weights_dtype"] == "float32"

    def base():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    trained = _probe_logits(PeftModel.from_pretrained(base(), out / "adapter").eval(), tokenizer)
    merged = base()
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, t in load_file(out / "weights.safetensors").items():
            params[name].copy_(t)
    diff = float((_probe_logits(merged, tokenizer) - trained).abs().max())
    assert diff <= 1e-4 * max(1.0, float(trained.abs().max())), diff


def test_merge_check_above_tolerance_warns_and_is_recorded(tmp_path, tokenizer, monkeypatch, caplog):
    import editdecay.finetune.run as ft_run

    monkeypatch.setattr(ft_run, "MERGE_RTOL", -1.0)          # every merge is now "above tolerance"
    model_dir = _bf16_model_dir(tmp_path, tokenizer)
    out = tmp_path / "run"
    res = runner.invoke(app, ["finetune", "--model", str(model_dir), "--method", "lora", "--save", "merged",
                              "--steps", "2", "--task-train", "8", "--task-test", "4", "--batch-size", "4",
                              "--rank", "4", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    check = json.loads((out / "result.json").read_text())["merge_check"]
    assert check["within_tolerance"] is False and "does not reproduce" in check["warning"]
    assert "does not reproduce the reported metrics" in _text(res)
    assert any("does not reproduce" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("config, words", [
    ({"model_type": "nonsense-type"}, ["cannot be read", "nonsense-type"]),
    ({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}},
     ["needs its own Python code", "--trust-remote-code"]),
])
def test_unreadable_or_remote_code_config_is_named(tmp_path, config, words):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    res = runner.invoke(app, ["eval-edits", "--model", str(d), "--limit", "1"])
    assert res.exit_code == 2, res.output
    for w in words + [str(d)]:
        assert w in _text(res), w
    assert "Traceback" not in res.output


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not json", "[]", '{"format": 1}'])
def test_damaged_patch_directory_is_named(tmp_path, embedded, damage):
    make_patch(tmp_path / "p", embedded, n=1)
    (tmp_path / "p" / "patch.json").write_text(damage)
    res = runner.invoke(app, ["eval-edits", "--patch", str(tmp_path / "p")])
    assert res.exit_code == 2, res.output
    assert str(tmp_path / "p") in _text(res) and "patch.json" in _text(res) and "Traceback" not in res.output


def test_a_stored_plan_changed_after_it_was_written_is_refused(tmp_path):
    """Grid workers run the plan the driver wrote (plans/<id>.json); a copy edited afterwards (e.g. to turn on
    trust_remote_code) does not match its content id and is refused."""
    from editdecay.core.errors import ConfigError
    from editdecay.grid.plan import Plan
    from editdecay.grid.store import GridStore

    store = GridStore(tmp_path / "results")
    plan_id = store.write_plan(Plan("g", (), {}, {"device": "cpu"}))
    assert store.read_plan(plan_id).name == "g"
    path = tmp_path / "results" / "plans" / f"{plan_id}.json"
    data = json.loads(path.read_text())
    data["runtime"]["device"] = "cuda"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=plan_id):
        store.read_plan(plan_id)
