"""FT-M, GRACE and MEND on tiny random models: each against its plain reference (tests/reference_editors.py),
the GRACE codebook's rules and module-state patch, what fine-tuning does with a codebook, MEND's network and
its training, the non-finite guard of every family, and a GRACE patch round trip through fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_editors import gradient_factors as reference_factors
from reference_editors import reference_ft, reference_grace, reference_mend
from support.edits import REQUESTS, small_edit_config
from support.models import make_tiny, snapshot

import editdecay.edit.api as editing
from editdecay.core.arch import arch_for, get_module, resolve_name
from editdecay.core.errors import ConfigError, NonFiniteError
from editdecay.core.module_edit import attached_edits
from editdecay.edit import make_config
from editdecay.edit.editor import LOCATE_THEN_EDIT
from editdecay.edit.registry import editor_class, editor_names, load_patch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]


def out_name(lm, layer: int) -> str:
    return resolve_name(lm.model, arch_for(lm.model).mlp_out_name(layer))


# --------------------------------------------------------------------------- FT-M / FT-L

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("per_step, norm", [(2, None), (4, 2e-3)])
def test_ft_matches_reference(family, per_step, norm, tokenizer):
    lm = make_tiny(family, tokenizer)
    name = out_name(lm, 2)
    kw = dict(learning_rate=1e-2, num_steps=6)
    ref = reference_ft(lm.model, tokenizer, name, REQUESTS, lr=kw["learning_rate"], num_steps=kw["num_steps"],
                       per_step=per_step, norm_constraint=norm)
    cfg = make_config("ft", layers=(2,), requests_per_step=per_step, norm_constraint=norm, **kw)
    patch, run = editing.edit_model(lm, "ft", cfg, REQUESTS, progress=False)
    run.restore()
    fast = patch.deltas[name]
    assert ref.norm() > 0 and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-5)
    if norm is not None:
        assert float(fast.abs().max()) <= norm * (1 + 1e-5), "FT-L: the change leaves the L-infinity ball"
        assert float(fast.abs().max()) > 0.5 * norm, "the bound never binds: the FT-L case would test nothing"


# --------------------------------------------------------------------------- GRACE

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_grace_matches_reference(family, tokenizer):
    """Two sequential batches; the second holds a request with the same label and prompt as one in the first
    (same key: radius rules), and a conflicting one near it (split radii)."""
    lm = make_tiny(family, tokenizer)
    name = out_name(lm, 2)
    batches = [REQUESTS[:2], [REQUESTS[2], REQUESTS[0], REQUESTS[3]]]
    kw = dict(epsilon=3.0, value_steps=8, value_lr=0.5, seed=3)
    ref = reference_grace(lm.model, tokenizer, name, batches, epsilon=kw["epsilon"], steps=kw["value_steps"],
                          lr=kw["value_lr"], seed=kw["seed"])
    before = snapshot(lm.model)
    run = editing.build_run(lm, "grace", make_config("grace", layers=(2,), **kw), progress=False)
    for b in batches:
        run.edit_batch(b)
    state = run.patch().states[name]
    run.restore()
    assert not list(attached_edits(lm.model)) and all(torch.equal(p, before[n]) for n, p in
                                                      lm.model.named_parameters())
    assert len(ref.keys) == 4, "the repeated request must reuse its key"
    torch.testing.assert_close(state.tensors["keys"], torch.stack(ref.keys), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.tensors["epsilons"], torch.tensor(ref.eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.tensors["values"], torch.stack(ref.values), rtol=1e-3, atol=1e-4)
    assert state.config["labels"] == ref.labels


def test_grace_conflicting_label_splits_the_radii(tokenizer):
    """Two requests with the same prompt and different targets: both keys stay, each radius is half their
    distance (so neither covers the other); a request far from every key gets the initial radius."""
    from editdecay.core.request import EditRequest

    lm = make_tiny("llama", tokenizer)
    a = EditRequest("a", "The capital of {} is", "France", "Rome", "Paris")
    b = EditRequest("b", "The capital of {} is", "Francia", "Madrid", "Paris")
    run = editing.build_run(lm, "grace", make_config("grace", layers=(2,), epsilon=1e6, value_steps=1),
                            progress=False)
    run.edit_batch([a])
    run.edit_batch([b])
    book = run.codebook
    dist = float(torch.linalg.vector_norm(book.keys[0] - book.keys[1]))
    assert 0 < dist < 1e6
    assert float(book.epsilons[0]) == pytest.approx(dist / 2 - 1e-5, rel=1e-6)
    assert float(book.epsilons[1]) == pytest.approx(dist / 2, rel=1e-6)
    run.restore()


def test_grace_patch_state_round_trip_and_refusals(tokenizer, tmp_path):
    lm = make_tiny("llama", tokenizer)
    patch, run = editing.edit_model(lm, "grace", make_config("grace", layers=(2,), value_steps=3), REQUESTS,
                                    progress=False)
    run.restore()
    patch.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert meta["format"] == 2 and meta["modules"] == [] and list(meta["states"]) == [out_name(lm, 2)]
    back = load_patch(tmp_path / "p")
    for k, v in patch.tensors().items():
        assert torch.equal(back.tensors()[k], v), k
    # a host of other dimensions (another model) is refused, the model left as it was
    other = make_tiny("llama", tokenizer)
    other.model.model.layers[2].mlp.down_proj = torch.nn.Linear(64, 16, bias=False)
    with pytest.raises(ConfigError, match="another model"):
        back.apply(other.model)
    assert not list(attached_edits(other.model))
    # a second codebook on the same host is refused while the first is attached
    handle = back.apply(lm.model)
    with pytest.raises(ConfigError, match="carries a module edit already"):
        back.apply(lm.model)
    handle.revert()
    assert not list(attached_edits(lm.model))


@pytest.mark.parametrize("finetune_values", [False, True])
def test_finetuning_a_grace_codebook(finetune_values, tokenizer, tmp_path):
    """Frozen by default: full fine-tuning of the MLPs leaves the codebook's keys and values as they were and
    records the codebook as frozen; with finetune_values the values train. One request with a huge radius:
    every position of the fine-tuning text reads the codebook, so its values do get gradients."""
    from editdecay.data import load_source
    from editdecay.data.embedded_task import EmbeddedTask
    from editdecay.finetune.recipe import Recipe
    from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune

    lm = make_tiny("llama", tokenizer)
    cfg = make_config("grace", layers=(2,), value_steps=3, finetune_values=finetune_values, epsilon=1e6)
    patch, run = editing.edit_model(lm, "grace", cfg, REQUESTS[:1], progress=False)
    run.restore()
    fresh = make_tiny("llama", tokenizer)
    task = EmbeddedTask(n_train=8, n_test=4)
    # all layers: the codebook replaces layer 2's MLP output everywhere, so that layer's own weights get no gradient
    recipe = Recipe(method="full", layers="all", targets="mlp", max_steps=2, batch_size=4, learning_rate=5e-2,
                    template="compact", cutoff_len=48, warmup_steps=0)
    res = run_finetune(fresh, recipe, load_source("embedded", task=task), tmp_path / "ft", measures=Measures(task=task),
                       progress=False, save="merged",
                       edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply)).result
    host = out_name(fresh, 2)
    want = "trained" if finetune_values else "frozen"
    assert res["plan"]["module_edits"] == {f"{host}.module_edit": want}
    (book,) = [e for _, e in attached_edits(fresh.model)]
    state = patch.states[host].tensors
    assert torch.equal(book.keys.cpu(), state["keys"]) and torch.equal(book.epsilons.cpu(), state["epsilons"])
    assert torch.equal(book.values.detach().cpu(), state["values"]) != finetune_values
    assert any(t.endswith("module_edit.values") for t in res["trainable_parameters"]) == finetune_values


# --------------------------------------------------------------------------- MEND

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mend_gradient_factors_are_the_weight_gradient(family, tokenizer):
    """sum_t delta_t u_t^T over the editor's factors equals autograd's weight gradient (and the reference hooks'
    factors): what MEND decomposes is the gradient."""
    from editdecay.edit.losses import target_batch
    from editdecay.edit.mend_net import edited_weights, gradient_factors
    from editdecay.edit.mend_net import nonzero_rows

    lm = make_tiny(family, tokenizer)
    names = list(edited_weights(lm.model, (1, 2), "mlp"))
    batch = target_batch(tokenizer, [(r.rewrite_prompt, r.target_new) for r in REQUESTS[:2]])
    _, factors = gradient_factors(lm.model, names, batch)
    _, grads = reference_factors(lm.model, tokenizer, names, REQUESTS[:2])
    conv1d = arch_for(lm.model).conv1d
    for n in names:
        u, d = nonzero_rows(*factors[n])
        g = u.T @ d if conv1d else d.T @ u
        torch.testing.assert_close(g, grads[n], rtol=1e-3, atol=1e-5 * float(grads[n].abs().max()))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("per_step", [1, 2])
def test_mend_matches_reference(family, per_step, tokenizer):
    from editdecay.edit.mend_net import Hypernetwork

    lm = make_tiny(family, tokenizer)
    cfg = small_edit_config("mend", lm, layers=(2, 3), edits_per_step=per_step, lr_scale=2.0)
    net, _ = Hypernetwork.load(Path(cfg.hypernetwork))
    # a trained-looking network: non-zero low-rank factors, so every layer of g acts
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.transforms.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    names = list(net.weights)
    ref = reference_mend(lm.model, tokenizer, net, names, REQUESTS, per_step=per_step, lr_scale=2.0,
                         conv1d=arch_for(lm.model).conv1d)
    editor = editor_class("mend")(cfg)
    editor.net = net
    run = editor.start(lm, progress=False)
    run.edit_batch(list(REQUESTS))
    patch = run.patch()
    run.restore()
    for n in names:
        # relative: sequential MEND steps on a random tiny model grow some weights by orders of magnitude
        rel = float((patch.deltas[n] - ref[n]).norm() / ref[n].norm())
        assert ref[n].norm() > 0 and rel < 1e-4, f"{n}: relative difference {rel:.2e} from the reference"


def test_mend_running_statistics_match_torch(tokenizer):
    from editdecay.edit.mend_net import GradientTransform

    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(37, 5, generator=gen), torch.randn(37, 3, generator=gen)
    tf = GradientTransform(5, 3, rank=2, n_modes=1)
    tf.observe(u[:10], v[:10])
    tf.observe(u[10:], v[10:])
    assert float(tf.k) == 37
    torch.testing.assert_close(tf.u_mean, u.mean(0))
    torch.testing.assert_close(tf.v_s / (tf.k - 1), v.var(0))


def test_mend_refuses_a_network_of_other_weights_or_model(tokenizer):
    lm = make_tiny("llama", tokenizer)
    cfg = small_edit_config("mend", lm, layers=(2, 3))
    with pytest.raises(ConfigError, match="select"):
        editing.edit_model(lm, "mend", cfg.replace(layers=(1, 2)), REQUESTS, progress=False)
    other = make_tiny("llama", tokenizer, seed=1)
    with pytest.raises(ConfigError, match="train a network for this model"):
        editing.edit_model(other, "mend", cfg, REQUESTS, progress=False)
    with pytest.raises(ConfigError, match="train-editor"):
        make_config("mend", layers=(2,)) and editor_class("mend")(make_config("mend", layers=(2,)))


def test_mend_training_records_and_validates(tokenizer, tmp_path):
    from editdecay.edit.mend import MendTraining
    from editdecay.edit.mend_net import Hypernetwork

    lm = make_tiny("llama", tokenizer)
    before = snapshot(lm.model)
    cfg = make_config("mend", layers=(2,), modules="out")
    settings = MendTraining(steps=4, accumulate=2, rank=4, validation=2, log_every=2)
    record = editor_class("mend").train(lm, cfg, settings, list(REQUESTS) * 3, tmp_path / "net", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters()), "training changed the model"
    assert [h["step"] for h in record["training"]["history"]] == [2, 4]
    assert record["training"]["validation"]["n"] == 2 and record["layers"] == [2] and record["modules"] == "out"
    net, meta = Hypernetwork.load(tmp_path / "net", record["tensors_sha256"])
    assert list(net.weights) == [out_name(lm, 2)] and float(next(iter(net.transforms.values())).k) > 2
    with pytest.raises(ConfigError, match="sha256"):
        Hypernetwork.load(tmp_path / "net", "0" * 64)


# --------------------------------------------------------------------------- every family: non-finite guard

@pytest.mark.parametrize("editor", [e for e in editor_names() if editor_class(e).family != LOCATE_THEN_EDIT])
def test_non_finite_loss_fails_and_leaves_the_model_unchanged(editor, tokenizer, monkeypatch):
    """A NaN edit loss (hence NaN gradients) stops the edit with NonFiniteError; the model keeps its weights and
    no module edit stays attached."""
    import sys as _sys

    lm = make_tiny("llama", tokenizer)
    cfg = small_edit_config(editor, lm, layers=(2, 3))
    from editdecay.edit import losses

    editor_class(editor)                                   # imports the editor's modules
    real = losses.target_nll
    for name, module in list(_sys.modules.items()):        # every edit module that imported the loss by name
        if name.startswith("editdecay.edit.") and getattr(module, "target_nll", None) is real:
            monkeypatch.setattr(module, "target_nll", lambda *a, **k: real(*a, **k) * float("nan"))
    before = snapshot(lm.model)
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        editing.edit_model(lm, editor, cfg, REQUESTS, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert not list(attached_edits(lm.model))


# --------------------------------------------------------------------------- GRACE through fresh processes

def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editdecay.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_grace_patch_round_trip_in_fresh_processes(tokenizer, tmp_path):
    """`editdecay edit --editor grace` in one process; `editdecay finetune --patch` in another loads the codebook
    and measures M_e before training: the same metrics, request by request."""
    from support.models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")      # in this process's cache; the CLI processes get a private one
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": i, "requested_rewrite": {
        "prompt": p, "subject": s, "relation_id": "P0", "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"In short: {p.replace('{}', s)}"], "neighborhood_prompts": [p.replace("{}", "Spain")]}
        for i, (p, s, new, true) in enumerate([("The capital of {} is", "France", "Rome", "Paris"),
                                                ("{} was born in", "Marie Curie", "Tokyo", "Warsaw")])]))
    env = {**os.environ, "EDITDECAY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = _cli("edit", "--model", str(model), "--editor", "grace", "--data", f"counterfact:{data}", "--layers", "2",
               "--value-steps", "5", "--threads", "1", "--out", str(tmp_path / "p"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    edited = json.loads((tmp_path / "p" / "result.json").read_text())
    res = _cli("finetune", "--model", str(model), "--patch", str(tmp_path / "p"), "--steps", "1", "--task-train", "8",
               "--task-test", "4", "--threads", "1", "--no-progress", "--out", str(tmp_path / "ft"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    tuned = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert tuned["plan"]["module_edits"] == {"model.layers.2.mlp.down_proj.module_edit": "frozen"}
    want, got = edited["metrics"]["M_e"], tuned["metrics"]["M_e"]
    for k in ("efficacy", "paraphrase", "neighborhood"):
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    margins = {r["case_id"]: r["M_e"]["margin"] for r in edited["requests"]}
    for r in tuned["requests"]:
        assert r["M_e"]["margin"] == pytest.approx(margins[r["case_id"]], abs=1e-4), r["case_id"]
    assert want["efficacy"] > 0, "the edit changed nothing: the round trip would test little"
