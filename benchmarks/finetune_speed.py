"""Fine-tuning throughput of the embedded model on this machine: editdecay's trainer before/after the speed
options, transformers' Trainer on the same data as the anchor, and the bfloat16 loss-curve check.

The recipe is the embedded study v3's (examples/grids/embedded-study-v3.yaml: chatterbot choice records, batch 8,
cutoff 160, trained on prompt and response, embedded preset learning rates), one torch thread. Per method (lora,
dora, full on all layers) and setting:

- `float32`: the trainer before the speed options (plain shuffle, float32, sdpa attention);
- `grouped`: `group_by_length` (micro-batches of similar length, transformers' length-grouped sampler);
- `bf16`: bfloat16 autocast (recipe `dtype`);
- `bf16+grouped`: both (these four on transformers' default `sdpa` attention, as the trainer ran before);
- `now`: bf16+grouped with the recipe's default `attention_kernel` (auto: `eager` on the CPU for these sequences,
  finetune/attention.py): the trainer as the v3 grid runs it now;
- `trainer`: transformers' `Trainer` on the same tokenised examples, the same trainable parameters (the model
  `finetune.trainable.prepare_model` returns), AdamW, schedule and clipping, float32 (and `trainer-bf16`).

Tokens/s counts the examples' tokens (no padding) over the timed steps; the first step of every run is a
warm-up and is not timed. With `--curve-steps N` the float32 and bfloat16 runs of each method in `--curve`
also train N steps in the same example order and the per-step losses are compared: the check the speed option
must pass before a recipe uses it (the tolerance is `--tolerance`, on the mean absolute loss difference over
the last half of the curve, relative to the float32 loss there).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_speed.py --steps 4 --json finetune_speed.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_speed.py --methods lora,full --settings none \
        --curve lora,full --curve-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "examples" / "grids" / "embedded-study-v3.yaml"
# The speed options one at a time on transformers' own attention kernel (sdpa), then the recipe as the trainer now
# runs it: `attention_kernel` auto, which is eager on the CPU for these sequences (finetune/attention.py).
SDPA = {"attention_kernel": "sdpa"}
SETTINGS = {"float32": SDPA, "grouped": {"group_by_length": True, **SDPA}, "bf16": {"dtype": "bfloat16", **SDPA},
            "bf16+grouped": {"dtype": "bfloat16", "group_by_length": True, **SDPA},
            "now": {"dtype": "bfloat16", "group_by_length": True}}


def _data(tokenizer, recipe):
    from editdecay.data.instructions import tokenize
    from editdecay.data.sources import held_out_task, load_source
    from editdecay.grid.spec import load_grid

    task = held_out_task("chatterbot", load_grid(GRID).shared.chatterbot.to_dict())
    source = load_source("chatterbot", task=task)
    return tokenize(source, tokenizer, cutoff_len=recipe.cutoff_len, template=recipe.template, train_on_prompt=True)


def _recipe(method: str, steps: int, **extra):
    from editdecay.finetune.recipe import preset
    return preset("embedded", method, batch_size=8, warmup_steps=0, cutoff_len=160, train_on_prompt=True,
                  max_steps=steps, **extra)


def editdecay_run(method: str, steps: int, extra: dict) -> dict:
    """`steps` + 1 optimiser steps with editdecay's trainer; the first is not timed. Per-step losses kept."""
    from editdecay.core.models import load_model
    from editdecay.finetune.train import train
    from editdecay.finetune.trainable import resolve_plan

    lm = load_model("smollm2-135m")
    recipe = _recipe(method, steps + 1, **extra)
    data = _data(lm.tokenizer, recipe)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        o = train(lm.model, lm.tokenizer, recipe, data, plan=resolve_plan(recipe, lm.model), log_path=log,
                  progress=False)
        rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]
    first = rows[0]
    timed_s = rows[-1]["train_seconds"] - first["train_seconds"]
    timed_tokens = rows[-1]["tokens"] - first["tokens"]
    return {"seconds_per_step": round(timed_s / steps, 3), "tokens_per_second": round(timed_tokens / timed_s, 1),
            "losses": [r["loss"] for r in rows], "final_loss": o.final_loss, "load_1min": os.getloadavg()[0]}


def trainer_run(method: str, steps: int, bf16: bool) -> dict:
    """The same steps through transformers' Trainer (the anchor): same examples, trainable parameters,
    optimiser, learning rate, schedule and clipping; its own shuffle, collator and full-vocabulary loss."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from editdecay.core.models import load_model
    from editdecay.finetune.trainable import prepare_model, resolve_plan

    lm = load_model("smollm2-135m")
    recipe = _recipe(method, steps + 1)
    data = _data(lm.tokenizer, recipe)
    model = prepare_model(lm.model, recipe, resolve_plan(recipe, lm.model))
    ds = Dataset.from_dict({"input_ids": [list(e.input_ids) for e in data.examples],
                            "labels": [list(e.labels) for e in data.examples],
                            "attention_mask": [[1] * len(e.input_ids) for e in data.examples]})
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())
            tokens.append(state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())
            tokens.append(state.num_input_tokens_seen)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=recipe.batch_size, max_steps=steps + 1,
            learning_rate=recipe.learning_rate, lr_scheduler_type=recipe.lr_scheduler, warmup_steps=0,
            weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm, use_cpu=True, bf16=bf16,
            report_to=[], save_strategy="no", logging_steps=1, seed=recipe.seed, dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          data_collator=DataCollatorForSeq2Seq(lm.tokenizer, padding=True), callbacks=[Clock()])
        trainer.train()
    # times: begin/end per step; drop step 1. The token counter is updated before on_step_begin's next call.
    timed_s = sum(times[i + 1] - times[i] for i in range(2, len(times) - 1, 2))
    timed_tokens = tokens[-1] - tokens[2]
    return {"seconds_per_step": round(timed_s / steps, 3), "tokens_per_second": round(timed_tokens / timed_s, 1),
            "load_1min": os.getloadavg()[0]}


def curve_check(fp32: list[float], bf16: list[float], tolerance: float) -> dict:
    half = len(fp32) // 2
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    late = sum(diffs[half:]) / max(len(diffs) - half, 1)
    late_ref = sum(fp32[half:]) / max(len(fp32) - half, 1)
    return {"steps": len(fp32), "max_abs_diff": round(max(diffs), 4), "late_mean_abs_diff": round(late, 4),
            "late_mean_loss_float32": round(late_ref, 4), "relative": round(late / late_ref, 4),
            "tolerance": tolerance, "passes": late / late_ref <= tolerance}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="lora,dora,full")
    ap.add_argument("--settings", default=",".join(SETTINGS) + ",trainer",
                    help=f"comma list of {', '.join(SETTINGS)}, trainer, trainer-bf16; 'none' for no throughput runs")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--curve", default="", help="methods whose float32 and bfloat16 loss curves are compared")
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {"threads": torch.get_num_threads(), "load_1min_start": os.getloadavg()[0], "throughput": {}, "curve": {}}
    settings = [] if args.settings == "none" else args.settings.split(",")
    for method in args.methods.split(","):
        for setting in settings:
            if setting.startswith("trainer"):
                r = trainer_run(method, args.steps, bf16=setting.endswith("bf16"))
            else:
                r = editdecay_run(method, args.steps, SETTINGS[setting])
                r.pop("losses")
            out["throughput"][f"{method}/{setting}"] = r
            print(method, setting, r, flush=True)
    for method in filter(None, args.curve.split(",")):
        fp32 = editdecay_run(method, args.curve_steps - 1, {})["losses"]
        bf16 = editdecay_run(method, args.curve_steps - 1, {"dtype": "bfloat16"})["losses"]
        out["curve"][method] = {**curve_check(fp32, bf16, args.tolerance), "float32": fp32, "bfloat16": bf16}
        print(method, "curve", {k: v for k, v in out["curve"][method].items() if k not in ("float32", "bfloat16")},
              flush=True)
    out["load_1min_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
