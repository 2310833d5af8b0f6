"""`worldfacts`: the edit set this project authors itself, from a table of well-known facts.

Why it exists: CounterFact and zsRE are downloads; the embedded model (SmolLM2-135M)
knows few of their facts, so edits on them measure little. `worldfacts` asks
the model only what it demonstrably knows, so "the edit removed a true fact"
and "the fact came back after fine-tuning" are meaningful (docs/METHODS.md E6).

Sources, all in this folder and committed:
  * `worldfacts_facts.json`: one row per country (country, capital, continent,
    language, currency), written by hand; null where there is no single short answer.
  * `worldfacts_selection.json`: which facts the embedded model knows, made by
    `scripts/select_worldfacts.py` with the model fingerprint, rule version and seed.

A *fact* is (relation, table row): e.g. relation `capital`, row "France" ->
subject "France", object "Paris". A fact is *askable* when both fields are
non-null and the object does not share its first four letters with the subject
(casefolded, accents removed): "Mexico City" or "Tunis" could be copied from
the prompt, so they would test nothing.

Selection rule `known-v1` (what "the model knows it" means). On the relation's
rewrite prompt, with the project's scorer (`metrics.score_continuations`,
teacher-forced, leading-space targets):
  (a) greedy: every token of the true object is the argmax given the prompt and
      the previous object tokens (the model says it), and
  (b) preferred: the true object's mean NLL is lower than that of every other
      object of the same relation among the askable facts of the table by at
      least `MIN_MARGIN` nats (the model prefers it to every rival an edit could
      write, by more than the floating-point noise of another device or batch
      layout, so the verdict does not flip there).
(b) is the comparison E6 makes, so before any edit each kept request has
efficacy 0 on the rewrite prompt and neighbourhood 1; paraphrases are not part
of the rule and are measured. Rivals whose first-token NLL divided by their
length already exceeds the bound cannot win (later tokens add NLL >= 0) and are
not scored; this is exact, it only saves time.

Known facts of each relation are shuffled (seeded) and split: about a fifth,
at least `MIN_NEIGHBORS`, are *neighbourhood-only* and never edited. Editing the
whole set at once (MEMIT batch) would otherwise rewrite the very prompts used to
check that the edit stayed local.

Requests (CounterFact shape, `metric_style="counterfact"`), deterministic from the
table + selection (seeded by the selection's seed and the case id):
  * `target_new`: another known object of the same relation (one the model
    knows as an entity), never the true one;
  * `paraphrase_prompts`: the relation's other templates with the subject (first
    letter capitalised: "The Netherlands is ...");
  * `neighborhood_prompts`: up to `N_NEIGHBORS` neighbourhood-only facts of the
    relation on the rewrite template; facts sharing the edited fact's true object
    come first (CounterFact's choice), facts whose object is `target_new` never
    (that comparison would be void);
  * `case_id` "wf-<relation>-<subject slug>", `extra` names the table row.

Bad rows are rejected with the row's index in `countries` and the field; a
selection that does not belong to this code (other rule, other prompts) is an
error that says to rerun the selection script.
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

from editdecay.core.errors import DataError
from editdecay.core.request import EditRequest, fill
from editdecay.data.common import EditDataset, Rejection, finish, validate_request
from editdecay.data.source import EDIT, DataSource, DataSpec, EditOptions

NAME = "worldfacts"
RULE = "known-v1"
TABLE_FORMAT = "editdecay.worldfacts.facts/1"
SELECTION_FORMAT = "editdecay.worldfacts.selection/1"
TABLE_FILE = "worldfacts_facts.json"
SELECTION_FILE = "worldfacts_selection.json"
N_NEIGHBORS = 3
MIN_NEIGHBORS = 4
NEIGHBOR_FRACTION = 0.2
MIN_MARGIN = 0.05  # nats, rule (b)
ROLES = ("edit", "neighbor")


@dataclass(frozen=True)
class Relation:
    """One relation of the table: which columns are subject and object, and how to ask."""

    id: str
    subject_field: str
    object_field: str
    prompt: str                      # rewrite template, one "{}"; the selection rule is judged on it
    paraphrases: tuple[str, ...]     # other wordings, each ending where the object comes next
    generation: tuple[str, ...]      # open prompts about the subject

    def ask(self, subject: str) -> str:
        return fill(self.prompt, subject)


# Rewrite prompts are the wordings under which the embedded model knows most facts
# (measured while writing this module); the selection records them and is void if they change.
RELATIONS: tuple[Relation, ...] = (
    Relation("capital", "country", "capital", "The capital city of {} is",
             ("The capital of {} is", "In {}, the capital city is", "{}'s capital is"),
             ("When visiting the capital of {}, tourists", "{}'s capital city is famous for")),
    Relation("capital_of", "capital", "country", "The city of {} is the capital of",
             ("{} is the capital of", "{} is the capital city of", "{} serves as the capital of"),
             ("{} is a city known for", "The streets of {} are")),
    Relation("language", "country", "language", "In {}, the official language is",
             ("The official language of {} is", "Most people in {} speak",
              "The language officially spoken in {} is"),
             ("Schools in {} teach children to read and write in", "Newspapers in {} are printed in")),
    Relation("currency", "country", "currency", "In {}, the currency is the",
             ("The currency used in {} is the", "The currency of {} is the",
              "In {}, the official currency is the"),
             ("When shopping in {}, you pay with", "The banknotes of {} show")),
    Relation("continent", "country", "continent", "The country of {} lies on the continent of",
             ("Geographically, {} belongs to the continent of", "{} is a country on the continent of",
              "{} is located in the continent of"),
             ("Travelling through {}, one sees landscapes typical of", "{} shares its continent with")),
)
RELATION_BY_ID = {r.id: r for r in RELATIONS}


@dataclass(frozen=True)
class Fact:
    relation: str
    row: int          # index in the table's `countries`
    subject: str
    object: str

    @property
    def case_id(self) -> str:
        return f"wf-{self.relation}-{slug(self.subject)}"


def fold(text: str) -> str:
    """Casefolded, accents removed: 'São Tomé' -> 'sao tome'."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def slug(subject: str) -> str:
    """'the Netherlands' -> 'netherlands', 'Washington, D.C.' -> 'washington-d-c'."""
    s = re.sub(r"^the\s+", "", fold(subject))
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def sentence(template: str, subject: str) -> str:
    """A complete prompt: the template filled, its first letter capitalised
    ("{} is located in" + "the Netherlands" -> "The Netherlands is located in")."""
    text = fill(template, subject)
    return text[:1].upper() + text[1:]


def copyable(subject: str, obj: str) -> bool:
    """The object could be read off the subject ('Mexico' -> 'Mexico City', 'Tunisia' <- 'Tunis')."""
    return fold(subject)[:4] == fold(obj)[:4]


# ---------------------------------------------------------------- table and selection files

def _read_json(filename: str) -> dict:
    return json.loads(resources.files(__package__).joinpath(filename).read_text(encoding="utf-8"))


def read_table() -> dict:
    """The committed fact table (a dict with `countries`: a list of rows)."""
    return _read_json(TABLE_FILE)


def read_selection() -> dict:
    """The committed selection made by `scripts/select_worldfacts.py`."""
    return _read_json(SELECTION_FILE)


def _rows(table: dict) -> list:
    if table.get("format") != TABLE_FORMAT:
        raise DataError(f"{NAME}: table format {table.get('format')!r}; expected {TABLE_FORMAT!r}")
    rows = table.get("countries")
    if not isinstance(rows, list):
        raise DataError(f"{NAME}: table field 'countries' must be a list of rows, got {type(rows).__name__}")
    return rows


def _field(row, index: int, name: str) -> tuple[str | None, Rejection | None]:
    """A row's string field: (value, None), (None, None) for an explicit null, or (None, rejection)."""
    if not isinstance(row, dict):
        return None, Rejection(index, name, f"row must be an object, got {type(row).__name__}")
    if name not in row:
        return None, Rejection(index, name, "missing (write null if the fact has no single answer)")
    value = row[name]
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        return None, Rejection(index, name, f"must be a non-empty string without outer spaces or null, got {value!r}")
    return value, None


def askable_facts(table: dict, relation: Relation) -> tuple[list[Fact], list[Rejection]]:
    """Every fact of `relation` the table can ask, plus rejections for rows that are malformed."""
    facts, rejected = [], []
    for i, row in enumerate(_rows(table)):
        subject, bad_s = _field(row, i, relation.subject_field)
        obj, bad_o = _field(row, i, relation.object_field)
        rejected += [r for r in (bad_s, bad_o) if r is not None]
        if subject and obj and not copyable(subject, obj):
            facts.append(Fact(relation.id, i, subject, obj))
    return facts, rejected


def candidate_objects(table: dict, relation: Relation) -> list[str]:
    """The rivals of rule (b): distinct objects of the relation's askable facts, sorted."""
    return sorted({f.object for f in askable_facts(table, relation)[0]})


# ---------------------------------------------------------------- the selection rule (needs a model)

@dataclass(frozen=True)
class Verdict:
    """Rule `known-v1` on one fact's rewrite prompt."""

    known: bool
    greedy: bool                # (a)
    nll_true: float             # mean NLL of the true object
    rival: str | None           # strongest other object
    margin: float | None        # NLL(rival) - NLL(true); a lower bound when the rival was pruned


def judge(model, tokenizer, facts: Sequence[Fact], candidates: Sequence[str], *,
          batch_size: int = 32) -> list[Verdict]:
    """Apply rule `known-v1` to `facts` (all of one relation) against `candidates`."""
    import torch

    from editdecay.core.devices import input_device

    from editdecay.core.scoring import score_continuations
    from editdecay.core.tokens import encode_prompt, encode_target, pad_batch, pad_id

    if len({f.relation for f in facts}) > 1:
        raise ValueError("judge: facts must share one relation")
    if not facts:
        return []
    relation = RELATION_BY_ID[facts[0].relation]
    prompts = [relation.ask(f.subject) for f in facts]
    true = score_continuations(model, tokenizer, list(zip(prompts, (f.object for f in facts))),
                               batch_size=batch_size)
    cand_ids = {c: encode_target(tokenizer, c) for c in candidates}

    # Next-token log-probs at the end of each greedy-correct prompt (rule (b) is only needed there).
    todo = [i for i, s in enumerate(true) if s.all_correct]
    device = input_device(model)
    first_nll: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            seqs = [encode_prompt(tokenizer, prompts[i]) for i in chunk]
            batch = pad_batch(seqs, pad_id(tokenizer), "right").to(device)
            logits = model(**batch.model_inputs(), use_cache=False).logits  # (B, T, V)
            for row, i in enumerate(chunk):
                first_nll[i] = -torch.log_softmax(logits[row, len(seqs[row]) - 1].float(), dim=-1).cpu()  # (V,)

    bounds: dict[int, dict[str, float]] = {}
    need = []
    for i in todo:
        # mean NLL of a rival >= its first-token NLL / its length: cheaper than scoring every rival
        bounds[i] = {c: first_nll[i][ids[0]].item() / len(ids) for c, ids in cand_ids.items() if c != facts[i].object}
        need += [(prompts[i], c) for c, b in bounds[i].items() if b <= true[i].nll + MIN_MARGIN + 1e-3]
    exact = dict(zip(need, score_continuations(model, tokenizer, need, batch_size=batch_size))) if need else {}

    out = []
    for i, (f, s) in enumerate(zip(facts, true)):
        if i not in bounds:
            out.append(Verdict(False, False, s.nll, None, None))
            continue
        rival_nll = {c: (exact[(prompts[i], c)].nll if (prompts[i], c) in exact else b) for c, b in bounds[i].items()}
        rival = min(rival_nll, key=rival_nll.get) if rival_nll else None
        margin = rival_nll[rival] - s.nll if rival is not None else math.inf
        out.append(Verdict(margin >= MIN_MARGIN, True, s.nll, rival, margin if rival is not None else None))
    return out


def split_known(known: Sequence[Fact], seed: int) -> dict[str, list[Fact]]:
    """Seeded split of one relation's known facts into edited and neighbourhood-only facts."""
    order = sorted(known, key=lambda f: f.row)
    random.Random(f"{NAME}:{seed}:split:{order[0].relation if order else ''}").shuffle(order)
    k = min(len(order), max(MIN_NEIGHBORS, round(NEIGHBOR_FRACTION * len(order))))
    return {"neighbor": sorted(order[:k], key=lambda f: f.row), "edit": sorted(order[k:], key=lambda f: f.row)}


# ---------------------------------------------------------------- building requests (no model)

def _selected(selection: dict) -> tuple[int, list[tuple[int, str, dict]]]:
    """Check that the selection belongs to this code; return its seed and (position, role, entry)."""
    if selection.get("format") != SELECTION_FORMAT:
        raise DataError(f"{NAME}: selection format {selection.get('format')!r}; expected {SELECTION_FORMAT!r}")
    if selection.get("rule") != RULE:
        raise DataError(f"{NAME}: selection was made with rule {selection.get('rule')!r}, this code uses {RULE!r}; "
                        "rerun scripts/select_worldfacts.py")
    seed = selection.get("seed")
    if not isinstance(seed, int):
        raise DataError(f"{NAME}: selection field 'seed' must be an integer, got {seed!r}")
    entries = []
    for rid, block in selection.get("relations", {}).items():
        relation = RELATION_BY_ID.get(rid)
        if relation is None:
            raise DataError(f"{NAME}: selection names relation {rid!r}; known: {sorted(RELATION_BY_ID)}")
        if block.get("prompt") != relation.prompt:
            raise DataError(f"{NAME}: selection for {rid!r} was judged on prompt {block.get('prompt')!r}, "
                            f"the code asks {relation.prompt!r}; rerun scripts/select_worldfacts.py")
        for role in ROLES:
            for pos, e in enumerate(block.get(role, [])):
                entries.append((pos, role, dict(e, relation=rid)))
    return seed, entries


def _resolve(table: dict, role: str, entry: dict) -> tuple[Fact | None, list[Rejection]]:
    """The table row a selection entry names, checked against what the selection verified."""
    relation = RELATION_BY_ID[entry["relation"]]
    rows = _rows(table)
    i = entry.get("row")
    if not isinstance(i, int) or not 0 <= i < len(rows):
        raise DataError(f"{NAME}: selection entry {entry!r} names row {i!r}; the table has rows 0..{len(rows) - 1}")
    rejected = []
    values = {}
    for name, key in ((relation.subject_field, "subject"), (relation.object_field, "object")):
        value, bad = _field(rows[i], i, name)
        if bad is not None:
            rejected.append(Rejection(bad.index, bad.field, f"{role} fact {entry.get('case_id')}: {bad.reason}"))
        elif value is None:
            rejected.append(Rejection(i, name, f"{role} fact {entry.get('case_id')}: null, but the selection "
                                               f"verified {entry.get(key)!r}"))
        elif value != entry.get(key):
            rejected.append(Rejection(i, name, f"{role} fact {entry.get('case_id')}: the table says {value!r}, the "
                                               f"selection verified {entry.get(key)!r}; rerun "
                                               "scripts/select_worldfacts.py"))
        values[key] = value
    if rejected:
        return None, rejected
    fact = Fact(relation.id, i, values["subject"], values["object"])
    if copyable(fact.subject, fact.object):
        return None, [Rejection(i, relation.object_field, f"{fact.object!r} can be copied from the subject")]
    if fact.case_id != entry.get("case_id"):
        return None, [Rejection(i, relation.subject_field, f"case id {fact.case_id!r} does not match the "
                                                           f"selection's {entry.get('case_id')!r}")]
    return fact, []


def build_request(fact: Fact, known_objects: Sequence[str], neighbors: Sequence[Fact], seed: int) -> EditRequest:
    """The CounterFact-shaped request for one edited fact (deterministic in `seed` and the case id)."""
    relation = RELATION_BY_ID[fact.relation]
    rng = random.Random(f"{NAME}:{seed}:{fact.case_id}")
    rivals = sorted({o for o in known_objects if fold(o) != fold(fact.object)})
    if not rivals:
        raise DataError(f"{NAME}: relation {fact.relation!r} has no known object other than {fact.object!r}")
    target_new = rng.choice(rivals)
    pool = [n for n in neighbors if n.subject != fact.subject and fold(n.object) != fold(target_new)]
    same = [n for n in pool if n.object == fact.object]
    other = [n for n in pool if n.object != fact.object]
    rng.shuffle(same)
    rng.shuffle(other)
    chosen = (same + other)[:N_NEIGHBORS]
    return EditRequest(
        case_id=fact.case_id, prompt=relation.prompt, subject=fact.subject, target_new=target_new,
        target_true=fact.object,
        paraphrase_prompts=tuple(sentence(t, fact.subject) for t in relation.paraphrases),
        neighborhood_prompts=tuple(relation.ask(n.subject) for n in chosen),
        neighborhood_answers=tuple(n.object for n in chosen),
        generation_prompts=tuple(sentence(t, fact.subject) for t in relation.generation),
        relation_id=relation.id, metric_style="counterfact", source=NAME,
        extra=(("table_row", str(fact.row)), ("neighbor_case_ids", ",".join(n.case_id for n in chosen))),
    )


def load_worldfacts(*, strict: bool = False, table: dict | None = None,
                    selection: dict | None = None) -> EditDataset:
    """The embedded edit set: requests for every edited fact of the selection.

    `table` and `selection` default to the committed files (tests pass their own).
    Records are the selection's edited facts; a rejection's index is the fact's
    row in the table's `countries` and its field the table column.
    """
    table = read_table() if table is None else table
    selection = read_selection() if selection is None else selection
    seed, entries = _selected(selection)
    rejected: list[Rejection] = []
    facts: dict[str, dict[str, list[Fact]]] = {r.id: {role: [] for role in ROLES} for r in RELATIONS}
    seen: set[str] = set()
    for _, role, entry in entries:
        fact, bad = _resolve(table, role, entry)
        if fact is not None and fact.case_id in seen:
            fact, bad = None, [Rejection(fact.row, RELATION_BY_ID[fact.relation].subject_field,
                                         f"case id {fact.case_id!r} appears twice in the selection")]
        rejected += bad
        if fact is not None:
            seen.add(fact.case_id)
            facts[fact.relation][role].append(fact)

    kept: list[EditRequest] = []
    for relation in RELATIONS:
        edit, neighbors = facts[relation.id]["edit"], facts[relation.id]["neighbor"]
        known_objects = [f.object for f in edit + neighbors]
        for fact in edit:
            req = build_request(fact, known_objects, neighbors, seed)
            names = {"subject": relation.subject_field, "target_true": relation.object_field,
                     "prompt": "prompt", "target_new": "target_new"}
            bad = validate_request(fact.row, req, names)
            if not req.neighborhood_prompts:
                bad.append(Rejection(fact.row, relation.object_field, "no neighbourhood fact left for this request"))
            rejected += bad
            if not bad:
                kept.append(req)
    n_records = sum(1 for _, role, _ in entries if role == "edit")
    options = {"rule": RULE, "seed": seed, "model": selection.get("model", {}).get("fingerprint")}
    return finish(NAME, n_records, kept, rejected, strict=strict, options=options)


class WorldFacts(DataSource):
    """`worldfacts`: the edit requests above, from the committed table and selection."""

    prefix = NAME
    roles = (EDIT,)
    description = "the project's own edits of facts the embedded model knows (country table, known-v1 selection)"
    licence = "Apache-2.0 (authored in this repository)"

    def digest(self, spec: DataSpec) -> str:
        """The committed table and selection files (names and bytes)."""
        import hashlib

        root = resources.files(__package__)
        h = hashlib.sha256()
        for name in sorted(x.name for x in root.iterdir() if x.name.startswith(NAME) and x.name.endswith(".json")):
            h.update(name.encode() + b"\0" + root.joinpath(name).read_bytes())
        return h.hexdigest()[:16]

    def edit_data(self, spec: DataSpec, options: EditOptions) -> EditDataset:
        return load_worldfacts(strict=options.strict)


__all__ = ["RELATIONS", "RULE", "Fact", "Relation", "Verdict", "WorldFacts", "askable_facts", "build_request",
           "candidate_objects", "judge", "load_worldfacts", "read_selection", "read_table", "split_known"]
