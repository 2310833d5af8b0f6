"""Make the committed `worldfacts` selection: which table facts the embedded model knows.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/select_worldfacts.py [--seed 0] [--out PATH] [--no-eval]

For every relation of `editdecay.data.worldfacts`, judges every askable fact of
the table with rule `known-v1` (see that module's docstring), splits the known
facts (seeded) into edited and neighbourhood-only facts, and writes
`src/editdecay/data/worldfacts_selection.json` with the rule, seed, model
identity and table hash. Then it builds the edit set from that file and measures
it before any edit (E6 via `evaluate_requests` + `aggregate`); the figures are
stored in the file under `before_edit`. The output has no timestamps: rerunning
with the same model, table and code rewrites the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from editdecay.core.cache import atomic_write_bytes
from editdecay.core.models import load_model
from editdecay.core.results import package_versions
from editdecay.data import worldfacts as wf
from editdecay.measure.metrics import aggregate, evaluate_requests, score_continuations

log = logging.getLogger("select_worldfacts")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "editdecay" / "data" / wf.SELECTION_FILE


def _entry(fact: wf.Fact, v: wf.Verdict) -> dict:
    return {"case_id": fact.case_id, "row": fact.row, "subject": fact.subject, "object": fact.object,
            "nll": round(v.nll_true, 3), "rival": v.rival,
            "margin": None if v.margin is None else round(v.margin, 3)}


def select(lm, table: dict, seed: int) -> dict:
    relations = {}
    for relation in wf.RELATIONS:
        t = time.perf_counter()
        facts, bad = wf.askable_facts(table, relation)
        if bad:
            raise SystemExit("the table has malformed rows:\n" + "\n".join(f"  - {b}" for b in bad))
        candidates = wf.candidate_objects(table, relation)
        verdicts = wf.judge(lm.model, lm.tokenizer, facts, candidates)
        by_id = {f.case_id: v for f, v in zip(facts, verdicts)}
        known = [f for f, v in zip(facts, verdicts) if v.known]
        split = wf.split_known(known, seed)
        relations[relation.id] = {
            "prompt": relation.prompt,
            "askable": len(facts), "candidates": len(candidates),
            "greedy": sum(v.greedy for v in verdicts), "known": len(known),
            **{role: [_entry(f, by_id[f.case_id]) for f in split[role]] for role in wf.ROLES},
        }
        log.info("%-10s askable %3d  greedy %3d  known %3d  (edit %d, neighbourhood-only %d)  %.0f s",
                 relation.id, len(facts), relations[relation.id]["greedy"], len(known),
                 len(split["edit"]), len(split["neighbor"]), time.perf_counter() - t)
    return relations


def _summary(outcomes, rewrite, para) -> dict:
    agg = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in aggregate(outcomes).items()}
    agg["true_argmax_rewrite"] = f"{sum(s.all_correct for s in rewrite)} of {len(rewrite)}"
    agg["true_argmax_paraphrase"] = f"{sum(s.all_correct for s in para)} of {len(para)}"
    return agg


def before_edit(lm, ds) -> dict:
    """E6 on the unedited model, plus how often the model's greedy answer is the true object
    (every target token the argmax), overall and per relation."""
    reqs = list(ds.requests)
    outcomes = evaluate_requests(lm.model, lm.tokenizer, reqs)
    rewrite = score_continuations(lm.model, lm.tokenizer, [(r.rewrite_prompt, r.target_true) for r in reqs])
    para = [score_continuations(lm.model, lm.tokenizer, [(p, r.target_true) for p in r.paraphrase_prompts])
            for r in reqs]
    out = {"all": _summary(outcomes, rewrite, [s for ps in para for s in ps])}
    for rel in wf.RELATIONS:
        idx = [i for i, r in enumerate(reqs) if r.relation_id == rel.id]
        out[rel.id] = _summary([outcomes[i] for i in idx], [rewrite[i] for i in idx],
                               [s for i in idx for s in para[i]])
    return out


def dumps(sel: dict) -> str:
    """JSON with one selection entry per line: readable diffs, small file."""
    text = json.dumps(sel, indent=2, ensure_ascii=False)
    for block in sel["relations"].values():
        for role in wf.ROLES:
            for e in block[role]:
                text = text.replace(json.dumps(e, indent=2, ensure_ascii=False).replace("\n", "\n" + " " * 8),
                                    json.dumps(e, ensure_ascii=False), 1)
    json.loads(text)
    return text + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-eval", action="store_true", help="skip the before-edit measurement")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    lm = load_model(a.model)
    table = wf.read_table()
    table_bytes = (Path(wf.__file__).parent / wf.TABLE_FILE).read_bytes()
    sel = {
        "format": wf.SELECTION_FORMAT,
        "rule": wf.RULE,
        "rule_text": ("on the rewrite prompt: (a) every token of the true object is the teacher-forced argmax, and "
                      "(b) its mean NLL is below that of every other object of the relation among the table's "
                      f"askable facts by at least {wf.MIN_MARGIN} nats"),
        "seed": a.seed,
        "neighbor_split": {"fraction": wf.NEIGHBOR_FRACTION, "min": wf.MIN_NEIGHBORS},
        # the source path is machine-specific; the fingerprint names the weights
        "model": {k: v for k, v in lm.identity.to_dict().items() if k != "source"},
        "table_sha256": hashlib.sha256(table_bytes).hexdigest(),
        "made_with": {k: v for k, v in package_versions().items() if k in ("editdecay", "torch", "transformers")},
        "made_by": "scripts/select_worldfacts.py",
        "relations": select(lm, table, a.seed),
    }
    ds = wf.load_worldfacts(strict=True, table=table, selection=sel)
    n_known = sum(b["known"] for b in sel["relations"].values())
    n_askable = sum(b["askable"] for b in sel["relations"].values())
    log.info("the model knows %d of %d askable facts; %d edit requests", n_known, n_askable, len(ds.requests))
    if not a.no_eval:
        sel["before_edit"] = before_edit(lm, ds)
        for name, agg in sel["before_edit"].items():
            log.info("before any edit, %s: %s", name, json.dumps(agg))
    atomic_write_bytes(a.out, dumps(sel).encode())
    log.info("wrote %s", a.out)


if __name__ == "__main__":
    main()
