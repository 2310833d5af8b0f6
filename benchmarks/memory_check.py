"""The memory plan against measured peaks: run every stage once on a loaded model and compare.

For each stage (E1 statistics, E3 targets, E2 keys, E4 solve, E6 evaluation, training) this runs the real
code of editdecay at a stated size, measures its peak (`core.peak.PeakMemory`: the resident high-water mark
on the CPU, `max_memory_allocated` on CUDA) and puts it beside the plan's prediction
(`core.memory_plan.stage_memory`) for the same sizes. The peak of a stage is the model's weights (resident
throughout) plus what the stage allocates on top; both columns are given, and the error is
(predicted - measured) / measured of the total.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_check.py --model smollm2-135m
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_check.py --tiny llama

tests/core/test_memory_plan.py runs `check_model` on two tiny models and (marked slow) the embedded one.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CheckSizes:
    """The sizes each stage is run at (chosen so that each stage's own memory is well above RSS noise)."""

    n_requests: int = 16
    n_context_templates: int = 2
    context_length: int = 6
    stats_batch: int = 16
    stats_seq_len: int = 256
    train_batch: int = 8
    train_seq_len: int = 128
    train_steps: int = 2
    eval_batch: int = 32
    layers: tuple[int, ...] = (1, 2)
    gradient_checkpointing: bool = False


def _requests(n: int):
    from editdecay.data import load_edit_data

    return list(load_edit_data("worldfacts", limit=n).requests)


def _train_data(sizes: CheckSizes, vocab: int):
    from editdecay.data.instructions import IGNORE_INDEX, Example, TrainingSet

    gen = torch.Generator().manual_seed(0)
    n = sizes.train_batch * sizes.train_steps
    ids = torch.randint(10, vocab, (n, sizes.train_seq_len), generator=gen).tolist()
    # The first quarter is the prompt (no loss), as in instruction data.
    cut = sizes.train_seq_len // 4
    ex = tuple(Example(tuple(x), tuple([IGNORE_INDEX] * cut + x[cut:])) for x in ids)
    return TrainingSet(ex, {"name": "random tokens"}), sizes.train_seq_len - cut


def check_model(lm, sizes: CheckSizes = CheckSizes(), *, stages=None, recipe=None) -> dict:
    """Run and measure each stage; returns {stage: {"predicted", "measured", "resident", "error"}} (bytes)."""
    from editdecay.core.memory_plan import EditSetting, ModelDims, stage_memory
    from editdecay.core.peak import PeakMemory, tensor_bytes
    from editdecay.edit.context import ContextTemplates
    from editdecay.edit.keys import compute_keys
    from editdecay.edit.solve import memit_delta
    from editdecay.edit.stats import accumulate_second_moments
    from editdecay.edit.targets import TargetSettings, compute_targets
    from editdecay.finetune.recipe import Recipe
    from editdecay.finetune.train import train
    from editdecay.finetune.trainable import resolve_plan
    from editdecay.grid.memory import train_setting
    from editdecay.measure.metrics import evaluate_requests

    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    dims = ModelDims.of_model(model)
    stages = stages or ("statistics", "targets", "keys", "solve", "evaluation", "training")
    reqs = _requests(sizes.n_requests)
    words = ["The", "Because", "When", "In", "It"]
    templates = ContextTemplates.of(["{}"], [f"{' '.join([w] * sizes.context_length)}. {{}}"
                                             for w in words[:sizes.n_context_templates]])
    setting = EditSetting.from_requests(tok, reqs, templates, layers=sizes.layers, stats_batch=sizes.stats_batch,
                                        stats_seq_len=sizes.stats_seq_len, eval_batch=sizes.eval_batch)
    weights = tensor_bytes(model)
    out = {}
    clock = [time.perf_counter()]

    def record(stage: str, measured_extra: int, resident: int = weights) -> None:
        est = stage_memory(dims, stage, edit=setting, train=training)
        measured = resident + measured_extra
        out[stage] = {"predicted": est.peak, "measured": measured, "predicted_extra": est.peak - est.resident,
                      "measured_extra": measured_extra, "parts": est.parts,
                      "error": round((est.peak - measured) / measured, 4),
                      "seconds": round(time.perf_counter() - clock[0], 2)}
        clock[0] = time.perf_counter()

    training = None
    if "training" in stages:
        recipe = recipe or Recipe(method="full", targets="all", max_steps=sizes.train_steps,
                                  batch_size=sizes.train_batch, cutoff_len=sizes.train_seq_len, learning_rate=1e-5,
                                  gradient_checkpointing=sizes.gradient_checkpointing, warmup_steps=0)
        data, labelled = _train_data(sizes, dims.vocab)
        training = train_setting(recipe, dims, model=model, seq_len=sizes.train_seq_len, labelled_tokens=labelled,
                                 device=device.type)
    if "statistics" in stages:
        gen = torch.Generator().manual_seed(1)
        chunks = torch.randint(10, dims.vocab, (sizes.stats_batch, sizes.stats_seq_len), generator=gen).tolist()
        with PeakMemory(device) as m:
            sums, _ = accumulate_second_moments(lm, sizes.layers, chunks, batch_size=sizes.stats_batch, progress=False)
        record("statistics", m.extra)
        C = {l: s / (sizes.stats_batch * sizes.stats_seq_len) for l, s in sums.items()}
        del sums
    if "targets" in stages:
        cfg = TargetSettings(layer=max(sizes.layers), v_num_grad_steps=2, early_stop_loss=0.0,
                             batch_size=sizes.n_requests)
        with PeakMemory(device) as m:
            tr = compute_targets(model, tok, reqs, templates, cfg, progress=False)
        record("targets", m.extra)
    if "keys" in stages:
        with PeakMemory(device) as m:
            K = compute_keys(model, tok, reqs, list(sizes.layers), templates)
        record("keys", m.extra)
    if "solve" in stages:
        layer = sizes.layers[0]
        Kl = K[layer] if "keys" in stages else torch.randn(dims.d_ff, sizes.n_requests)
        R = (tr.z - tr.h).T if "targets" in stages else torch.randn(dims.d, sizes.n_requests)
        Cl = C[layer] if "statistics" in stages else torch.eye(dims.d_ff)
        with PeakMemory("cpu") as m:
            memit_delta(Kl, R, Cl, 1000.0, device=device)
        record("solve", m.extra)
    if "evaluation" in stages:
        with PeakMemory(device) as m:
            evaluate_requests(model, tok, reqs, batch_size=sizes.eval_batch)
        record("evaluation", m.extra)
    if "training" in stages:
        plan = resolve_plan(recipe, model)
        with PeakMemory(device) as m:
            train(model, tok, recipe, data, plan=plan, progress=False)
        record("training", m.extra)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model name for load_model (e.g. smollm2-135m)")
    ap.add_argument("--tiny", default=None, help="a tiny random model of this family (llama, gpt2)")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.tiny:
        lm = tiny_model(args.tiny)
        sizes = CheckSizes(gradient_checkpointing=args.checkpointing)
    else:
        from editdecay.core.models import load_model

        lm = load_model(args.model or "smollm2-135m")
        sizes = CheckSizes(layers=(3, 4, 5, 6, 7), gradient_checkpointing=args.checkpointing)
    res = check_model(lm, sizes)
    for stage, r in res.items():
        print(f"{stage:11s} predicted {r['predicted'] / 2**20:9.1f} MiB  measured {r['measured'] / 2**20:9.1f} MiB  "
              f"error {100 * r['error']:+6.1f}%   (own: {r['predicted_extra'] / 2**20:8.1f} vs "
              f"{r['measured_extra'] / 2**20:8.1f} MiB)")
    print(json.dumps({k: {**v, "parts": {p: round(b / 2**20, 2) for p, b in v["parts"].items()}}
                      for k, v in res.items()}, indent=1))


def tiny_model(family: str):
    """A small random model with the embedded tokenizer's vocabulary (49152): wide enough that each stage's
    own memory is tens of MiB, shallow enough to run every stage in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    from editdecay.core.models import load_model, wrap
    from editdecay.core.models import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    V = len(tok)
    if family == "llama":
        cfg = LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=1024, max_position_embeddings=512, vocab_size=V, tie_word_embeddings=True)
    elif family == "gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=512, vocab_size=V)
    else:
        raise SystemExit(f"--tiny {family!r}: llama or gpt2")
    del load_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    return wrap(model.eval(), tok, name=f"tiny-{family}", source="config")


if __name__ == "__main__":
    main()
