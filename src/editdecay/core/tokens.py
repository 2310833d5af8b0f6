"""Tokenisation conventions, in one place.

Word boundary: a target is scored as the continuation of a prompt. BPE
tokenizers (GPT-2, Llama-3, SmolLM) mark a word start with a leading space, so
the target is encoded as " " + target. SentencePiece tokenizers that insert a
dummy prefix themselves (Llama-2) must not get a second space. Prompt and target
are encoded separately and concatenated, so the target tokens are identical for
every prompt (no merges across the boundary).

Subject boundary: the edit position is the token of the whole prompt (encoded as
evaluation encodes it) that holds the subject's last character
(`encode_subject_prompt`); a subject that does not end on a token boundary gets a
warning, or is refused in strict mode (`edit.run.validate_requests`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editdecay.core.errors import DataError


def adds_prefix_space(tokenizer) -> bool:
    """True if the tokenizer encodes 'a' as a word-initial piece by itself (SentencePiece style)."""
    ids = tokenizer.encode("a", add_special_tokens=False)
    piece = tokenizer.convert_ids_to_tokens(ids[:1])[0] if ids else ""
    return piece.startswith("▁")


def encode_target(tokenizer, target: str) -> list[int]:
    """Token ids of `target` as a continuation after a prompt (leading-space convention)."""
    text = target.strip()
    if not adds_prefix_space(tokenizer):
        text = " " + text
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids or not target.strip():
        raise DataError(f"target {target!r} tokenizes to nothing")
    return ids


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (a BOS token where it adds one)."""
    ids = tokenizer.encode(prompt.rstrip(" "), add_special_tokens=True)
    if not ids:
        raise DataError(f"prompt {prompt!r} tokenizes to nothing")
    return ids


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


@dataclass
class Batch:
    """A padded batch of token sequences. Positions are explicit so that left and
    right padding give identical logits at every real token."""

    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor    # (B, T)
    offsets: list[int]            # index in the padded row of each sequence's token 0

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device), self.offsets)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def pad_batch(seqs: list[list[int]], pad: int, side: str = "right") -> Batch:
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        off = width - len(s) if side == "left" else 0
        ids[i, off:off + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, off:off + len(s)] = 1
        pos[i, off:off + len(s)] = torch.arange(len(s))
        offsets.append(off)
    return Batch(ids, mask, pos, offsets)


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt split at the subject's last token (docs/METHODS.md E2: the key/edit position).

    ids = prefix + [subject_last] + rest = the whole prompt's tokens exactly as `encode_prompt`
    gives them (so editing and evaluation see the same tokens); the subject's last token is at
    index len(prefix). `on_boundary` is False when that token also covers text after the
    subject (see `encode_subject_prompt`).
    """

    prefix: tuple[int, ...]
    subject_last: int
    rest: tuple[int, ...]
    on_boundary: bool = True

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, self.subject_last, *self.rest]

    @property
    def index(self) -> int:
        return len(self.prefix)


def _token_at_char(tokenizer, text: str, ids: list[int], char: int) -> int:
    """Index of the token of `ids` (= encode_prompt(text)) whose text covers character `char` of `text`."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            for j, (start, end) in enumerate(enc["offset_mapping"]):
                if start <= char < end:
                    return j
    for j in range(1, len(ids) + 1):               # slow tokenizers: grow the decoded prefix
        if len(tokenizer.decode(ids[:j], skip_special_tokens=True)) > char:
            return j - 1
    return len(ids) - 1


def encode_subject_prompt(tokenizer, template: str, subject: str) -> SubjectPrompt:
    """Encode `template` (one "{}" slot) with `subject` filled in, locating the subject's last token.

    The tokens are those of the whole prompt (`encode_prompt`), so the key (E2), the target
    optimisation (E3) and evaluation (E6) all see the same sequence. Token-boundary rule: the
    edit position is the token of the whole prompt that holds the subject's last character.
    Normally the subject ends on a token boundary and that token is the subject's own last
    token. If it does not (template "{}ese cuisine is famous for" with subject "Japan"
    tokenizes as "Japanese"; zsRE's "... (APA-56)?" ends in the token ")?"), the edit keys on
    that spanning token, as the original MEMIT code does when it indexes the whole prompt, and
    `on_boundary` is False: `edit.run.validate_requests` warns (or, strict, refuses).
    """
    if template.count("{}") != 1:
        raise DataError(f"prompt template must contain exactly one '{{}}': {template!r}")
    before, after = template.split("{}")
    head = encode_prompt(tokenizer, before + subject)
    text = before + subject + after
    full = encode_prompt(tokenizer, text)
    if full[:len(head)] == head:
        i, on_boundary = len(head) - 1, True
    else:
        i = _token_at_char(tokenizer, text.rstrip(" "), full, len((before + subject).rstrip(" ")) - 1)
        on_boundary = False
    return SubjectPrompt(tuple(full[:i]), full[i], tuple(full[i + 1:]), on_boundary)


def boundary_problem(tokenizer, template: str, subject: str) -> str | None:
    """None if `subject` ends on a token boundary of the filled-in `template`; else why not (one sentence)."""
    sp = encode_subject_prompt(tokenizer, template, subject)
    if sp.on_boundary:
        return None
    head = encode_prompt(tokenizer, template.split("{}")[0] + subject)
    return (f"subject {subject!r} does not end on a token boundary of the prompt {template.replace('{}', subject)!r}: "
            f"its last token {tokenizer.decode(head[-1:])!r} does not occur there; the prompt's token "
            f"{tokenizer.decode([sp.subject_last])!r} spans the subject's end, so the edit keys on that token")
