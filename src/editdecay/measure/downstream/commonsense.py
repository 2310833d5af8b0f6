"""The study's downstream accuracy: the eight commonsense tasks scored by generation (docs/PROTOCOL.md,
"Downstream accuracy"; docs/METHODS.md E7, downstream score DS).

The study's public code scores a model this way, not by log-likelihood: repository `Cheng-Yinjie/memit_cyj`,
`run_downstream_tasks.py`, `main` (its inner `evaluate`) and `extract_answer`, with the prompt of
`util/edit_inherit.py`, `customize_prompt`; it follows `AGI-Edgerunners/LLM-Adapters`,
`commonsense_evaluate.py`, `main`, `generate_prompt` and `extract_answer`. For each record of
`DIR/<task>/test.json` (LLM-Adapters' format: instruction, input, output, answer):

1. the prompt: the instruction in an Alpaca-style template (an "### Input:" block when the record has an
   input; `PROMPTS` below holds both codebases' templates verbatim, indentation included);
2. `model.generate` with beam search (4 beams) and 32 new tokens, prompts left-padded in batches;
3. the whole sequence decoded with special tokens skipped, and the text after the answer prefix
   ("### Response:", or "Answer:" for the study's GPT-2/GPT-J prompt), stripped;
4. the first match of the task's answer words (`ANSWER_WORDS`) by `re.findall` on that text: case-sensitive,
   no word boundaries, so "answer1" is found inside "answer12" and "true" inside "untrue"; no match gives "";
5. accuracy = the share of records whose extracted word equals the record's `answer` exactly.

Choices the two codebases make differently, and which one is taken (`prompt`):
- "study" (default): memit_cyj's `customize_prompt`: for GPT-2 and GPT-J models the prompt
  "Question: {instruction}\\nAnswer: " with answer prefix "Answer:"; for every other model the Alpaca template
  with 20-space indentation and answer prefix "### Response:". The text after the LAST prefix is taken
  (`split(prefix)[-1]`). (memit_cyj accepts only model names containing "llama" or "gpt"; editdecay takes
  the Alpaca template for every family that is not GPT-2/GPT-J.)
- "llm-adapters": LLM-Adapters' `generate_prompt` (16-space indentation), the text between the FIRST and the
  second "### Response:" (`split("### Response:")[1]`).
Both call `evaluate(instructions)` without the records' inputs, so a record's `input` never reaches the prompt
there; every record of the public test sets has an empty input. editdecay passes the input (the template's
"### Input:" block) and records that it did; with the public test sets the prompts are the same.
Not reproduced: the study overrides the model's pad/bos/eos ids with Llama-1's (0/1/2) before generating;
editdecay pads with the tokenizer's pad token (its end token when it has none) and stops at the model's own
end token. Sampling settings in the original call (temperature 0.1, top_p 0.75, top_k 40) have no effect
there (no `do_sample`), so generation here is plain beam search.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from editdecay.core.errors import ConfigError, DataError
from editdecay.data.source import split_spec

PREFIX = "commonsense"
PROTOCOL = "generation"           # how these tasks are scored; lm-eval's are "loglikelihood"
STUDY_PROTOCOL = ("Cheng-Yinjie/memit_cyj run_downstream_tasks.py (after AGI-Edgerunners/LLM-Adapters "
                  "commonsense_evaluate.py): beam-search generation, first answer word in the response")

# The task directories of LLM-Adapters' dataset/ and the answer words `extract_answer` looks for, in its order.
ANSWER_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
TASKS = tuple(ANSWER_WORDS)
# Other spellings of the task names (editdecay's short names and lm-eval's), case-insensitive.
ALIASES = {"siqa": "social_i_qa", "social_iqa": "social_i_qa", "arc-c": "ARC-Challenge",
           "arc_challenge": "ARC-Challenge", "arc-e": "ARC-Easy", "arc_easy": "ARC-Easy", "obqa": "openbookqa"}
_BY_LOWER = {t.lower(): t for t in TASKS} | {a: t for a, t in ALIASES.items()}

PROMPT_STYLES = ("study", "llm-adapters")
RESPONSE = "### Response:"
_GPT_FAMILIES = ("gpt2", "gptj")           # model_type values memit_cyj's "gpt" branch covers

# (with input, without input) templates, verbatim (trailing spaces and indentation are part of them).
_I20, _I16 = " " * 20, " " * 16
PROMPTS: dict[str, tuple[str, str]] = {
    "study-alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        f"{_I20}### Instruction:\n{_I20}{{instruction}}\n\n{_I20}### Input:\n{_I20}{{input}}\n\n"
        f"{_I20}### Response:\n{_I20}",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.  \n\n{_I20}### Instruction:\n{_I20}{{instruction}}\n\n{_I20}### Response:\n{_I20}",
    ),
    "study-gpt": ("Question: {instruction}\nInput: {input}\nAnswer: ", "Question: {instruction}\nAnswer: "),
    "llm-adapters": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"{_I16}### Instruction:\n{_I16}{{instruction}}\n\n{_I16}### Input:\n{_I16}{{input}}\n\n"
        f"{_I16}### Response:\n{_I16}",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request. \n\n{_I16}### Instruction:\n{_I16}{{instruction}}\n\n{_I16}### Response:\n{_I16}",
    ),
}


def canonical_task(name: str) -> str | None:
    """The task directory a name means ('ARC-Easy' for 'arc-e', 'arc_easy' or 'arc-easy'), or None."""
    return _BY_LOWER.get(str(name).strip().lower())


def task_key(task: str) -> str:
    """The name a task's scores carry in results: 'commonsense:boolq' (the protocol is in the name)."""
    return f"{PREFIX}:{task}"


def is_task_key(name: str) -> bool:
    return str(name).startswith(f"{PREFIX}:")


# --------------------------------------------------------------------------- the spec


def parse_argument(argument: str, base_dir: Path | None = None) -> tuple[Path, tuple[str, ...]]:
    """'DIR[:task,...]' -> (absolute DIR, task directories). Tasks may be separated by ',' or '+'; none listed
    means all eight. Raises ConfigError naming an unknown task and the valid names."""
    raw = argument.strip()
    if not raw:
        raise ConfigError(f"downstream task '{PREFIX}:': give a directory after '{PREFIX}:', e.g. "
                          f"{PREFIX}:path/to/dataset (LLM-Adapters' dataset/ folder: DIR/<task>/test.json)")
    where, listed = _split_dir(raw)
    path = Path(where).expanduser()
    path = path if path.is_absolute() else (Path(base_dir) if base_dir else Path.cwd()) / path
    tasks: list[str] = []
    for item in (t for t in re.split(r"[,+]", listed) if t.strip()) if listed else TASKS:
        task = canonical_task(item)
        if task is None:
            from editdecay.core.config import did_you_mean

            raise ConfigError(f"downstream task '{PREFIX}:{raw}': {item.strip()!r} is not a commonsense task"
                              f"{did_you_mean(item.strip(), [*TASKS, *ALIASES])}; use some of {', '.join(TASKS)}")
        if task in tasks:
            raise ConfigError(f"downstream task '{PREFIX}:{raw}': task {task!r} is listed twice")
        tasks.append(task)
    return path.resolve(), tuple(tasks)


def _split_dir(raw: str) -> tuple[str, str]:
    """'DIR:tasks' -> (DIR, tasks): the part after the last ':' is a task list unless it holds a path separator
    (then the ':' belongs to the path, e.g. a Windows drive) or is empty."""
    parts = raw.rsplit(":", 1)          # the spec's prefix is gone already (data.source.split_spec)
    if len(parts) == 2 and parts[0] and parts[1].strip() and "/" not in parts[1] and "\\" not in parts[1]:
        return parts[0], parts[1]
    return raw, ""


def canonical_spec(argument: str, base_dir: Path | None = None) -> str:
    """'commonsense:/abs/DIR' (all eight tasks) or 'commonsense:/abs/DIR:boolq,piqa' (as listed)."""
    path, tasks = parse_argument(argument, base_dir)
    return f"{PREFIX}:{path}" if tasks == TASKS else f"{PREFIX}:{path}:{','.join(tasks)}"


def spec_parts(spec: str) -> tuple[Path, tuple[str, ...]]:
    """The directory and tasks of a canonical spec."""
    return parse_argument(split_spec(spec)[1])


def digest(spec: str) -> str:
    """Content hash of the test files a spec reads (16 hex digits; "missing" when one does not exist yet)."""
    path, tasks = spec_parts(spec)
    h = hashlib.sha256()
    for t in tasks:
        f = path / t / "test.json"
        if not f.is_file():
            return "missing"
        h.update(t.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class Record:
    """One test record: its position in test.json, instruction, input ('' when none) and gold answer word."""

    index: int
    instruction: str
    input: str
    answer: str


@dataclass(frozen=True)
class CommonsenseTasks:
    """The records of one `commonsense:` spec, read before any model work."""

    spec: str
    directory: Path
    records: dict[str, tuple[Record, ...]]           # task directory -> records in file order

    @property
    def keys(self) -> list[str]:
        return [task_key(t) for t in self.records]


def load(spec: str) -> CommonsenseTasks:
    """Read every task of a canonical spec. DataError naming the file: a missing task directory (with the tasks
    that are there), a file that is not a JSON list, a record without a string `instruction` or `answer`, an
    answer that is not one of the task's answer words (it could never be matched)."""
    from editdecay.data.documents import read_records, strict_rows

    path, tasks = spec_parts(spec)
    if not path.is_dir():
        raise DataError(f"downstream task {spec!r}: {path} is not a directory; give LLM-Adapters' dataset folder "
                        f"(DIR/<task>/test.json for {', '.join(TASKS)})")
    missing = [t for t in tasks if not (path / t / "test.json").is_file()]
    if missing:
        there = sorted(t for t in TASKS if (path / t / "test.json").is_file())
        hint = (f"; list the tasks that are there: {PREFIX}:{path}:{','.join(there)}" if there else
                "; it holds none of the tasks")
        raise DataError(f"downstream task {spec!r}: no {missing[0]}/test.json in {path}{hint}")
    out = {}
    for t in tasks:
        f = path / t / "test.json"
        rows = strict_rows(read_records(f, f"{t} test file"), f)
        records, problems = [], []
        for i, row in enumerate(rows):
            problem = _problem(row, t)
            if problem:
                problems.append(f"record {i}: {problem}")
                continue
            records.append(Record(i, row["instruction"], row.get("input") or "", row["answer"]))
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DataError(f"{f}: {len(problems)} unusable record(s){more}:\n  " + "\n  ".join(problems[:3]))
        if not records:
            raise DataError(f"{f}: no records")
        out[t] = tuple(records)
    return CommonsenseTasks(spec, path, out)


def _problem(row, task: str) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object with instruction/input/output/answer, got {type(row).__name__}"
    for key in ("instruction", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"field {key!r} is missing, empty or not a string"
    if not isinstance(row.get("input") or "", str):
        return "field 'input' is not a string"
    if row["answer"] not in ANSWER_WORDS[task]:
        return f"answer {row['answer']!r} is not one of {task}'s answer words ({', '.join(ANSWER_WORDS[task])})"
    return None


# --------------------------------------------------------------------------- prompt and answer


def template_for(style: str, model_type: str | None) -> tuple[str, str]:
    """(template name in PROMPTS, answer prefix) for a prompt style and a model's `config.model_type`."""
    if style not in PROMPT_STYLES:
        raise ConfigError(f"prompt={style!r} is not valid; use one of {', '.join(PROMPT_STYLES)}")
    if style == "llm-adapters":
        return "llm-adapters", RESPONSE
    return ("study-gpt", "Answer:") if model_type in _GPT_FAMILIES else ("study-alpaca", RESPONSE)


def render(template: str, instruction: str, input: str = "") -> str:
    """The prompt of one record (plain replacement: instructions may hold braces)."""
    with_input, without_input = PROMPTS[template]
    text = with_input if input else without_input
    return text.replace("{instruction}", instruction).replace("{input}", input)


def response_of(decoded: str, style: str, prefix: str) -> str:
    """The response in a decoded sequence (prompt + generation): the study's `split(prefix)[-1]`, LLM-Adapters'
    `split("### Response:")[1]`, stripped."""
    if style == "llm-adapters":
        parts = decoded.split(RESPONSE)
        return (parts[1] if len(parts) > 1 else parts[0]).strip()
    return decoded.split(prefix)[-1].strip()


def extract_answer(task: str, response: str) -> str:
    """The first of the task's answer words found in the response (`re.findall`, case-sensitive, no word
    boundaries, leftmost match; an earlier word of the alternation wins at the same position), or ''."""
    found = re.findall("|".join(ANSWER_WORDS[task]), response.strip())
    return found[0] if found else ""


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated: beams and new tokens (the study: 4 and 32), prompts per batch, prompt style."""

    num_beams: int = 4
    max_new_tokens: int = 32
    batch_size: int = 32
    prompt: str = "study"


def score(model, tokenizer, tasks: CommonsenseTasks, settings: GenerationSettings, *,
          limit: int | None = None) -> tuple[dict[str, dict], dict[str, list[dict]], dict]:
    """Accuracy of `model` on every task: ({task key: {acc, n, n_no_answer}}, {task key: per-record predictions},
    provenance). `limit`: the first N records of each task. The model's training flag is restored."""
    import torch

    from editdecay.core.arch import unwrap_peft

    base = unwrap_peft(model)                 # a PeftModel's adapters are injected into this module tree
    template, prefix = template_for(settings.prompt, getattr(base.config, "model_type", None))
    was_training = base.training
    base.eval()
    scores, predictions = {}, {}
    try:
        with torch.no_grad():
            for task, records in tasks.records.items():
                chosen = records[:limit] if limit else records
                responses = generate(base, tokenizer, [render(template, r.instruction, r.input) for r in chosen],
                                     settings, template=template, prefix=prefix)
                rows = []
                for r, response in zip(chosen, responses):
                    pred = extract_answer(task, response)
                    rows.append({"index": r.index, "answer": r.answer, "prediction": pred,
                                 "correct": pred == r.answer, "response": response})
                key = task_key(task)
                predictions[key] = rows
                scores[key] = {"acc": sum(x["correct"] for x in rows) / len(rows), "n": len(rows),
                               "n_no_answer": sum(x["prediction"] == "" for x in rows)}
    finally:
        base.train(was_training)
    provenance = {"protocol": PROTOCOL, "follows": STUDY_PROTOCOL, "prompt": settings.prompt,
                  "template": template, "answer_prefix": prefix, "num_beams": settings.num_beams,
                  "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, "limit": limit,
                  "inputs_in_prompt": True, "directory": str(tasks.directory)}
    return scores, predictions, provenance


def generate(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, *, template: str,
             prefix: str) -> list[str]:
    """Responses to `prompts`: left-padded batches of `settings.batch_size`, beam search, the decoded sequence
    cut after the answer prefix (`response_of`)."""
    import torch
    from transformers import GenerationConfig

    from editdecay.core.devices import input_device
    from editdecay.core.tokens import pad_id

    device = input_device(model)
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model.config, "eos_token_id",
                                                                                     None)
    out: list[str] = []
    for start in range(0, len(prompts), settings.batch_size):
        ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts[start:start + settings.batch_size]]
        width = max(len(x) for x in ids)
        batch = torch.full((len(ids), width), pad, dtype=torch.long)          # (B, T) left-padded
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        # A fresh GenerationConfig, as the original builds one: the model's own generation defaults (sampling,
        # repetition penalties a checkpoint may ship) do not apply.
        config = GenerationConfig(do_sample=False, num_beams=settings.num_beams,
                                  max_new_tokens=settings.max_new_tokens, num_return_sequences=1,
                                  pad_token_id=pad, eos_token_id=eos)
        seqs = model.generate(input_ids=batch.to(device), attention_mask=mask.to(device),
                              generation_config=config)                                     # (B, T + new)
        # The whole sequence, prompt included, as the original decodes it: pads are special tokens and vanish.
        decoded = tokenizer.batch_decode(_strip_pads(seqs, mask, width), skip_special_tokens=True)
        out += [response_of(d, _style_of(template), prefix) for d in decoded]
    return out


def _strip_pads(seqs, mask, width: int) -> list[list[int]]:
    """Each sequence without its left padding (a pad id that is not a special token must not be decoded)."""
    n_pad = (width - mask.sum(dim=1)).tolist()
    return [s[p:].tolist() for s, p in zip(seqs.cpu(), n_pad)]


def _style_of(template: str) -> str:
    return "llm-adapters" if template == "llm-adapters" else "study"


__all__ = ["ALIASES", "ANSWER_WORDS", "CommonsenseTasks", "GenerationSettings", "PREFIX", "PROMPTS", "PROMPT_STYLES",
           "PROTOCOL", "Record", "TASKS", "canonical_spec", "canonical_task", "digest", "extract_answer",
           "is_task_key", "load", "parse_argument", "render", "response_of", "score", "spec_parts", "task_key",
           "template_for"]
