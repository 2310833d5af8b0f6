"""Context prefixes for keys and target values (ALGORITHMS.md E2).

The reference samples short texts from the model itself and prepends them to the
edit prompt ("<text>. {}"), so the edit generalises beyond one exact context.
Here sampling uses a private, seeded generator: the same model and seed always
give the same prefixes.
"""

from __future__ import annotations

import torch

from editdecay.core.tokens import encode_prompt, pad_id

SEED_WORDS = ("The", "Therefore", "Because", "I", "You", "It", "When", "In")


@torch.no_grad()
def context_templates(model, tokenizer, *, n: int = 5, length: int = 10, seed: int = 0) -> tuple[str, ...]:
    """Return ("{}", "<sampled text>. {}", ...): 1 + n templates with one "{}" slot each.

    `length` is the number of tokens sampled per prefix. n=0 gives only the bare template.
    """
    if n <= 0:
        return ("{}",)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for i in range(n):
        ids = encode_prompt(tokenizer, SEED_WORDS[i % len(SEED_WORDS)])
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float().cpu()
            top = torch.topk(logits, 5)  # top-5 sampling, as in the reference
            choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)].item()
            if choice == pad_id(tokenizer) or choice == tokenizer.eos_token_id:
                break
            ids.append(choice)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        out.append(f"{text}. {{}}")
    return ("{}", *out)
