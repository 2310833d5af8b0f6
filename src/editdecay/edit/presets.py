"""Editor presets per model family, from the study (PROTOCOL.md), plus the embedded model's own.

Keys are (editor, preset name). `preset_for` picks by the model's family, or by the
embedded model's fingerprint-free name.
"""

from __future__ import annotations

from editdecay.core.errors import ConfigError

# Study settings (PROTOCOL.md): GPT-J layers 3-8, GPT2-XL 13-17, Llama 4-8; v_lr 0.5 (0.1 Llama-3);
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
# The embedded SmolLM2-135M (30 layers, d 576, d_k 1536), tuned on worldfacts (50 edits, seed 0, layers 3-7,
# 20k generated statistics tokens): lambda 15000 -> ES 3%; 8000 -> ES 18%; 5000 -> ES 63 / PS 32 / NS 96;
# 2000 -> ES 100 / PS 74 / NS 91 (from 100 before editing). The study's lambda is tuned for GPT-J's key
# scale; this model's keys are smaller relative to C, so a smaller lambda writes the same residual.
# At 100 edits (seed-0 sample) this preset gave ES 98 / PS 68.7 / NS 86.3; no setting tried beat it on both
# PS and NS (layers 1-8 spans, lambda 2000-5000, 50k statistics tokens, 10 context templates, stronger E3
# targets, clamp 1.25, 100k tokens: PS + NS stays at 148-155).
# Re-measured after E2 became the original two-level key average (issue 11; worldfacts seed-0 samples,
# benchmarks/edit_acceptance.py, 1 thread; ES / PS / NS in %, pre-edit ES 0 / PS 10-15 / NS 100):
#   MEMIT lambda 2000      n=50: ES 100 / PS 74.0 / NS 90.7 (flat E2: 100 / 74.0 / 91.3)
#                          n=100: ES 99 / PS 69.0 / NS 85.7 (flat E2: 98 / 68.7 / 86.3)
#   MEMIT lambda 3000      n=100: ES 98 / PS 65.3 / NS 89.0
#   AlphaEdit thr 2e-2     n=50: ES 100 / PS 76.0 / NS 90.0 (flat E2: 100 / 76.7 / 90.7)
#                          n=100: ES 99 / PS 70.0 / NS 82.0 (flat E2: 98 / 69.3 / 81.7)
#   AlphaEdit thr 1e-2     n=100: ES 98 / PS 64.3 / NS 87.0 (null space 632-915 of 1536 dims, not 1077-1311)
# The change moves no figure by more than 1 point, so both presets stay: lambda 3000 and threshold 1e-2
# only trade PS for NS (PS + NS 154.3 vs 154.7; 151.3 vs 152.0). Per-phase seconds at 100 edits (1 thread,
# CPU shared): MEMIT targets 313, keys 28, solve 0.3; AlphaEdit targets 289, keys 29, solve 0.8; statistics
# (cached) 1.0, nearly all of it the statistics check of edit/safety.py.
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
