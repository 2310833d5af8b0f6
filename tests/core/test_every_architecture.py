"""Every row of the architecture table through every stage of the pipeline.

One test, over the tiny random model of every family of the architecture table (tests/support/models.py):
edit (every registered editor, edit/registry.py) -> evaluate (E6) -> fine-tune with every method
(finetune/recipe.py METHODS) -> task scoring (exact match, through `core.forward.logits_at`).

It runs twice per row: with the table as it is, and with a *decoy* alternative put in front of every
module name of the row ("decoy.h.{}|transformer.h.{}", "decoy_lm_head|lm_head", ...). A table name may
hold alternatives ("lm_head|embed_out" for GPT-NeoX); the decoy run fails at any place that looks a
table name up without expanding its alternatives through `core.arch.resolve_name` (the fault this
guards against: fine-tuning GPT-NeoX failed when `forward.py` looked up "lm_head|embed_out" as is).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from support.edits import small_edit_config
from support.models import FAMILIES, make_tiny

from editdecay.core import arch
from editdecay.core.cache import Cache
from editdecay.core.forward import logits_at
from editdecay.core.request import EditRequest
from editdecay.core.tokens import pad_batch, pad_id
from editdecay.data import load_source
from editdecay.data.embedded_task import EmbeddedTask
from editdecay.edit.api import edit_model
from editdecay.edit.editor import LOCATE_THEN_EDIT
from editdecay.edit.registry import editor_class, editor_names
from editdecay.finetune.recipe import METHODS, Recipe
from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune
from editdecay.measure.metrics import aggregate, evaluate_requests
from editdecay.measure.task import exact_match

torch.set_num_threads(1)

LAYERS = (1, 2)
TASK = EmbeddedTask(n_train=8, n_test=4)
REQUESTS = [
    EditRequest("capital", "The capital of {} is", "France", "Rome", "Paris",
                paraphrase_prompts=("{} has its capital in",), neighborhood_prompts=("The capital of Spain is",),
                neighborhood_answers=("Madrid",)),
    EditRequest("sport", "{} plays the sport of", "Lionel Messi", "basketball", "football",
                paraphrase_prompts=("The sport {} plays is",), neighborhood_prompts=("Roger Federer plays",),
                neighborhood_answers=("tennis",)),
]
WORDS = ("the of and a in to is was for on that by with as from at his her it an were are which this be or "
         "has had its also first new one two time city year people world state river music team").split()


def with_decoys(spec: arch.ArchSpec) -> arch.ArchSpec:
    """The same row with a module name that exists in no model in front of every name."""
    def decoy(name: str) -> str:
        return f"decoy_{name}|{name}"

    return dataclasses.replace(
        spec, block=f"decoy.h.{{}}|{spec.block}", mlp_out=f"decoy.h.{{}}.mlp|{spec.mlp_out}",
        final_norm=decoy(spec.final_norm), unembed=decoy(spec.unembed), embed=decoy(spec.embed),
        attention=tuple(decoy(n) for n in spec.attention), mlp=tuple(decoy(n) for n in spec.mlp))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(100)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    return Cache(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("names", ["table", "decoys"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_on_every_architecture_row(family, names, tokenizer, corpus, cache, tmp_path, monkeypatch):
    if names == "decoys":
        monkeypatch.setattr(arch, "ARCHITECTURES", tuple(with_decoys(s) for s in arch.ARCHITECTURES))
    lm = make_tiny(family, tokenizer)
    spec = arch.arch_for(lm.model)
    assert spec.family == family and ("|" in spec.unembed) == (names == "decoys" or family == "gpt_neox")
    real = dict(lm.model.named_modules())
    before = evaluate_requests(lm.model, tokenizer, REQUESTS)

    # edit: every registered editor; patch keys are real module paths (never a table name with alternatives)
    patches = {}
    for editor in editor_names():
        cfg = small_edit_config(editor, lm, layers=LAYERS, v_num_grad_steps=4, n_context_templates=1,
                                context_length=4, stats_corpus=str(corpus), stats_tokens=1400)   # > 10 d_k
        patch, run = edit_model(lm, editor, cfg, REQUESTS, cache=cache, progress=False)
        run.restore()
        mlp = {arch.resolve_name(lm.model, spec.in_block(l, r)) for l in LAYERS for r in spec.mlp}
        assert patch.module_names and set(patch.module_names) <= mlp, (editor, patch.module_names)
        if editor_class(editor).family == LOCATE_THEN_EDIT:
            assert set(patch.deltas) == {arch.resolve_name(lm.model, spec.mlp_out_name(l)) for l in LAYERS}
        assert all(name in real and "|" not in name for name in patch.module_names), list(patch.module_names)
        assert all(float(d.norm()) > 0 for d in patch.tensors().values()), editor
        patches[editor] = patch

    # evaluate (E6): the edited model is measured through the same table names, whatever the patch holds
    for editor, patch in patches.items():
        with patch.applied(lm.model):
            after = evaluate_requests(lm.model, tokenizer, REQUESTS)
        assert aggregate(after)["n"] == len(REQUESTS)
        assert any(abs(a.margin - b.margin) > 1e-4 for a, b in zip(after, before)), f"{editor} moved no margin"
    patch = patches[editor_names()[0]]

    # task scoring: logits of the scored positions only equal the full forward pass's
    ids = [tokenizer.encode("The capital of France is Paris"), tokenizer.encode("Hello there")]
    batch = pad_batch(ids, pad_id(tokenizer), "right")
    select = batch.attention_mask.bool()
    with torch.no_grad():
        full = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[select]
        part = logits_at(lm.model, batch.input_ids, batch.attention_mask, select)
    assert torch.allclose(part, full, atol=1e-5)
    score = exact_match(lm.model, tokenizer, TASK.records()[1], template="compact")
    assert score.n == TASK.n_test and score.nll > 0

    # fine-tune with every method, on a fresh copy with the edit applied; nothing outside the plan changes
    source = load_source("embedded", task=TASK)
    for method in METHODS:
        fresh = make_tiny(family, tokenizer)
        start = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
        recipe = Recipe(method=method, layers="edited", targets="mlp", max_steps=2, batch_size=4, lora_r=4,
                        learning_rate=5e-2, template="compact", cutoff_len=48, warmup_steps=0)
        res = run_finetune(fresh, recipe, source, tmp_path / method, measures=Measures(task=TASK), progress=False,
                           edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply),
                           save="merged").result
        assert res["status"] == "done" and res["training"]["steps"] == 2, method
        planned = res["plan"]["modules"]
        assert planned and all(m in real and "|" not in m for m in planned), planned
        want = {arch.resolve_name(fresh.model, spec.in_block(l, r)) for l in LAYERS for r in spec.mlp}
        assert set(planned) == want, method
        assert res["metrics"]["M_ef"]["n_task"] == TASK.n_test
        changed = {n.rsplit(".", 1)[0] for n, p in fresh.model.named_parameters() if not torch.equal(p, start[n])}
        assert changed <= set(planned), (method, sorted(changed - set(planned))[:4])
        assert changed - set(patch.deltas), f"{method}: training changed nothing besides the edit"

    # a patch of module state (GRACE's codebook) under LoRA: peft wraps the host, the state stays frozen
    for editor, patch in patches.items():
        if not patch.states:
            continue
        fresh = make_tiny(family, tokenizer)
        recipe = Recipe(method="lora", layers="edited", targets="mlp", max_steps=2, batch_size=4, lora_r=4,
                        learning_rate=5e-2, template="compact", cutoff_len=48, warmup_steps=0)
        res = run_finetune(fresh, recipe, source, tmp_path / f"{editor}-lora", measures=Measures(task=TASK),
                           progress=False, save="adapter",
                           edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply)).result
        assert res["status"] == "done" and res["training"]["steps"] == 2, editor
        assert set(res["plan"]["module_edits"].values()) == {"frozen"}, res["plan"]["module_edits"]
        assert len(res["plan"]["module_edits"]) == len(patch.states), res["plan"]["module_edits"]
