"""Instruction records and the prompt templates that render them (training and task scoring share these)."""

from __future__ import annotations

from dataclasses import dataclass

# Prompt templates: (with input, without input). "alpaca" is the wording of the Commonsense170K /
# LLM-Adapters fine-tuning the study used; "compact" drops the preamble so short cutoffs fit.
TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "compact": (
        "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n",
        "### Instruction:\n{instruction}\n### Response:\n",
    ),
}


@dataclass(frozen=True)
class InstructionRecord:
    """One Commonsense170K-style record; `input` may be empty."""

    instruction: str
    input: str
    output: str


def render_prompt(record: InstructionRecord, template: str) -> str:
    """The prompt text of a record (everything before the response). Plain replacement, not str.format:
    instructions may contain braces."""
    with_input, without_input = TEMPLATES[template]
    text = with_input if record.input.strip() else without_input
    return text.replace("{instruction}", record.instruction).replace("{input}", record.input)
