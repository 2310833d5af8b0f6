"""The memory plan: the peak memory of every stage of an experiment, predicted from the model's config alone.

Before any weight is loaded, `plan_memory` answers: on a device of M bytes, do E1 statistics, E3 targets,
E2 keys, the E4/E5 solve, E6 evaluation and fine-tuning fit, and if not, which setting would make them fit?
Everything comes from `config.json` (a model built on the meta device gives the exact parameter count and
shapes, without allocating them), the editor setting and the fine-tuning recipe.

A stage's peak is `resident + transient`: what is held throughout (the model's weights; for training also
the optimiser state, master weights) and the most the stage adds at once. Each part is an explicit sum over
the tensors the code creates, named in `StageMemory.parts` (bytes):

- statistics (E1, `edit.stats.accumulate_second_moments`): one truncated no-grad forward of `stats_batch`
  sequences; the captured W_out inputs of every edited layer (B, T, d_ff), their masked float copies, and the
  (d_ff, d_ff) moment sums per layer.
- targets (E3, `edit.targets.compute_targets`): the prefix KV cache of every row (rows = requests x
  (templates + 1 KL row)), the suffix activations kept for the backward pass through the blocks after l*,
  and float32 log-probabilities (with gradients) over the vocabulary at the scored tokens.
- keys (E2, `edit.keys.compute_keys`): a truncated no-grad forward of 64 prompts on the CPU, the captured
  inputs of the edited layers.
- solve (E4/E5, `edit.solve`): the (d_ff, d_ff) system, its LU factor, the (d, d_ff) delta and one column
  block, in the solve dtype.
- evaluation (E6, `core.scoring.score_continuations`): a full no-grad forward of `eval_batch` pairs and the
  float32 log-softmax at their scored positions.
- training (`finetune.train.train`): weights; gradients and AdamW state of the trainable parameters (float32
  state, or 8-bit with `optimizer=adamw8bit`); float32 master weights (`master_weights`); the activations kept
  for the backward pass (every layer, or with gradient checkpointing each layer's input plus one layer
  recomputed); bfloat16 copies of float32 weights made by autocast; float32 logits with their gradients at
  the labelled positions. Sharded over N devices (FSDP) the weights, gradients and optimiser state divide by N.

The per-token activation factors (`ACT`) were measured on the embedded SmolLM2-135M and two tiny models
(benchmarks/memory_check.py; tests/core/test_memory_plan.py checks every stage within 25 %). The plan is a
prediction of tensor memory: allocator caches, the CUDA context (~0.5 GiB) and fragmentation are covered by
the `headroom` fraction of the device that the plan leaves free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from editdecay.core.errors import ConfigError, EditDecayError

GIB = 2 ** 30
HEADROOM = 0.10          # share of the device the plan keeps free (allocator cache, CUDA context, fragmentation)
STAGES = ("statistics", "targets", "keys", "solve", "evaluation", "training")
_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


class MemoryPlanError(EditDecayError):
    """A stage of the planned work cannot fit the device; raised before the model is loaded."""


def parse_memory(text: str | int | float) -> int:
    """'80GB', '80G', '141 GiB', '512MiB', '24e9' -> bytes. GB/MB are decimal (as cards are sold), GiB/MiB binary."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"memory: {text!r}; give a positive size such as 80GB")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if m is None:
        raise ConfigError(f"memory: {text!r} is not a size; write e.g. 80GB, 141GiB or 512MiB")
    value, unit = float(m.group(1)), (m.group(2) or "b")
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    base = 1024 if "i" in unit else 1000
    size = int(value * base ** power)
    if size <= 0:
        raise ConfigError(f"memory: {text!r}; give a positive size such as 80GB")
    return size


def fmt_gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2 ** 20:.1f} MiB"


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelDims:
    """Sizes the plan needs, from a transformers config (no weights): widths, depth, vocabulary, parameters."""

    name: str
    family: str
    d: int
    d_ff: int
    n_layers: int
    vocab: int
    heads: int
    kv_dim: int                  # keys (and values) per token per layer: kv_heads * head_dim
    gated: bool                  # a gated MLP (Llama: gate, up, down) or two matrices (GPT-2, GPT-J, NeoX)
    n_params: int                # unique parameters (tied embeddings once)
    block_params: int            # parameters of one transformer block
    embed_params: int            # input embedding (and an untied unembedding: `unembed_params`)
    unembed_params: int          # 0 when tied to the input embedding
    linear_shapes: tuple[tuple[str, int, int], ...] = ()   # (block-relative name, in, out) of a block's linears
    dtype: str = "float32"       # dtype the weights load in
    attention_dropout: float = 0.0   # dropout on attention probabilities in training (eager attention keeps a mask)

    @property
    def elt(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @classmethod
    def of_model(cls, model, name: str | None = None, dtype: str | None = None) -> "ModelDims":
        """Read the sizes off a built model (real or on the meta device)."""
        from editdecay.core.arch import ConfigSizes, arch_for, get_module, resolve_name, unwrap_peft

        model = unwrap_peft(model)
        c = model.config
        spec = arch_for(model)
        z = ConfigSizes.of(c)
        d, heads, head_dim, kv_heads, d_ff, n_layers = z.d, z.heads, z.head_dim, z.kv_heads, z.d_ff, z.n_layers
        seen, n_params = set(), 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n_params += p.numel()
        block = get_module(model, spec.block_name(0))
        block_params = sum(p.numel() for p in block.parameters())
        embed = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        untied = out is not None and out.weight is not embed
        shapes = []
        for rel in spec.attention + spec.mlp:
            try:
                m = get_module(model, resolve_name(model, spec.in_block(0, rel)))
            except ConfigError:
                continue
            w = m.weight
            i, o = (w.shape[0], w.shape[1]) if spec.conv1d else (w.shape[1], w.shape[0])
            shapes.append((resolve_name(block, rel), int(i), int(o)))
        if dtype is None:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return cls(name=name or getattr(c, "_name_or_path", "") or c.model_type, family=spec.family, d=d,
                   d_ff=d_ff, n_layers=n_layers, vocab=int(c.vocab_size), heads=heads, kv_dim=kv_heads * head_dim,
                   gated=len(spec.mlp) > 2, n_params=n_params, block_params=block_params,
                   embed_params=embed.numel(), unembed_params=out.weight.numel() if untied else 0,
                   linear_shapes=tuple(shapes), dtype=dtype if dtype in _DTYPE_BYTES else "float32",
                   attention_dropout=z.attention_dropout)

    @classmethod
    def from_config(cls, config, name: str | None = None, dtype: str = "float32") -> "ModelDims":
        """From a transformers `PretrainedConfig`: the model is built on the meta device (no memory)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.of_model(model, name=name, dtype=dtype)

    @classmethod
    def from_pretrained(cls, source: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                        revision: str | None = None) -> "ModelDims":
        """From a local model directory's config.json, the embedded model's name or a hub id (config only)."""
        from transformers import AutoConfig

        from editdecay.core.models import resolve_source

        path = resolve_source(source)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model {source!r}: its config cannot be read for the memory plan "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return cls.from_config(config, name=source, dtype=dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "d": self.d, "d_ff": self.d_ff, "layers": self.n_layers,
                "vocab": self.vocab, "parameters": self.n_params, "dtype": self.dtype}


# --------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class EditSetting:
    """Sizes of the editing stages: layers, requests, token lengths, batch sizes."""

    layers: tuple[int, ...]
    n_requests: int = 100
    templates: int = 6                 # rendered prompts per request (the bare prompt + context prefixes)
    prompt_tokens: int = 16            # longest prompt with the subject, without a context prefix
    prefix_tokens: int = 12            # longest context prefix ("<10 sampled tokens>. ")
    target_tokens: int = 4             # longest target
    mean_target_tokens: float = 2.0    # mean target length (scored positions add up over requests)
    stats_batch: int = 16
    stats_seq_len: int = 256
    stats_dtype: str = "float32"
    stats_adaptive: bool = False       # stats_tolerance set: the convergence probe holds float64 copies of C
    solve_dtype: str = "float64"
    target_batch: int = 128            # E3 requests per batch (the CPU default; memory-aware on CUDA)
    key_rows: int = 64                 # E2 prompts per forward (the CPU default)
    eval_batch: int = 32

    @classmethod
    def from_config(cls, cfg, n_requests: int, **sizes) -> "EditSetting":
        """From an `EditorConfig` (layers, templates, statistics and solve dtypes) and the number of edits.
        An editor of another family (FT-M, GRACE, MEND: no E1-E3 fields) is modelled with the locate-then-edit
        defaults of the fields it lacks: an approximation, not a model of its own backward passes."""
        n_templates = getattr(cfg, "n_context_templates", 0)
        return cls(layers=tuple(cfg.layers), n_requests=n_requests, templates=1 + n_templates,
                   prefix_tokens=getattr(cfg, "context_length", 0) + 3 if n_templates else 0,
                   stats_dtype=getattr(cfg, "stats_dtype", "float32"),
                   stats_adaptive=getattr(cfg, "stats_tolerance", None) is not None,
                   solve_dtype=getattr(cfg, "solve_dtype", "float64"),
                   target_batch=getattr(cfg, "target_batch_size", None) or 128, **sizes)

    @classmethod
    def from_requests(cls, tokenizer, requests, templates, *, layers, **sizes) -> "EditSetting":
        """Token lengths measured on the actual requests and context templates."""
        from editdecay.core.tokens import encode_prompt, encode_target

        flat = templates.flat
        longest_prompt = max(len(encode_prompt(tokenizer, r.prompt.replace("{}", r.subject))) for r in requests)
        longest_full = max(len(encode_prompt(tokenizer, t.replace("{}", r.prompt).replace("{}", r.subject)))
                           for r in requests for t in flat)
        lengths = [len(encode_target(tokenizer, r.target_new)) for r in requests]
        return cls(layers=tuple(layers), n_requests=len(requests), templates=len(flat), prompt_tokens=longest_prompt,
                   prefix_tokens=max(0, longest_full - longest_prompt), target_tokens=max(lengths),
                   mean_target_tokens=sum(lengths) / len(lengths), **sizes)


@dataclass(frozen=True)
class TrainSetting:
    """Sizes of one fine-tuning step: what trains, in which precision, on how many tokens."""

    micro_batch: int
    seq_len: int
    labelled_tokens: int               # positions per sequence that carry a loss (logits are formed there only)
    trainable: int                     # trainable parameters (adapters for LoRA/DoRA)
    frozen_trained_through: int = 0    # parameters of the frozen layers autocast copies (LoRA: the base weights)
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False        # recipe dtype bfloat16
    param_dtype: str = "float32"       # dtype of the trained weights during forward/backward
    master_weights: bool = False       # float32 master copies updated by the optimiser
    optimizer: str = "adamw"           # adamw | adamw8bit
    layers_trained: int = 0            # blocks whose activations a backward pass reaches
    devices: int = 1                   # FSDP shards of weights, gradients and optimiser state
    attention_matrices: int = 0        # bytes eager attention keeps for backward (finetune/attention.py), 0: sdpa

    @classmethod
    def from_recipe(cls, recipe, dims: ModelDims, *, trainable: tuple[int, int] | None = None,
                    seq_len: int | None = None, labelled_tokens: int | None = None,
                    devices: int = 1, attention_per_layer: int = 0) -> "TrainSetting":
        """From a `Recipe`. `trainable`: (trainable parameters, blocks a backward pass reaches) counted on a
        model (`grid.memory.trainable_on`, a real or meta-device model); else estimated from the shape (full:
        every parameter of the chosen layers; LoRA/DoRA: r (in + out) per targeted linear map).
        `attention_per_layer`: bytes of the attention matrices eager attention keeps per block a backward pass
        reaches (`grid.memory.train_setting` sets it where the trainer will run eager attention)."""
        T = seq_len or recipe.cutoff_len
        labelled = labelled_tokens if labelled_tokens is not None else (T if recipe.train_on_prompt else T // 2)
        n_trainable, layers = trainable or _trainable_from_shape(recipe, dims)
        master = _master(recipe, dims.dtype)
        return cls(micro_batch=recipe.batch_size, seq_len=T, labelled_tokens=labelled, trainable=n_trainable,
                   frozen_trained_through=0 if recipe.method == "full" else dims.n_params,
                   gradient_checkpointing=recipe.gradient_checkpointing, autocast_bf16=recipe.dtype == "bfloat16",
                   param_dtype=dims.dtype, master_weights=master, optimizer=recipe.optimizer,
                   layers_trained=layers, devices=devices, attention_matrices=attention_per_layer * layers)


def _master(recipe, weight_dtype: str) -> bool:
    """finetune.precision.needs_master, from the recipe and the weights' dtype alone."""
    if recipe.master_weights is None:
        return recipe.method == "full" and weight_dtype in ("bfloat16", "float16") and recipe.optimizer == "adamw"
    return bool(recipe.master_weights)


def _trainable_from_shape(recipe, dims: ModelDims) -> tuple[int, int]:
    """(trainable parameters, depth a backward pass reaches) of a recipe, from the shape alone."""
    first_layer = 0 if isinstance(recipe.layers, str) else min(recipe.layers)
    layers = dims.n_layers if recipe.layers in ("all", "edited", "non-edited") else len(recipe.layers)
    depth = dims.n_layers - first_layer
    if recipe.method == "full":
        outside = dims.embed_params + dims.unembed_params if recipe.layers == "all" and recipe.targets == "all" else 0
        return layers * dims.block_params + outside, depth
    per_block = sum(recipe.lora_r * (i + o) + (o if recipe.method == "dora" else 0)
                    for _, i, o in dims.linear_shapes)
    return layers * per_block, depth


# --------------------------------------------------------------------------- per-stage estimates


@dataclass(frozen=True)
class StageMemory:
    """Predicted peak of one stage: `resident` (held throughout) + the largest transient part sum."""

    stage: str
    resident: int
    parts: dict[str, int] = field(default_factory=dict)   # named contributions, bytes (resident ones included)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


# Activation bytes per token per block, in units of (d, d_ff) elements, measured (module docstring):
# no-grad forward (one block alive), and what a backward pass keeps per block.
ACT = {"forward": (2.0, 2.0), "saved": (10.0, 4.0), "saved_gpt": (12.0, 3.0), "saved_frozen": (6.0, 3.0)}


def _forward_tokens(dims: ModelDims, tokens: int, elt: int) -> int:
    cd, cf = ACT["forward"]
    return int(tokens * (cd * dims.d + cf * dims.d_ff) * elt)


def _saved_per_token(dims: ModelDims, elt: int, frozen: bool = False) -> int:
    """Bytes a backward pass keeps per token per block. `frozen`: the block's weights need no gradient (E3),
    so linear maps keep nothing and only non-linearities, norms and attention keep their inputs."""
    cd, cf = ACT["saved_frozen"] if frozen else ACT["saved"] if dims.gated else ACT["saved_gpt"]
    return int((cd * dims.d + cf * dims.d_ff) * elt)


def stage_memory(dims: ModelDims, stage: str, *, edit: EditSetting | None = None,
                 train: TrainSetting | None = None) -> StageMemory:
    """Predicted peak memory of one stage (see the module docstring for what each sums)."""
    e = dims.elt
    weights = dims.n_params * e
    if stage == "training":
        if train is None:
            raise ConfigError("memory plan: the training stage needs a TrainSetting (a recipe)")
        return _training(dims, train)
    if edit is None:
        raise ConfigError(f"memory plan: stage {stage!r} needs an EditSetting (an editor config)")
    S = len(edit.layers)
    if stage == "statistics":
        a = _DTYPE_BYTES[edit.stats_dtype]
        BT = edit.stats_batch * edit.stats_seq_len
        # adaptive E1 (edit/stats_adaptive.py): float64 C of every layer in the probe, and one system being solved
        probe = (S + 1) * dims.d_ff ** 2 * 8 if edit.stats_adaptive else 0
        return StageMemory(stage, weights, {
            **({"adaptive probe (float64 C)": probe} if probe else {}),
            "weights": weights,
            "moment sums": S * dims.d_ff ** 2 * a,
            "captured W_out inputs": S * BT * dims.d_ff * e,
            "masked float keys": BT * dims.d_ff * (e + (a if a != e else 0)),
            "block activations": _forward_tokens(dims, BT, e),
        })
    if stage == "keys":
        width = edit.prompt_tokens + edit.prefix_tokens
        rows = max(edit.templates, (edit.key_rows // edit.templates) * edit.templates)
        rows = min(rows, edit.n_requests * edit.templates)
        tokens = rows * width
        return StageMemory(stage, weights, {
            "weights": weights,
            "captured W_out inputs": S * tokens * dims.d_ff * e,
            "block activations": _forward_tokens(dims, tokens, e),
            "keys (host)": S * edit.n_requests * dims.d_ff * 4 * 2,
        })
    if stage == "solve":
        s = _DTYPE_BYTES[edit.solve_dtype]
        n = edit.n_requests
        return StageMemory(stage, weights, {
            "weights": weights,
            "system and LU factor": 2 * dims.d_ff ** 2 * s,
            "statistics copy": dims.d_ff ** 2 * 4,
            "delta": dims.d * dims.d_ff * s,
            "key and residual block": min(n, 4096) * (3 * dims.d_ff * s + dims.d * 4),
        })
    if stage == "evaluation":
        width = edit.prompt_tokens + edit.target_tokens
        pairs = edit.eval_batch
        # pairs are sorted by length, so one batch holds the longest ones; their targets run above the mean
        scored = math.ceil(1.5 * pairs * edit.mean_target_tokens)
        return StageMemory(stage, weights, {
            "weights": weights,
            "hidden states": pairs * width * dims.d * e * 2,
            "block activations": _forward_tokens(dims, pairs * width, e),
            "log-softmax at scored tokens": scored * dims.vocab * (e + 4),
        })
    if stage == "targets":
        n = min(edit.n_requests, edit.target_batch)
        rows = n * (edit.templates + 1)
        P = edit.prefix_tokens + edit.prompt_tokens
        Sfx = edit.target_tokens + 4
        after = dims.n_layers - 1 - max(edit.layers)
        scored = int(n * edit.templates * edit.mean_target_tokens)
        return StageMemory(stage, weights, {
            "weights": weights,
            "prefix KV cache": 2 * rows * (P + Sfx) * 2 * dims.kv_dim * dims.n_layers * e,
            "suffix activations for backward": rows * Sfx * (after + 1) * _saved_per_token(dims, e, frozen=True),
            "suffix forward": _forward_tokens(dims, rows * Sfx, e),
            # float32 log-softmax, its gradient and half as much again for the KL terms' exp and products
            "log-probabilities with gradients": (scored + 2 * n) * dims.vocab * 4 * 5 // 2,
        })
    raise ConfigError(f"memory plan: stage {stage!r} is unknown; stages: {', '.join(STAGES)}")


def _training(dims: ModelDims, t: TrainSetting) -> StageMemory:
    e = dims.elt
    N = max(1, t.devices)
    act_elt = 2 if t.autocast_bf16 or t.param_dtype in ("bfloat16", "float16") else 4
    weights = dims.n_params * e // N
    pe = _DTYPE_BYTES[t.param_dtype]
    grads = t.trainable * pe // N
    if t.optimizer == "adamw8bit":
        optim = t.trainable * 2 // N + t.trainable // 256 * 8 // N       # two 8-bit states, block scales
    else:
        optim = t.trainable * (8 if t.master_weights or pe == 4 else 2 * pe) // N
    master = t.trainable * 4 // N if t.master_weights else 0
    BT = t.micro_batch * t.seq_len
    per_tok = _saved_per_token(dims, act_elt)
    if t.gradient_checkpointing:
        acts = t.layers_trained * BT * dims.d * act_elt + BT * per_tok
    else:
        acts = t.layers_trained * BT * per_tok
    # autocast keeps a bfloat16 copy of every float32 weight the forward pass uses until backward frees it
    casts = (dims.n_params - dims.embed_params) * 2 // (N if t.trainable else 1) \
        if t.autocast_bf16 and pe == 4 else 0
    N_pos = t.micro_batch * t.labelled_tokens
    logits = N_pos * dims.vocab * (act_elt + 4 * 2)
    # foreach AdamW (torch's default on CUDA) holds temporaries the size of the trainable parameters during
    # the step; the per-tensor steps (master weights, 8-bit AdamW) only a few of the largest tensor
    largest = max(dims.embed_params, dims.unembed_params, dims.d * dims.d_ff)
    per_tensor = t.master_weights or t.optimizer == "adamw8bit"
    step_tmp = (2 * largest * 4 if per_tensor else t.trainable * pe) // N
    forward_peak = acts + t.attention_matrices + logits + casts
    step_peak = grads + step_tmp
    parts = {"weights": weights, "optimizer state": optim}
    if master:
        parts["master weights"] = master
    if forward_peak >= step_peak:
        parts.update({"activations": acts, "logits": logits})
        if t.attention_matrices:
            parts["eager attention matrices"] = t.attention_matrices
        if casts:
            parts["autocast weight copies"] = casts
        if grads:
            # When the backward pass starts, the gradients of the unembedding and the last blocks appear while
            # most activations are still held: about a quarter of all gradients (measured on the embedded model).
            parts["gradients (first in backward)"] = grads // 4
    else:
        parts.update({"gradients": grads, "optimizer step temporaries": step_tmp})
    resident = weights + optim + master
    return StageMemory("training", resident, parts)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StageVerdict:
    stage: str
    memory: StageMemory
    fits: bool
    advice: str = ""                 # the setting that would make it fit ("" when it fits or nothing does)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "peak_bytes": self.memory.peak, "peak": fmt_gib(self.memory.peak),
                "fits": self.fits, "advice": self.advice,
                "parts": {k: fmt_gib(v) for k, v in self.memory.parts.items()}}


@dataclass(frozen=True)
class MemoryPlan:
    model: ModelDims
    device_bytes: int
    usable_bytes: int
    verdicts: tuple[StageVerdict, ...]

    @property
    def fits(self) -> bool:
        return all(v.fits for v in self.verdicts)

    def failing(self) -> list[StageVerdict]:
        return [v for v in self.verdicts if not v.fits]

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "device": fmt_gib(self.device_bytes),
                "usable": fmt_gib(self.usable_bytes), "fits": self.fits,
                "stages": [v.to_dict() for v in self.verdicts]}

    def check(self, where: str = "") -> None:
        """Raise MemoryPlanError naming every stage that does not fit, with its peak and advice."""
        bad = self.failing()
        if bad:
            lines = [f"{v.stage}: needs {fmt_gib(v.memory.peak)}" + (f"; {v.advice}" if v.advice else
                                                                       "; no setting of this plan fits it")
                     for v in bad]
            raise MemoryPlanError(f"{where or self.model.name}: {len(bad)} stage(s) do not fit "
                                  f"{fmt_gib(self.usable_bytes)} usable of {fmt_gib(self.device_bytes)} "
                                  f"(memory plan, before loading the model): " + "; ".join(lines)
                                  + ". `--dry-run` prints the whole plan")


def plan_memory(dims: ModelDims, device_bytes: int, *, edit: EditSetting | None = None,
                train: TrainSetting | None = None, headroom: float = HEADROOM) -> MemoryPlan:
    """Predict every stage the settings name (edit: statistics..evaluation; train: training) against a device
    of `device_bytes`, keeping `headroom` of it free; each stage that does not fit gets the first setting
    (in the order listed in `_advise`) that would make it fit."""
    usable = int(device_bytes * (1 - headroom))
    verdicts = []
    stages = ([s for s in STAGES if s != "training"] if edit is not None else []) + (["training"] if train else [])
    for stage in stages:
        mem = stage_memory(dims, stage, edit=edit, train=train)
        fits = mem.peak <= usable
        advice = "" if fits else _advise(dims, stage, usable, edit, train)
        verdicts.append(StageVerdict(stage, mem, fits, advice))
    return MemoryPlan(dims, device_bytes, usable, tuple(verdicts))


def _advise(dims: ModelDims, stage: str, usable: int, edit: EditSetting | None, train: TrainSetting | None) -> str:
    """The first single change (or combination, for training) that brings the stage under `usable`."""
    def fits(d=dims, e=edit, t=train) -> bool:
        return stage_memory(d, stage, edit=e, train=t).peak <= usable

    if dims.dtype == "float32" and fits(replace(dims, dtype="bfloat16")) and stage != "training":
        return "load the model in bfloat16 (--dtype bfloat16)"
    if stage == "statistics":
        for b in (8, 4, 2, 1):
            if b < edit.stats_batch and fits(e=replace(edit, stats_batch=b)):
                return f"statistics batch size {b} (grid: shared.statistics.batch_size)"
    if stage == "targets":
        for b in (64, 32, 16, 8, 4, 2, 1):
            if b < min(edit.n_requests, edit.target_batch) and fits(e=replace(edit, target_batch=b)):
                return f"E3 batch of {b} requests (editor field target_batch_size)"
    if stage == "evaluation":
        for b in (16, 8, 4, 2, 1):
            if b < edit.eval_batch and fits(e=replace(edit, eval_batch=b)):
                return f"evaluation batch size {b}"
    if stage == "training":
        options = []
        t = train
        if not t.gradient_checkpointing:
            options.append(("gradient checkpointing (--gradient-checkpointing)", replace(t, gradient_checkpointing=True)))
        for mb in (8, 4, 2, 1):
            if mb < t.micro_batch:
                options.append((f"micro-batch {mb} with grad_accum x{t.micro_batch // mb} (same effective batch)",
                                replace(t, micro_batch=mb)))
        for name, opt in options:
            if fits(t=opt):
                return name
        # combinations, cheapest first
        ck = replace(t, gradient_checkpointing=True)
        for mb in (8, 4, 2, 1):
            if mb < t.micro_batch and fits(t=replace(ck, micro_batch=mb)):
                return (f"gradient checkpointing and micro-batch {mb} with grad_accum x{t.micro_batch // mb}")
        low = replace(ck, optimizer="adamw8bit", master_weights=False, param_dtype="bfloat16",
                      autocast_bf16=True)
        for mb in (t.micro_batch, 8, 4, 2, 1):
            if mb <= t.micro_batch and fits(d=replace(dims, dtype="bfloat16"), t=replace(low, micro_batch=mb)):
                return (f"bfloat16 weights with 8-bit AdamW (--dtype bfloat16 --optimizer adamw8bit), gradient "
                        f"checkpointing, micro-batch {mb}")
        for n in (2, 4, 8):
            if fits(t=replace(ck, devices=n, micro_batch=min(t.micro_batch, 4))):
                return f"shard over {n} GPUs (--devices {n}) with gradient checkpointing"
    return ""


def render(plan: MemoryPlan) -> list[str]:
    """Human-readable lines: one per stage (peak, fits, the largest parts, advice)."""
    out = [f"memory plan for {plan.model.name} ({plan.model.n_params / 1e9:.2f}B parameters, {plan.model.dtype}) "
           f"on {fmt_gib(plan.device_bytes)} ({fmt_gib(plan.usable_bytes)} usable):"]
    for v in plan.verdicts:
        parts = sorted(v.memory.parts.items(), key=lambda kv: -kv[1])[:4]
        mark = "fits" if v.fits else "DOES NOT FIT"
        out.append(f"  {v.stage:<11} {fmt_gib(v.memory.peak):>11}  {mark:<12} "
                   + ", ".join(f"{k} {fmt_gib(b)}" for k, b in parts)
                   + (f"  -> {v.advice}" if v.advice else ""))
    return out


def device_memory(device: str, explicit: str | int | None = None) -> int | None:
    """Bytes of the device the plan is checked against: `explicit` (--memory) if given, else a CUDA device's
    total memory (torch.cuda.mem_get_info; no model needed); None on the CPU without --memory."""
    if explicit is not None:
        return parse_memory(explicit)
    if str(device).startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            dev = torch.device(device if str(device).startswith("cuda") else "cuda")
            return int(torch.cuda.mem_get_info(dev)[1])
    return None


__all__ = ["ACT", "EditSetting", "GIB", "HEADROOM", "MemoryPlan", "MemoryPlanError", "ModelDims", "STAGES",
           "StageMemory", "StageVerdict", "TrainSetting", "device_memory", "fmt_gib", "parse_memory", "plan_memory",
           "render", "stage_memory"]
