"""E3 target values computed apart from the edit (edit/target_values.py): an edit handed them gives the patch it
gives computing them itself, bit for bit; values for other requests, settings or weights are refused; values with
other context templates are not used (E3 is computed in the edit, with a warning); the files round-trip and a
damaged file is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.edits import REQUESTS, small_edit_config, write_corpus
from support.models import make_tiny

from editdecay.core.cache import Cache
from editdecay.core.errors import ConfigError, EditDecayError
from editdecay.edit.api import edit_model
from editdecay.edit.target_values import TargetValues, TargetValuesConfig, compute_target_values

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")
    return corpus, Cache(tmp_path_factory.mktemp("cache"))


def _cfg(editor, corpus, **kw):
    return small_edit_config(editor, None, layers=(1, 2), v_num_grad_steps=4, n_context_templates=2,
                             context_length=4, stats_corpus=str(corpus), stats_tokens=400, **kw)


@pytest.mark.parametrize("editor", ["memit", "alphaedit"])
def test_precomputed_values_give_the_same_patch(editor, setup, tokenizer, tmp_path):
    corpus, cache = setup
    cfg = _cfg(editor, corpus)
    direct, _ = edit_model(make_tiny("llama", tokenizer), editor, cfg, REQUESTS, cache=cache, progress=False)

    # Computed in another model copy, saved and read back, as the grid's targets stage hands them over.
    values = compute_target_values(make_tiny("llama", tokenizer), TargetValuesConfig.of(cfg), REQUESTS,
                                   progress=False)
    values = TargetValues.load(values.save(tmp_path / "targets"))
    handed, run = edit_model(make_tiny("llama", tokenizer), editor, cfg, REQUESTS, cache=cache, progress=False,
                             target_values=values)
    assert set(handed.deltas) == set(direct.deltas)
    for name, d in direct.deltas.items():
        assert torch.equal(handed.deltas[name], d), name
        assert bool(d.abs().sum() > 0)
    assert run.target_log[0]["precomputed"] is True and "targets" not in run.timer.seconds


def test_memit_and_alphaedit_values_are_the_same_computation(setup):
    corpus, _ = setup
    assert TargetValuesConfig.of(_cfg("memit", corpus)) == TargetValuesConfig.of(_cfg("alphaedit", corpus))
    assert TargetValuesConfig.of(_cfg("memit", corpus, v_lr=0.1)) != TargetValuesConfig.of(_cfg("alphaedit", corpus))


def test_values_for_another_edit_are_refused(setup, tokenizer):
    import dataclasses

    corpus, cache = setup
    cfg = _cfg("memit", corpus)
    values = compute_target_values(make_tiny("llama", tokenizer), TargetValuesConfig.of(cfg), REQUESTS,
                                   progress=False)
    other_target = [dataclasses.replace(REQUESTS[0], target_new="Berlin"), *REQUESTS[1:]]     # same case ids
    cases = [
        (dict(cfg=_cfg("memit", corpus, v_lr=0.25), requests=REQUESTS), "v_lr: 0.5 vs 0.25"),
        (dict(cfg=cfg, requests=REQUESTS[:2]), "other requests"),
        (dict(cfg=cfg, requests=other_target), "other requests .* with other prompts, subjects or targets"),
        (dict(cfg=_cfg("memit", corpus, seed=1, v_lr=0.5), requests=REQUESTS), "seed: 0 vs 1"),
        (dict(cfg=cfg, requests=REQUESTS, seed=1), "computed on other weights"),
    ]
    for kw, message in cases:
        lm = make_tiny("llama", tokenizer, seed=kw.get("seed", 0))
        before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        with pytest.raises(EditDecayError, match=message):
            edit_model(lm, "memit", kw["cfg"], kw["requests"], cache=cache, progress=False, target_values=values)
        assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())   # restored


def test_values_with_other_templates_are_not_used(setup, tokenizer):
    """Same settings and weights, other sampled prefixes (another device or library version): the edit computes
    E3 itself and says so; its patch is the one it gives without precomputed values."""
    import dataclasses

    from editdecay.edit.context import ContextTemplates

    corpus, cache = setup
    cfg = _cfg("memit", corpus)
    direct, _ = edit_model(make_tiny("llama", tokenizer), "memit", cfg, REQUESTS, cache=cache, progress=False)
    values = compute_target_values(make_tiny("llama", tokenizer), TargetValuesConfig.of(cfg), REQUESTS,
                                   progress=False)
    wrong = torch.full_like(values.result.z, 7.0)
    values = dataclasses.replace(values, templates=ContextTemplates.of(["{}"], ["A. {}", "B. {}"]),
                                 result=dataclasses.replace(values.result, z=wrong))
    patch, run = edit_model(make_tiny("llama", tokenizer), "memit", cfg, REQUESTS, cache=cache, progress=False,
                            target_values=values)
    assert all(torch.equal(patch.deltas[n], d) for n, d in direct.deltas.items())
    assert any("other context templates" in w and "computed here instead" in w for w in run.warnings)
    assert "precomputed" not in run.target_log[0] and run.timer.seconds["targets"] > 0


def test_an_editor_without_targets_refuses_them(setup, tokenizer):
    corpus, cache = setup
    values = compute_target_values(make_tiny("llama", tokenizer), TargetValuesConfig.of(_cfg("memit", corpus)),
                                   REQUESTS, progress=False)
    with pytest.raises(ConfigError, match="editor 'ft' computes no E3 target values"):
        edit_model(make_tiny("llama", tokenizer), "ft", _cfg("ft", corpus), REQUESTS, cache=cache, progress=False,
                   target_values=values)


def test_damaged_files_are_named(setup, tokenizer, tmp_path):
    corpus, _ = setup
    values = compute_target_values(make_tiny("llama", tokenizer), TargetValuesConfig.of(_cfg("memit", corpus)),
                                   REQUESTS[:2], progress=False)
    out = values.save(tmp_path / "t")
    back = TargetValues.load(out)
    assert back.case_ids == values.case_ids and back.templates == values.templates
    assert torch.equal(back.result.z, values.result.z) and back.result.loss == values.result.loss
    (out / "targets.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match=f"target values {out} cannot be read"):
        TargetValues.load(out)
    values.save(out)
    meta = (out / "targets.json").read_text().replace('"capital"', '"capital", "extra"')
    (out / "targets.json").write_text(meta)
    with pytest.raises(ConfigError, match="3 case ids do not match"):
        TargetValues.load(Path(out))
