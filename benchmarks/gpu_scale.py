"""Issue 13 figures at the study's scale: one command on one H100/H200, about 6-8 minutes.

Run on the GPU machine from the repository root (no network, no checkpoints needed):

    PYTHONPATH=src python benchmarks/gpu_scale.py --preset h200 --out $OUT/gpu_scale.json

It needs torch (with CUDA), transformers, tokenizers, peft and what editdecay's edit and
fine-tuning code imports: pydantic, tqdm, safetensors, filelock, platformdirs, numpy
(`pip install -e .` installs all of them; the script names any that is missing). On the
CPU, `--preset tiny` runs the same code paths in well under a minute (tests/benchmarks/test_gpu_scale.py):

    PYTHONPATH=src python benchmarks/gpu_scale.py --preset tiny --out /tmp/gpu_scale.json

Models have random weights built from a LlamaConfig (no download); the tokenizer is a
word-level one built in code ("w0" ... "wN", one token per word, a BOS token), and the
edit requests are word strings of it. Sections, each written to the JSON as soon as it
is done (a run cut short keeps what it measured):

  stats      (a) E1 statistics tokens/s for 5 layers (`accumulate_second_moments`: one
             truncated pass, float32 moments), with TF32 matmuls and with plain FP32.
  memit      (b) MEMIT on `n_requests` synthetic requests through `EditingRun.edit_batch`:
             seconds per phase (context, targets, keys, solve) and peak GPU memory;
             statistics come from the stats section (as from the cache in a real run).
  train      (d) training tokens/s (steps after warm-up) of full, LoRA r=32 and DoRA r=32
             fine-tuning at a 1B Llama shape, batch 8 x 512, bfloat16 autocast
             (`finetune.train.train`).
  alphaedit  (b) the same for AlphaEdit. A real run reads the null-space projectors from
             the statistics cache; here one projector serves every edited layer (the
             solve's cost does not depend on P's values): on the GPU presets a random
             rank-d_k/2 projector (`--projector eigh` computes the real one of the first
             layer, about a minute in float64 at d_k = 14336), on `tiny` the real one.
  scale      (c) MEMIT on `n_scale` requests with one E3 optimisation step, so context,
             keys, solves and peak memory at that n are measured; the E3 time at the full
             step count is extrapolated from the memit section's E3 seconds per request
             (batches of a fixed size: cost linear in n; random weights never stop
             early). If the time left is too short for n_scale, it runs the largest
             multiple of 500 requests that fits and scales keys and solve linearly; the
             basis is written next to the figures ("extrapolated").

  adaptive   (e) adaptive E1 statistics at the edit shape (`edit.stats_adaptive`): doubling token counts
             until MEMIT's solve on the keys of 100 synthetic requests changes by less than the default
             tolerance where it acts (`EditProbe`); the tokens needed and the seconds, against the cap.
  fullft     (f) full fine-tuning of the edit-shape model itself (8B on the GPU presets) with the single-GPU
             option the memory plan chose: bfloat16 weights, 8-bit AdamW with stochastic rounding (torchao),
             gradient checkpointing, micro-batch 4 x 1024 tokens (the study's batch 16 as 4 x grad_accum 4);
             tokens/s and peak memory. It trains the editing model itself (a second 8B copy would not fit
             beside it), before `scale`, which shrinks to the time left (random weights: the editing costs do
             not depend on them). Without torchao it falls back to float32 master weights (which the plan
             says do not fit 80 GB at 8B) and says so.

Every measured peak has the memory plan's prediction beside it (`plan_gib`, `core.memory_plan`, from the
model's config and the section's sizes) and their relative error.

Before each section the script projects its time from what it has measured; one that
would not end within `--budget-s` (420 s on the GPU presets) is skipped and the JSON
says why (the scale section shrinks instead). Exceptions are recorded under "errors" and
the other sections still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

NEEDED = ("torch", "transformers", "tokenizers", "peft", "pydantic", "tqdm", "safetensors", "filelock",
          "platformdirs", "numpy")


def _check_imports() -> None:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(f"gpu_scale.py: missing Python packages {missing}; pip install them (or `pip install -e .`)")
    try:
        importlib.import_module("editdecay")
    except ImportError:
        sys.exit("gpu_scale.py: editdecay is not importable; run from the repository root with PYTHONPATH=src")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int              # also the word-level tokenizer's size
    max_positions: int
    tie_embeddings: bool = False


LLAMA3_8B = Shape(4096, 14336, 32, 32, 8, 128256, 8192)
LLAMA32_1B = Shape(2048, 8192, 16, 32, 8, 128256, 8192, tie_embeddings=True)


@dataclass(frozen=True)
class Preset:
    device: str
    dtype: str                       # model weights of the editing model
    edit_shape: Shape
    edit_layers: tuple[int, ...]
    stats_tokens: int                # per stats measurement (TF32 and FP32 each)
    stats_seq_len: int
    stats_batch: int
    n_requests: int                  # (b)
    n_scale: int                     # (c)
    v_num_grad_steps: int
    n_context_templates: int
    context_length: int
    train_shape: Shape
    train_batch: int
    train_seq_len: int
    train_warmup_steps: int
    train_steps: int                 # timed steps after warm-up
    budget_s: float
    projector: str = "eigh"          # E5 projector: "eigh" of C (null_space_projector) | "random" rank-d_k/2
    adaptive_max_tokens: int = 2 ** 19
    fullft_batch: int = 4
    fullft_seq_len: int = 1024
    fullft_steps: int = 3            # timed steps after one warm-up step
    extra: dict = field(default_factory=dict)


PRESETS = {
    "h200": Preset(device="cuda", dtype="bfloat16", edit_shape=LLAMA3_8B, edit_layers=(4, 5, 6, 7, 8),
                   stats_tokens=2 ** 18, stats_seq_len=1024, stats_batch=16, n_requests=1000, n_scale=10_000,
                   v_num_grad_steps=25, n_context_templates=5, context_length=10, train_shape=LLAMA32_1B,
                   train_batch=8, train_seq_len=512, train_warmup_steps=2, train_steps=8, budget_s=420.0,
                   projector="random", extra={"train_estimate_s": 60.0, "fullft_estimate_s": 90.0,
                                              "adaptive_estimate_s": 60.0}),
    "tiny": Preset(device="cpu", dtype="float32",
                   edit_shape=Shape(64, 128, 6, 4, 2, 2000, 256), edit_layers=(1, 2, 3, 4, 5),
                   stats_tokens=2048, stats_seq_len=64, stats_batch=4, n_requests=12, n_scale=120,
                   v_num_grad_steps=3, n_context_templates=2, context_length=4,
                   train_shape=Shape(64, 128, 4, 4, 2, 2000, 256, tie_embeddings=True),
                   train_batch=2, train_seq_len=32, train_warmup_steps=1, train_steps=2, budget_s=120.0,
                   adaptive_max_tokens=2 ** 13, fullft_batch=2, fullft_seq_len=32, fullft_steps=2),
}
PRESETS["h100"] = PRESETS["h200"]

# fullft before scale: scale shrinks itself to the time left, and fullft's change of the weights does not matter
# to the editing sections' costs (random weights either way).
SECTIONS = ("stats", "memit", "train", "alphaedit", "adaptive", "fullft", "scale")


# --------------------------------------------------------------------------- building blocks

def word_tokenizer(vocab: int):
    """A word-level fast tokenizer: <pad> <s> </s> [UNK] then "w0" ... so that len(tokenizer) == vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    words.update({f"w{i}": i + 4 for i in range(vocab - 4)})
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="[UNK]")
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def random_llama(shape: Shape, dtype, device, seed: int = 0):
    """A LlamaForCausalLM with random weights, built directly on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=shape.max_positions, rope_theta=500000.0,
                      tie_word_embeddings=shape.tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)           # built in `dtype` directly (no float32 copy of 8B weights)
    except (TypeError, RuntimeError):            # a torch that only takes float32/float64 here
        pass
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


def loaded(model, tok, name: str):
    """LoadedModel without the weight fingerprint (hashing 16 GB of random weights measures nothing)."""
    from editdecay.core.models import LoadedModel, ModelIdentity

    ident = ModelIdentity(name=name, source="random weights (LlamaConfig)", model_type="llama", family="llama",
                          n_layers=model.config.num_hidden_layers, fingerprint=f"random-{name}",
                          dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    return LoadedModel(model, tok, ident)


def synthetic_requests(n: int, vocab: int, seed: int = 0):
    """CounterFact-shaped requests of word tokens: a 1-3 word subject, a 2-5 word prompt tail, 1-2 word targets."""
    from editdecay.core.request import EditRequest

    rng = random.Random(seed)
    w = lambda k: " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(k))   # noqa: E731
    return [EditRequest(f"syn{i}", "{} " + w(rng.randint(2, 5)), w(rng.randint(1, 3)), w(rng.randint(1, 2)),
                        w(rng.randint(1, 2))) for i in range(n)]


class Clock:
    """Wall time, with the device synchronised, and the peak allocated GPU memory since `reset`."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def _gib(x):
    return None if x is None else round(x / 2 ** 30, 3)


# --------------------------------------------------------------------------- sections

def section_stats(p: Preset, ctx: dict) -> dict:
    """(a) E1 tokens/s for the edited layers: TF32 and FP32 float32 moments."""
    import torch

    from editdecay.edit.stats import accumulate_second_moments

    lm, clock = ctx["lm"], ctx["clock"]
    gen = torch.Generator().manual_seed(1)
    n_seq = max(1, p.stats_tokens // p.stats_seq_len)
    chunks = torch.randint(4, p.edit_shape.vocab, (n_seq, p.stats_seq_len), generator=gen).tolist()
    out = {"layers": list(p.edit_layers), "tokens": n_seq * p.stats_seq_len, "seq_len": p.stats_seq_len,
           "batch_sequences": p.stats_batch, "moment_dtype": "float32", "model_dtype": p.dtype}
    sums = None
    for mode in ("tf32", "fp32"):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        accumulate_second_moments(lm, p.edit_layers, chunks[:p.stats_batch], batch_size=p.stats_batch,
                                  progress=False)                                   # warm-up batch
        clock.reset()
        t0 = clock.now()
        sums, n = accumulate_second_moments(lm, p.edit_layers, chunks, batch_size=p.stats_batch, progress=False)
        sec = clock.now() - t0
        from editdecay.core.memory_plan import EditSetting

        out[mode] = {"seconds": round(sec, 3), "tokens_per_s": round(n / sec, 1), "tokens_used": n,
                     "peak_gib": _gib(clock.peak()),
                     **_plan("statistics", lm.model, clock.peak(), edit=EditSetting(
                         layers=p.edit_layers, stats_batch=p.stats_batch, stats_seq_len=p.stats_seq_len))}
    torch.backends.cuda.matmul.allow_tf32 = False
    out["tokens_per_s"] = out["tf32"]["tokens_per_s"]
    ctx["stats"] = layer_stats(ctx["lm"], {l: (sums[l] / out["fp32"]["tokens_used"]).float().cpu()
                                           for l in p.edit_layers}, out["fp32"]["tokens_used"])
    return out


def layer_stats(lm, moments: dict, n_tokens: int):
    """The measured C_l as the `LayerStats` an editor is built from (as a real run reads them from the cache)."""
    from editdecay.core.arch import arch_for, resolve_name
    from editdecay.edit.stats import LayerStats, StatsKey

    spec = arch_for(lm.model)
    keys = {l: StatsKey(model=lm.identity.fingerprint, family=spec.family, layer=l,
                        module=resolve_name(lm.model, spec.mlp_out_name(l)), corpus="random-tokens",
                        n_tokens=n_tokens, dtype="float32") for l in moments}
    return LayerStats(moments, n_tokens, keys, {"corpus": "random tokens"})


def _edit(p: Preset, ctx: dict, editor: str, requests, steps: int) -> dict:
    """One `EditingRun.edit_batch` over all `requests`; seconds per phase, peak memory, batches built."""
    from editdecay.core.memory import record_batches
    from editdecay.edit.registry import editor_class, make_config

    lm, clock = ctx["lm"], ctx["clock"]
    cfg = make_config(editor, layers=p.edit_layers, v_num_grad_steps=steps, n_context_templates=p.n_context_templates,
                      context_length=p.context_length)
    built = editor_class(editor)(cfg, ctx["stats"], None)     # statistics (and derived tensors) as measured above
    clock.reset()
    t0 = clock.now()
    run = built.start(lm, progress=False)
    with record_batches() as seen:
        run.edit_batch(list(requests))
    total = clock.now() - t0
    peak = clock.peak()
    run.restore()
    phases = {k: round(v, 6) for k, v in run.timer.seconds.items()}
    for phase in ("context", "targets", "keys", "solve"):
        if phase not in phases:
            raise RuntimeError(f"{editor}: phase {phase!r} did not run (timer has {sorted(phases)})")
    from editdecay.core.memory_plan import EditSetting, ModelDims, stage_memory

    setting = EditSetting.from_requests(lm.tokenizer, list(requests), run.templates, layers=p.edit_layers,
                                        target_batch=seen["E3 targets"].items if "E3 targets" in seen else 128)
    dims = ModelDims.of_model(lm.model)
    pred = {st: stage_memory(dims, st, edit=setting).peak for st in ("targets", "keys", "solve")}
    plan = {"plan_gib": _gib(max(pred.values())), "plan_stages_gib": {k: _gib(v) for k, v in pred.items()},
            "plan_error": round((max(pred.values()) - peak) / peak, 4) if peak else None}
    return {**plan, "editor": editor, "n_requests": len(requests), "v_num_grad_steps": steps,
            "context_templates": 1 + p.n_context_templates, "layers": list(p.edit_layers),
            "seconds": round(total, 3), "phase_seconds": phases, "peak_gib": _gib(peak),
            "seconds_per_edit": round(total / len(requests), 4),
            "mean_target_steps": run.target_log[-1]["mean_steps"],
            "batches": {k: asdict(v) for k, v in seen.items()}}


def section_memit(p: Preset, ctx: dict) -> dict:
    return _edit(p, ctx, "memit", ctx["requests"][:p.n_requests], p.v_num_grad_steps)


def section_alphaedit(p: Preset, ctx: dict) -> dict:
    import torch

    from editdecay.edit.registry import make_config
    from editdecay.edit.stats import null_space_projector

    clock, stats = ctx["clock"], ctx["stats"]
    threshold = make_config("alphaedit", layers=p.edit_layers).nullspace_threshold
    first = p.edit_layers[0]
    t0 = clock.now()
    C = stats[first].to(p.device)
    if p.projector == "eigh":
        P = null_space_projector(C, threshold).cpu()
        how = f"the E5 projector of layer {first}'s statistics (eigh, threshold {threshold:g})"
    else:   # a float64 eigh of a 14336 x 14336 matrix takes about a minute; P comes from the cache in real runs
        gen = torch.Generator(device="cpu").manual_seed(4)
        basis = torch.randn(C.shape[0], C.shape[0] // 2, generator=gen, dtype=torch.float64).to(p.device)
        Q = torch.linalg.qr(basis).Q
        P = (Q @ Q.T).float().cpu()
        how = "a random orthogonal projector of rank d_k/2 (not timed as E5's eigh)"
    proj_s = clock.now() - t0
    for l in p.edit_layers:        # what the editor reads before any cache (edit/stats.py `cached_projector`)
        stats.derived[("nullspace", l, float(threshold))] = P
    out = _edit(p, ctx, "alphaedit", ctx["requests"][:p.n_requests], p.v_num_grad_steps)
    out["projector"] = {"kind": p.projector, "seconds_one_layer": round(proj_s, 3),
                        "rank": int(round(float(P.diagonal().sum()))), "d_k": int(P.shape[0]),
                        "note": f"{how}, used for layers {list(p.edit_layers)}: the solve's cost does not depend on "
                                f"P's values; real runs read P from the statistics cache"}
    return out


def section_scale(p: Preset, ctx: dict) -> dict:
    """(c) MEMIT at n_scale requests with one E3 step, or at the largest n that fits the time left; the rest
    extrapolated linearly with the basis stated."""
    memit = ctx["results"].get("memit")
    if memit is None:
        raise RuntimeError("the scale section needs the memit section's figures (run both)")
    ph1, n1 = memit["phase_seconds"], memit["n_requests"]
    per_req = {k: ph1[k] / n1 for k in ("targets", "keys", "solve")}
    n = p.n_scale
    guess = projected_seconds("scale", p, ctx["results"])
    left = ctx["left"]()
    if guess is not None and guess > left:
        n = int(p.n_scale * 0.8 * left / guess) // 500 * 500
    out: dict = {"n_target": p.n_scale}
    if n >= 2 * n1:
        out.update(_edit(p, ctx, "memit", ctx["requests"][:n], 1))
        ph = out["phase_seconds"]
        k = p.n_scale / n
        measured = (f"context measured; keys and solve measured at n={n} (E3 run with 1 step)"
                    + ("" if n == p.n_scale else f", scaled x{k:.2f} to n={p.n_scale}"))
        keys, solve = ph["keys"] * k, ph["solve"] * k
    else:
        out["note"] = f"not run: {left:.0f} s left, projected {guess or 0:.0f} s; every phase extrapolated"
        ph, keys, solve = ph1, per_req["keys"] * p.n_scale, per_req["solve"] * p.n_scale
        measured = f"keys and solve: the memit section's seconds per request ({n1} requests) x {p.n_scale}"
    targets = per_req["targets"] * p.n_scale
    out["extrapolated"] = {
        # 4 decimals, not 1: on the tiny preset a phase can take under 0.05 s, and a figure rounded to 0.0
        # would read as "did not run".
        "n": p.n_scale, "targets_seconds": round(targets, 4), "keys_seconds": round(keys, 4),
        "solve_seconds": round(solve, 4), "total_seconds": round(ph["context"] + targets + keys + solve, 4),
        "basis": f"E3 at {p.v_num_grad_steps} steps: the memit section's E3 seconds per request "
                 f"({per_req['targets']:.4f} s over {n1} requests) x {p.n_scale} (E3 runs in batches of a size "
                 f"set by free memory, so its cost is linear in n; random weights never stop early); {measured}. "
                 f"Device memory: batches do not grow with n (see 'batches'); the solve holds the d_k x d_k "
                 f"system plus a key-column block."}
    return out


def section_train(p: Preset, ctx: dict) -> dict:
    import torch

    from editdecay.data.instructions import Example, TrainingSet
    from editdecay.finetune.recipe import Recipe
    from editdecay.finetune.train import train
    from editdecay.finetune.trainable import resolve_plan

    clock, tok = ctx["clock"], ctx["train_tok"]
    gen = torch.Generator().manual_seed(2)
    n_ex = p.train_batch * (p.train_warmup_steps + p.train_steps)
    ids = torch.randint(4, p.train_shape.vocab, (n_ex, p.train_seq_len), generator=gen).tolist()
    data = TrainingSet(tuple(Example(tuple(x), tuple(x)) for x in ids), {"name": "random tokens"})
    out = {"shape": asdict(p.train_shape), "batch": p.train_batch, "seq_len": p.train_seq_len,
           "autocast": "bfloat16", "weights": "float32", "warmup_steps": p.train_warmup_steps,
           "timed_steps": p.train_steps}
    for method in ("full", "lora", "dora"):
        model = random_llama(p.train_shape, torch.float32, p.device, seed=3)
        recipe = Recipe(method=method, layers="all", targets="all-linear", lora_r=32, lora_alpha=64.0,
                        learning_rate=1e-5, max_steps=p.train_warmup_steps + p.train_steps,
                        batch_size=p.train_batch, cutoff_len=p.train_seq_len, dtype="bfloat16",
                        train_on_prompt=True, lora_dropout=0.0)
        log = ctx["tmp"] / f"train-{method}.jsonl"
        from editdecay.core.memory_plan import ModelDims
        from editdecay.grid.memory import train_setting

        setting = train_setting(recipe, ModelDims.of_model(model), model=model,
                                           labelled_tokens=p.train_seq_len)
        clock.reset()
        outcome = train(model, tok, recipe, data, plan=resolve_plan(recipe, model), log_path=log, progress=False)
        steps = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line]
        w = steps[p.train_warmup_steps - 1] if p.train_warmup_steps else {"tokens": 0, "train_seconds": 0.0}
        last = steps[-1]
        sec = last["train_seconds"] - w["train_seconds"]
        out[method] = {"tokens_per_s": round((last["tokens"] - w["tokens"]) / sec, 1) if sec > 0 else None,
                       "timed_seconds": round(sec, 3), "n_trainable": outcome.n_trainable,
                       "steps": outcome.steps, "final_loss": outcome.final_loss, "peak_gib": _gib(clock.peak()),
                       **_plan("training", random_llama(p.train_shape, torch.float32, "meta"), clock.peak(),
                               train=setting)}
        del model, outcome
        if p.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def _plan(stage: str, model, measured_bytes, *, edit=None, train=None) -> dict:
    """The memory plan's prediction for a stage next to the measured peak (None on the CPU)."""
    from editdecay.core.memory_plan import ModelDims, stage_memory

    pred = stage_memory(ModelDims.of_model(model), stage, edit=edit, train=train).peak
    err = None if not measured_bytes else round((pred - measured_bytes) / measured_bytes, 4)
    return {"plan_gib": _gib(pred), "plan_error": err}


def section_adaptive(p: Preset, ctx: dict) -> dict:
    """(e) Tokens adaptive E1 needs at the edit shape (random weights, random tokens)."""
    import torch

    from editdecay.data.corpus import CorpusSpec
    from editdecay.edit.context import ContextTemplates
    from editdecay.edit.keys import compute_keys
    from editdecay.edit.stats_adaptive import DEFAULT_TOLERANCE, adaptive_second_moments, memit_probe

    lm, clock = ctx["lm"], ctx["clock"]
    words = ["w5", "w6", "w7", "w8", "w9"][:p.n_context_templates]
    templates = ContextTemplates.of(["{}"], [f"{' '.join([w] * p.context_length)}. {{}}" for w in words])
    keys = compute_keys(lm.model, lm.tokenizer, ctx["requests"][:100], list(p.edit_layers), templates)
    corpus_path = ctx["tmp"] / "random_tokens.jsonl"
    gen = torch.Generator().manual_seed(7)
    n_seq = p.adaptive_max_tokens // p.stats_seq_len + 1
    with open(corpus_path, "w") as f:
        for row in torch.randint(4, p.edit_shape.vocab, (n_seq, p.stats_seq_len), generator=gen).tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    corpus = CorpusSpec(kind="file", source=str(corpus_path), seq_len=p.stats_seq_len)
    clock.reset()
    t0 = clock.now()
    st = adaptive_second_moments(lm, p.edit_layers, corpus=corpus, probe=memit_probe(keys, 15000.0, p.device),
                                 tolerance=DEFAULT_TOLERANCE, max_tokens=p.adaptive_max_tokens,
                                 batch_size=p.stats_batch, progress=False)
    sec = clock.now() - t0
    peak = clock.peak()
    ad = st.provenance["adaptive"]
    from editdecay.core.memory_plan import EditSetting

    plan = _plan("statistics", lm.model, peak, edit=EditSetting(layers=p.edit_layers, stats_batch=p.stats_batch,
                                                                stats_seq_len=p.stats_seq_len, stats_adaptive=True))
    return {**plan, "tolerance": ad["tolerance"], "stopped": ad["stopped"], "tokens_used": ad["tokens_used"],
            "tokens_cap": p.adaptive_max_tokens, "seconds": round(sec, 3), "checkpoints": ad["checkpoints"],
            "peak_gib": _gib(peak), "note": "random weights and random tokens: the tokens a trained model "
            "needs on text can differ; the mechanics and the cost per checkpoint are what this measures"}


def section_fullft(p: Preset, ctx: dict) -> dict:
    """(f) Full fine-tuning of the edit-shape model with the single-GPU option of the memory plan."""
    import importlib.util

    import torch

    from editdecay.core.memory_plan import ModelDims
    from editdecay.data.instructions import Example, TrainingSet
    from editdecay.finetune.recipe import Recipe
    from editdecay.finetune.train import train
    from editdecay.finetune.trainable import resolve_plan
    from editdecay.grid.memory import train_setting

    lm, clock = ctx["lm"], ctx["clock"]
    model = lm.model
    eight_bit = importlib.util.find_spec("torchao") is not None
    gen = torch.Generator().manual_seed(5)
    steps = 1 + p.fullft_steps
    ids = torch.randint(4, p.edit_shape.vocab, (p.fullft_batch * steps, p.fullft_seq_len), generator=gen).tolist()
    data = TrainingSet(tuple(Example(tuple(x), tuple(x)) for x in ids), {"name": "random tokens"})
    recipe = Recipe(method="full", targets="all", learning_rate=5e-6, max_steps=steps, batch_size=p.fullft_batch,
                    cutoff_len=p.fullft_seq_len, dtype="bfloat16", train_on_prompt=True, warmup_steps=0,
                    gradient_checkpointing=True, optimizer="adamw8bit" if eight_bit else "adamw")
    setting = train_setting(recipe, ModelDims.of_model(model), model=model,
                                       labelled_tokens=p.fullft_seq_len)
    log = ctx["tmp"] / "fullft.jsonl"
    clock.reset()
    outcome = train(model, lm.tokenizer, recipe, data, plan=resolve_plan(recipe, model), log_path=log,
                    progress=False)
    peak = clock.peak()
    # Hand the model back as the editing sections expect it: no checkpointing (E3 runs a KV cache), eval mode.
    model.gradient_checkpointing_disable()
    model.eval().requires_grad_(False)
    del outcome.model
    if p.device.startswith("cuda"):
        torch.cuda.empty_cache()
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line]
    sec = rows[-1]["train_seconds"] - rows[0]["train_seconds"]
    return {"option": "bf16 weights + 8-bit AdamW (torchao, stochastic rounding)" if eight_bit else
            "bf16 weights + float32 master weights (torchao not installed)",
            "precision": outcome.precision, "micro_batch": p.fullft_batch, "seq_len": p.fullft_seq_len,
            "gradient_checkpointing": True, "timed_steps": p.fullft_steps,
            "tokens_per_s": round((rows[-1]["tokens"] - rows[0]["tokens"]) / sec, 1) if sec > 0 else None,
            "n_trainable": outcome.n_trainable, "final_loss": outcome.final_loss, "peak_gib": _gib(peak),
            **_plan("training", model, peak, train=setting)}


RUNNERS = {"stats": section_stats, "memit": section_memit, "alphaedit": section_alphaedit, "scale": section_scale,
           "train": section_train, "adaptive": section_adaptive, "fullft": section_fullft}


def projected_seconds(name: str, p: Preset, results: dict) -> float | None:
    """A section's time projected from what ran before it (None: no basis yet, run it)."""
    memit = results.get("memit")
    if name == "train":
        return p.extra.get("train_estimate_s")
    if name in ("fullft", "adaptive"):
        return p.extra.get(f"{name}_estimate_s")
    if name == "alphaedit" and memit:
        return memit["seconds"] * 1.2
    if name == "scale" and memit:
        ph, k = memit["phase_seconds"], p.n_scale / memit["n_requests"]
        return ph["context"] + k * (ph["targets"] / memit["v_num_grad_steps"] * 2 + ph["keys"] + ph["solve"])
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--budget-s", type=float, default=None, help="skip sections projected to end later than this")
    ap.add_argument("--n-requests", type=int, default=None, help="override (b)'s request count")
    ap.add_argument("--n-scale", type=int, default=None, help="override (c)'s request count")
    ap.add_argument("--projector", choices=("eigh", "random"), default=None,
                    help="AlphaEdit's projector: eigh of C (about a minute at d_k=14336) or a random one (default "
                         "on the GPU presets: the solve's cost does not depend on P)")
    args = ap.parse_args(argv)
    _check_imports()
    import tempfile

    import torch

    from editdecay.core.results import environment

    p = PRESETS[args.preset]
    p = replace(p, n_requests=args.n_requests or p.n_requests, n_scale=args.n_scale or p.n_scale,
                budget_s=args.budget_s or p.budget_s, projector=args.projector or p.projector)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
    if p.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"preset {args.preset!r} needs a CUDA device; use --preset tiny on the CPU")
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[p.dtype]
    report = {"kind": "gpu_scale", "preset": args.preset, "settings": {**asdict(p), "sections": sections},
              "device": torch.cuda.get_device_name(0) if p.device.startswith("cuda") else "cpu",
              "environment": environment(p.device), "results": {}, "skipped": {}, "errors": {}}

    def write() -> None:
        report["wall_seconds"] = round(time.perf_counter() - start, 1)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(args.out)

    clock = Clock(p.device)
    t0 = time.perf_counter()
    tok = word_tokenizer(p.edit_shape.vocab)
    model = random_llama(p.edit_shape, dtype, p.device)
    report["build_seconds"] = round(time.perf_counter() - t0, 2)
    ctx = {"lm": loaded(model, tok, f"random-llama-{p.edit_shape.hidden}"), "clock": clock,
           "requests": synthetic_requests(max(p.n_requests, p.n_scale), p.edit_shape.vocab),
           "train_tok": tok if p.train_shape.vocab == p.edit_shape.vocab else word_tokenizer(p.train_shape.vocab),
           "results": report["results"], "tmp": Path(tempfile.mkdtemp(prefix="gpu_scale-")),
           "left": lambda: p.budget_s - (time.perf_counter() - start)}
    write()
    for name in sections:
        if name in ("memit", "alphaedit", "scale") and "stats" not in ctx:
            report["skipped"][name] = "needs the stats section (its moments are the editors' statistics)"
            write()
            continue
        left = p.budget_s - (time.perf_counter() - start)
        guess = projected_seconds(name, p, report["results"])
        if guess is not None and guess > left and name != "scale":     # scale shrinks itself to fit
            report["skipped"][name] = f"projected {guess:.0f} s > {left:.0f} s left of the {p.budget_s:.0f} s budget"
            write()
            continue
        t = time.perf_counter()
        try:
            report["results"][name] = RUNNERS[name](p, ctx)
            report["results"][name]["section_seconds"] = round(time.perf_counter() - t, 2)
        except Exception as e:                   # noqa: BLE001 -- recorded; the other sections still run
            report["errors"][name] = f"{type(e).__name__}: {e}"
            if p.device.startswith("cuda"):
                torch.cuda.empty_cache()
        write()
    report["goals"] = goals(report["results"], p.device.startswith("cuda"))
    report["model_gib"] = _gib(sum(t.numel() * t.element_size() for t in model.parameters()))
    report["notes"] = {"plan_gib": "the memory plan's prediction (core.memory_plan) for the same sizes; "
                                   "plan_error = (plan - peak) / peak",
                       "peak_gib": "torch.cuda.max_memory_allocated over the section, model weights included "
                                   "(model_gib); null on the CPU"}
    write()
    print(json.dumps({k: report[k] for k in ("device", "wall_seconds", "skipped", "errors", "goals")}, indent=1))
    return report


def goals(results: dict, gpu: bool) -> dict:
    """Issue 13's targets next to the measured values (n: the requests they were measured on). `met` is None
    where nothing was measured, and on the CPU (the goals are for one H100/H200 at the 8B shape)."""
    stats, memit, scale = results.get("stats", {}), results.get("memit", {}), results.get("scale", {})
    ex = scale.get("extrapolated", {})

    def goal(value, limit, better, n=None):
        met = None if value is None or not gpu else (value >= limit if better == "higher" else value <= limit)
        return {"value": value, "goal": f"{'>=' if better == 'higher' else '<='} {limit}", "met": met, "n": n}

    return {
        "stats_tokens_per_s_5_layers": goal(stats.get("tokens_per_s"), 60_000, "higher"),
        "memit_1000_edits_seconds_statistics_cached": goal(memit.get("seconds"), 60, "lower", memit.get("n_requests")),
        "memit_10000_edits_seconds": goal(ex.get("total_seconds"), 600, "lower", ex.get("n")),
        "memit_10000_edits_peak_gib": goal(scale.get("peak_gib"), 80, "lower", scale.get("n_requests")),
    }


if __name__ == "__main__":
    main()
