"""No silent damage: an edit that would write a destructive patch fails with a named error,
exit status 2 and nothing written; judgement calls are warnings recorded in the result and patch.

Kinds: E1 statistics too thin (fewer tokens than d_k, or C numerically rank-deficient); a NaN or
infinity in statistics, keys, targets or deltas; a subject that does not end on a token boundary.
CLI tests use tiny random models (saved to a directory) and their own cache; one uses the embedded
model, where too few statistics tokens were first seen to wreck a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.edits import REQUESTS, write_corpus
from support.models import make_tiny
from typer.testing import CliRunner

import editdecay.edit.api as editing
import editdecay.edit.run as run_module
from editdecay.cli import _register, app
from editdecay.core.checks import check_finite
from editdecay.core.errors import NonFiniteError, StatisticsError, TokenBoundaryError
from editdecay.core.request import EditRequest
from editdecay.core.tokens import boundary_problem, encode_prompt, encode_subject_prompt
from editdecay.edit import make_config, validate_requests
from editdecay.edit.safety import check_statistics, numerical_rank
from editdecay.edit.stats import LayerStats

torch.set_num_threads(1)
_register()
runner = CliRunner()
LAYERS = (1, 2)


def _text(res) -> str:
    return " ".join(res.output.split())


def _stats(C: dict[int, torch.Tensor], n: int) -> LayerStats:
    return LayerStats(moments=C, n_tokens_used=n, keys={}, provenance={"n_tokens_used": {str(l): n for l in C}})


def _moment(d_k: int, rank: int, n: int, seed: int = 0) -> torch.Tensor:
    """(1/n) sum of n outer products of keys drawn from a rank-`rank` subspace: float32, like E1's C."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, rank, generator=g) @ torch.randn(rank, d_k, generator=g)          # (n, d_k)
    return (keys.T @ keys / n).float()


# --------------------------------------------------------------------------- unit: the statistics rule

def test_statistics_rule_tokens_rank_and_warning():
    d_k = 48
    # Fewer tokens than d_k: refused, naming the count, d_k and the minimum.
    with pytest.raises(StatisticsError) as e:
        check_statistics(_stats({3: _moment(d_k, d_k, 30)}, 30), [3])
    msg = str(e.value)
    assert "layer 3" in msg and "30 non-padding tokens" in msg and "d_k = 48" in msg and "at least 48" in msg, msg
    assert "--stats-tokens" in msg and "480" in msg, msg
    # Enough tokens, but C lives in a 20-dimensional subspace: refused with its numerical rank.
    deficient = _moment(d_k, 20, 2000)
    assert numerical_rank(deficient)[0] == 20
    with pytest.raises(StatisticsError) as e:
        check_statistics(_stats({3: deficient}, 2000), [3])
    assert "rank 20 of d_k = 48" in str(e.value) and "2,000 non-padding tokens" in str(e.value), str(e.value)
    # Full rank, d_k <= N < 10 d_k: a warning, not an error; N >= 10 d_k: silent.
    warnings = check_statistics(_stats({3: _moment(d_k, d_k, 100), 4: _moment(d_k, d_k, 100, 1)}, 100), [3, 4])
    assert len(warnings) == 1 and "3, 4" in warnings[0] and "480" in warnings[0], warnings
    assert check_statistics(_stats({3: _moment(d_k, d_k, 500)}, 500), [3]) == []


def test_check_finite_names_the_path():
    check_finite("ok", {"a": torch.ones(3), "b": [1.0, 2], "c": "text"})
    with pytest.raises(NonFiniteError, match=r"E3 targets: case_id 7 contains NaN or infinite values \(1 of 3"):
        check_finite("E3 targets", {"case_id 6": torch.ones(3), "case_id 7": torch.tensor([1.0, float("nan"), 0.0])})
    with pytest.raises(NonFiniteError, match=r"metrics: post\.efficacy is inf"):
        check_finite("metrics", {"post": {"efficacy": float("inf")}})


# --------------------------------------------------------------------------- Python API: non-finite values

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


def _nan_targets(real):
    def fake(*a, **kw):
        tr = real(*a, **kw)
        tr.z[1, :3] = float("nan")
        return tr
    return fake


def _nan_keys(real):
    def fake(model, tok, requests, layers, templates, **kw):
        out = real(model, tok, requests, layers, templates, **kw)
        if list(layers) == [2]:
            out[2][0, 0] = float("inf")
        return out
    return fake


def _nan_delta(real):
    def fake(self, layer, K, R, **kw):
        d = real(self, layer, K, R, **kw)
        return d * float("nan") if layer == 2 else d
    return fake


@pytest.mark.parametrize("editor, where, patch_it, named", [
    ("memit", "compute_targets", _nan_targets, "E3 target values z: case_id sport"),
    ("alphaedit", "compute_keys", _nan_keys, "E2 keys at layer 2: case_id capital"),
    ("memit", "delta", _nan_delta, "memit delta at layer 2"),
    ("alphaedit", "delta", _nan_delta, "alphaedit delta at layer 2"),
])
def test_non_finite_values_fail_the_api_and_leave_the_model_unchanged(editor, where, patch_it, named, tokenizer,
                                                                      corpus, tmp_path, monkeypatch):
    from editdecay.core.cache import Cache
    from editdecay.edit import editor_class

    lm = make_tiny("llama", tokenizer)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    if where == "delta":
        cls = editor_class(editor)
        monkeypatch.setattr(cls, "layer_delta", patch_it(cls.layer_delta))    # layer 1 is edited first, then NaN
    else:
        monkeypatch.setattr(run_module, where, patch_it(getattr(run_module, where)))
    cfg = make_config(editor, layers=LAYERS, v_num_grad_steps=3, n_context_templates=1, context_length=4,
                      stats_corpus=str(corpus), stats_tokens=400,
                      **({"mom2_update_weight": 100.0} if editor == "memit" else {}))
    with pytest.raises(NonFiniteError) as e:
        editing.edit_model(lm, editor, cfg, REQUESTS, cache=Cache(tmp_path / "cache"), progress=False)
    assert named in str(e.value) and "NaN or infinite" in str(e.value), str(e.value)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed: a failed edit must leave the model as it was"


# --------------------------------------------------------------------------- token boundary

def test_token_boundary_rule(tokenizer):
    """Edit and evaluation see the same tokens; the edit position holds the subject's last character."""
    sp = encode_subject_prompt(tokenizer, "{}ese cuisine is famous for", "Japan")
    assert sp.ids == encode_prompt(tokenizer, "Japanese cuisine is famous for")
    assert not sp.on_boundary and tokenizer.decode([sp.subject_last]).strip() == "Japanese"
    problem = boundary_problem(tokenizer, "{}ese cuisine is famous for", "Japan")
    assert "'Japan'" in problem and "'Japanese'" in problem, problem
    ok = encode_subject_prompt(tokenizer, "The cuisine of {} is famous for", "Japan")
    assert ok.on_boundary and tokenizer.decode([ok.subject_last]).strip() == "Japan"
    assert ok.ids == encode_prompt(tokenizer, "The cuisine of Japan is famous for")
    assert boundary_problem(tokenizer, "The cuisine of {} is famous for", "Japan") is None
    bad = EditRequest("jp", "{}ese cuisine is famous for", "Japan", "pasta", "sushi")
    warnings = validate_requests(tokenizer, [REQUESTS[0], bad])
    assert len(warnings) == 1 and warnings[0].startswith("request 1 (jp): subject 'Japan'"), warnings
    with pytest.raises(TokenBoundaryError, match=r"request 1 \(jp\).*Refused \(strict\)"):
        validate_requests(tokenizer, [REQUESTS[0], bad], strict=True)


# --------------------------------------------------------------------------- through the CLI

def _counterfact(path: Path, rewrites: list[tuple[str, str, str, str]]) -> Path:
    """A CounterFact file: (prompt template, subject, target_new, target_true) per record."""
    records = [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "relation_id": "P0",
                                                   "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [f"Everyone knows this. {p.replace('{}', s)}"],
                "neighborhood_prompts": [p.replace("{}", "Berlin")]}
               for i, (p, s, new, true) in enumerate(rewrites)]
    path.write_text(json.dumps(records))
    return path


CAPITALS = [("The capital of {} is", "France", "Rome", "Paris"),
            ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
            ("The capital city of {} is", "Japan", "Beijing", "Tokyo")]


@pytest.fixture
def tiny_dir(tmp_path, tokenizer, monkeypatch) -> Path:
    """A tiny Llama saved as a model directory; the editdecay cache is private to the test."""
    monkeypatch.setenv("EDITDECAY_CACHE", str(tmp_path / "cache"))
    lm = make_tiny("llama", tokenizer)
    lm.model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _edit(model: Path | str, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["edit", "--model", str(model), "--data", f"counterfact:{data}", "--out", str(out),
                               *extra])


def test_cli_too_few_statistics_tokens_tiny(tiny_dir, tmp_path, corpus):
    out = tmp_path / "patch"
    res = _edit(tiny_dir, _counterfact(tmp_path / "cf.json", CAPITALS), out, "--layers", "1,2",
                "--stats-corpus", str(corpus), "--stats-tokens", "40")
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "40 non-padding tokens" in text and "d_k = 64" in text and "at least 64" in text, text
    assert "Traceback" not in res.output and not out.exists()


def test_cli_non_finite_statistics(tiny_dir, tmp_path, corpus):
    """A checkpoint with a NaN weight in layer 2's MLP: its statistics are NaN; refused before any edit."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_dir / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"][5, 3] = float("nan")
    save_file(weights, str(tiny_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "patch"
    res = _edit(tiny_dir, _counterfact(tmp_path / "cf.json", CAPITALS), out, "--layers", "1,2",
                "--stats-corpus", str(corpus), "--stats-tokens", "400")
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "E1 statistics: layer 2 contains NaN or infinite values" in text, text
    assert "Traceback" not in res.output and not out.exists()


def test_cli_subject_not_on_a_token_boundary(tiny_dir, tmp_path, corpus):
    data = _counterfact(tmp_path / "cf.json", [CAPITALS[0], ("{}ese cuisine is famous for", "Japan", "pasta", "sushi")])
    args = ("--layers", "1,2", "--stats-corpus", str(corpus), "--stats-tokens", "400")
    # --strict: refused by name, nothing written.
    out = tmp_path / "strict"
    res = _edit(tiny_dir, data, out, *args, "--strict")
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "request 1 (1)" in text and "'Japan'" in text and "token boundary" in text and "'Japanese'" in text, text
    assert "Traceback" not in res.output and not out.exists()
    # Default: edited at the prompt's own token 'Japanese' (the one evaluation sees), with a recorded warning.
    out = tmp_path / "lenient"
    res = _edit(tiny_dir, data, out, *args)
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "token boundary" in _text(res)
    result = json.loads((out / "result.json").read_text())
    patch = json.loads((out / "patch.json").read_text())
    for warnings in (result["warnings"], patch["extra"]["warnings"]):
        assert any("request 1 (1)" in w and "'Japanese'" in w for w in warnings), warnings
        assert any("x d_k = 640" in w for w in warnings), warnings               # 400 statistics tokens < 10 x 64


@pytest.mark.slow
def test_cli_issue_case_embedded_1000_statistics_tokens(tmp_path, embedded):
    """Three capital/language MEMIT edits with 1,000 statistics tokens (d_k = 1,536) on the embedded model."""
    out = tmp_path / "patch"
    res = _edit("smollm2-135m", _counterfact(tmp_path / "cf.json", CAPITALS), out, "--stats-tokens", "1000")
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "layer 3" in text and "d_k = 1,536" in text and "at least 1,536" in text and "15,360" in text, text
    assert "Traceback" not in res.output and not out.exists()
    # 1,600 tokens > d_k, but tokens of one text are correlated: C has rank ~1,150 (before this check the
    # edit wrote delta norms of 56-96 per layer, against 11-17 with 3,000 tokens).
    res = _edit("smollm2-135m", tmp_path / "cf.json", out, "--stats-tokens", "1600")
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "numerically rank-deficient" in text and "of d_k = 1,536 from 1,600 non-padding tokens" in text, text
    assert "at least 3,200" in text and not out.exists()
