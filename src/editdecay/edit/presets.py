"""Editor presets per model family, from the study (docs/PROTOCOL.md), plus the embedded model's own.

Keys are (editor, preset name). `preset_for` picks by the model's family, or by the
embedded model's fingerprint-free name.
"""

from __future__ import annotations

from editdecay.core.errors import ConfigError

# Study settings (docs/PROTOCOL.md): GPT-J layers 3-8, GPT2-XL 13-17, Llama 4-8; v_lr 0.5 (0.1 Llama-3);
# kl 0.0625; clamp 0.75; mom2 15000 (GPT-J) / 20000 (GPT2-XL); AlphaEdit threshold 2e-2, L2 10.
_COMMON = dict(v_num_grad_steps=25, kl_factor=0.0625, clamp_norm_factor=0.75, stats_tokens=100_000)
PRESETS: dict[tuple[str, str], dict] = {
    ("memit", "gpt2"): dict(_COMMON, layers=(13, 14, 15, 16, 17), v_lr=0.5, mom2_update_weight=20000.0),
    ("memit", "gptj"): dict(_COMMON, layers=(3, 4, 5, 6, 7, 8), v_lr=0.5, mom2_update_weight=15000.0),
    ("memit", "gpt_neox"): dict(_COMMON, layers=(3, 4, 5, 6, 7, 8), v_lr=0.5, mom2_update_weight=15000.0),
    ("memit", "llama"): dict(_COMMON, layers=(4, 5, 6, 7, 8), v_lr=0.5, mom2_update_weight=15000.0),
    ("alphaedit", "gpt2"): dict(_COMMON, layers=(13, 14, 15, 16, 17), v_lr=0.5, nullspace_threshold=2e-2, L2=10.0),
    ("alphaedit", "gptj"): dict(_COMMON, layers=(3, 4, 5, 6, 7, 8), v_lr=0.5, nullspace_threshold=2e-2, L2=10.0),
    ("alphaedit", "gpt_neox"): dict(_COMMON, layers=(3, 4, 5, 6, 7, 8), v_lr=0.5, nullspace_threshold=2e-2, L2=10.0),
    ("alphaedit", "llama"): dict(_COMMON, layers=(4, 5, 6, 7, 8), v_lr=0.5, nullspace_threshold=2e-2, L2=10.0),
}
# The embedded SmolLM2-135M takes a smaller lambda: the study's 15000 barely moves its small keys (50 worldfacts edits:
# ES 3 % at 15000, 100 % at 2000); at 100 edits both presets give ES 99 / PS ~70 / NS 82-86 (edit_acceptance.py).
EMBEDDED = {
    "memit": dict(layers=(3, 4, 5, 6, 7), v_lr=0.5, v_num_grad_steps=25, kl_factor=0.0625, clamp_norm_factor=0.75,
                  mom2_update_weight=2000.0, stats_tokens=20_000, n_context_templates=5, context_length=10),
    "alphaedit": dict(layers=(3, 4, 5, 6, 7), v_lr=0.5, v_num_grad_steps=25, kl_factor=0.0625, clamp_norm_factor=0.75,
                      nullspace_threshold=2e-2, L2=10.0, stats_tokens=20_000, n_context_templates=5,
                      context_length=10),
}


def preset_for(editor: str, family: str, model_name: str | None = None) -> dict:
    from editdecay.core.models import EMBEDDED_NAME

    if model_name == EMBEDDED_NAME:
        return dict(EMBEDDED[editor])
    try:
        return dict(PRESETS[(editor, family)])
    except KeyError:
        raise ConfigError(f"no {editor} preset for model family {family!r}; pass --layers explicitly") from None
