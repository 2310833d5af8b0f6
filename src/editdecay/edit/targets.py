"""Target values z_i = h_i + delta_i (docs/METHODS.md E3), optimised for many requests at once.

Speed: a step only needs the positions from the subject's last token onward
(earlier positions cannot see delta, causal attention). Each prompt's prefix (the
tokens before the subject's last token) is run once, without gradient, into a
KV cache; every optimisation step then runs only the short suffix
[subject_last, rest of prompt, target tokens[:-1]] on top of that cache, and
unembeds only the positions whose logits are scored. All requests of a batch are
optimised together, one delta per request: the total loss is the sum of the
per-request losses and Adam is element-wise, so each delta follows exactly the
trajectory it would follow alone (tested against `tests/reference.py`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editdecay.core.arch import arch_for, get_module, unembed_module
from editdecay.core.devices import input_device, module_device
from editdecay.core.hooks import edit_output
from editdecay.core.memory import ModelShape, plan_batch_size, run_batched
from editdecay.core.request import EditRequest
from editdecay.core.tokens import encode_subject_prompt, encode_target, pad_id
from editdecay.edit.context import ContextTemplates


@dataclass(frozen=True)
class TargetSettings:
    """E3 hyperparameters (names as in the MEMIT reference)."""

    layer: int                      # l*: the last edited layer; delta is added to its block output
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    batch_size: int | None = None   # requests optimised together; None: from free memory (CPU: `cpu_batch_size`)


TARGETS_CPU_BATCH = 128          # most requests of one E3 batch on the CPU
TARGETS_CPU_BUDGET = 2 * 2 ** 30  # most bytes an E3 batch plans to add on the CPU (a 100-request zsRE batch, ~15 GB,
                                  # starved a 24 GB host shared by other work). Measured on the
                                  # embedded model: 18 zsRE requests (3 GiB planned) peaked at 4.6 GiB resident with the
                                  # model and libraries; 2 GiB plans 9 (predicted ~3 GiB resident, not measured)


@dataclass
class TargetResult:
    z: torch.Tensor          # (n, d) float32 target values at layer l*
    h: torch.Tensor          # (n, d) float32 block-l* output at the subject's last token, bare prompt
    loss: list[float]        # final per-request loss
    steps: list[int]         # optimisation steps each request used


@dataclass
class _Row:
    req: int                 # request index within the batch
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]  # [subject_last, *rest, *target[:-1]]
    target: tuple[int, ...]  # scored target tokens (empty for the KL row)
    first: int               # suffix index whose logits predict target[0] (KL row: 0)
    kind: str                # "nll" or "kl"
    bare: bool = False       # the template "{}" without a context prefix (h_i is read here)


def flat_templates(templates: ContextTemplates | tuple[str, ...]) -> tuple[str, ...]:
    """E3 sees every rendered prompt with equal weight: the templates of all context types, in order."""
    return templates.flat if isinstance(templates, ContextTemplates) else tuple(templates)


def _rows(tokenizer, requests: list[EditRequest], templates: ContextTemplates | tuple[str, ...],
          kl_prompt: str) -> list[_Row]:
    templates = flat_templates(templates)
    rows = []
    for i, r in enumerate(requests):
        tgt = encode_target(tokenizer, r.target_new)
        for t_idx, tmpl in enumerate(templates):
            sp = encode_subject_prompt(tokenizer, tmpl.replace("{}", r.prompt), r.subject)
            rows.append(_Row(i, sp.prefix, (sp.subject_last, *sp.rest, *tgt[:-1]), tuple(tgt), len(sp.rest),
                             "nll", bare=(tmpl == "{}")))
        # E3's KL term uses the next-token distribution at the subject's last token only,
        # so the KL row's suffix is that single token.
        sp = encode_subject_prompt(tokenizer, kl_prompt, r.subject)
        rows.append(_Row(i, sp.prefix, (sp.subject_last,), (), 0, "kl"))
    return rows


class _PrefixBatch:
    """Left-padded prefixes in a KV cache + right-padded suffixes, positions explicit.

    `select(keep)` drops rows (requests that finished optimising) from the cache and the
    suffixes in place, so later steps cost less; the prefixes are never recomputed.
    """

    def __init__(self, model, rows: list[_Row], pad: int):
        device = input_device(model)
        self.model, self.rows = model, rows
        P = max(1, max(len(r.prefix) for r in rows))
        S = max(len(r.suffix) for r in rows)
        B = len(rows)
        pre_ids = torch.full((B, P), pad, dtype=torch.long)
        pre_mask = torch.zeros((B, P), dtype=torch.long)
        suf_ids = torch.full((B, S), pad, dtype=torch.long)
        suf_mask = torch.zeros((B, S), dtype=torch.long)
        suf_pos = torch.zeros((B, S), dtype=torch.long)
        pre_pos = torch.zeros((B, P), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.prefix)
            if n:
                pre_ids[b, P - n:] = torch.tensor(r.prefix)
                pre_mask[b, P - n:] = 1
                pre_pos[b, P - n:] = torch.arange(n)
            suf_ids[b, :len(r.suffix)] = torch.tensor(r.suffix)
            suf_mask[b, :len(r.suffix)] = 1
            suf_pos[b] = n + torch.arange(S)
        self.P = P
        self.suf_ids, self.suf_pos = suf_ids.to(device), suf_pos.to(device)
        self.mask = torch.cat([pre_mask, suf_mask], 1).to(device)   # (B, P + S)
        base = model.base_model
        # transformers 5 renamed `past_key_values` to `cache`; use whichever this version takes.
        self.cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = base(input_ids=pre_ids.to(device), attention_mask=pre_mask.to(device),
                       position_ids=pre_pos.to(device), use_cache=True)
        self.cache = getattr(out, "cache", None) or out.past_key_values

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (indices into the current row list)."""
        idx = torch.tensor(keep, device=self.suf_ids.device)
        # CPU indices: the cache's layers may sit on several devices (a model spread over GPUs).
        self.cache.batch_select_indices(torch.tensor(keep))
        self.suf_ids, self.suf_pos, self.mask = self.suf_ids[idx], self.suf_pos[idx], self.mask[idx]
        self.rows = [self.rows[i] for i in keep]

    def hidden(self) -> torch.Tensor:
        """Final hidden states (after the final norm) of the suffixes, (B, S, d)."""
        out = self.model.base_model(input_ids=self.suf_ids, attention_mask=self.mask, position_ids=self.suf_pos,
                                    use_cache=True, **{self.cache_kw: self.cache})
        # Drop this step's suffix entries; the prefix stays cached. (A negative crop removes that
        # many trailing tokens in every transformers version that has Cache.crop.)
        self.cache.crop(-self.suf_ids.shape[1])
        _detach_cache(self.cache)
        return out.last_hidden_state


@dataclass
class _Layout:
    """Index tensors that map the current rows to scored tokens and requests."""

    row_req: torch.Tensor       # (B,) request of each row
    g_row: torch.Tensor         # (G,) row of each scored target token
    g_pos: torch.Tensor         # (G,) suffix position whose logits predict it
    g_tok: torch.Tensor         # (G,) the token
    g_req: torch.Tensor         # (G,) its request
    g_weight: torch.Tensor      # (G,) 1 / (target length * templates of the request): NLL means (E3)
    kl_rows: torch.Tensor       # (K,) rows of KL prompts
    kl_req: torch.Tensor        # (K,) their requests

    @classmethod
    def of(cls, rows: list[_Row], device) -> "_Layout":
        templates: dict[int, int] = {}
        for r in rows:
            if r.kind == "nll":
                templates[r.req] = templates.get(r.req, 0) + 1
        g = [(b, r.first + j, tok, r.req, 1.0 / (len(r.target) * templates[r.req]))
             for b, r in enumerate(rows) if r.kind == "nll" for j, tok in enumerate(r.target)]
        kl = [(b, r.req) for b, r in enumerate(rows) if r.kind == "kl"]
        t = lambda xs, dt=torch.long: torch.tensor(xs, device=device, dtype=dt)  # noqa: E731
        return cls(t([r.req for r in rows]), t([x[0] for x in g]), t([x[1] for x in g]), t([x[2] for x in g]),
                   t([x[3] for x in g]), t([x[4] for x in g], torch.float32), t([x[0] for x in kl]),
                   t([x[1] for x in kl]))


def _detach_cache(cache) -> None:
    """Cut the cropped prefix entries loose from this step's graph (they are views of a cat)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:                      # transformers >= 4.56
        for layer in layers:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    else:                                       # older DynamicCache
        cache.key_cache = [k.detach() for k in cache.key_cache]
        cache.value_cache = [v.detach() for v in cache.value_cache]


def compute_targets(model, tokenizer, requests: list[EditRequest], templates: ContextTemplates | tuple[str, ...],
                    cfg: TargetSettings, *, progress: bool = True) -> TargetResult:
    """Optimise one delta per request (E3), `cfg.batch_size` requests at a time (None: as many as the
    device's free memory holds by `_bytes_per_request`; on the CPU `cpu_batch_size`, from the memory plan). A batch that runs out
    of memory is redone at half the size; at one request, DeviceMemoryError names the stage (E3 targets).
    z and h come back as float32 CPU tensors.

    The NLL is a plain mean over all rendered prompts (every template of every context
    type weighs the same, as in memit `compute_z`), unlike E2's two-level key average.
    The model's requires_grad flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        parts = _all_batches(model, tokenizer, requests, templates, cfg, progress)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return TargetResult(
        z=torch.cat([p.z for p in parts]), h=torch.cat([p.h for p in parts]),
        loss=[x for p in parts for x in p.loss], steps=[x for p in parts for x in p.steps],
    )


def _bytes_per_request(model, tokenizer, requests, templates, cfg: TargetSettings) -> int:
    """Estimated device memory of one request in an E3 batch: its rows' suffix activations kept for the
    backward pass through the blocks after l*, their prefix KV cache (twice: a step concatenates), and the
    float32 logits (with gradients) at its scored tokens and KL position."""
    shape = ModelShape.of(model)
    rows = _rows(tokenizer, requests[:64], templates, cfg.kl_prompt)        # a sample bounds the sizes
    reqs = {r.req for r in rows}
    S = max(len(r.suffix) for r in rows)
    P = max(len(r.prefix) for r in rows)
    per_req_rows = len(rows) / max(1, len(reqs))
    scored = max(sum(len(r.target) for r in rows if r.req == i) for i in reqs) + 1
    after = shape.n_layers - cfg.layer
    return int(per_req_rows * S * shape.grad_token_bytes(after, P + S)
               + 2 * per_req_rows * (P + S) * shape.kv_token_bytes()
               + shape.logits_bytes(scored, grad=True) + 4 * shape.vocab)


def cpu_batch_size(model, tokenizer, requests, templates, cfg: TargetSettings,
                   available: int | None = None) -> int:
    """E3 requests per batch on the CPU, from the memory plan (core/memory_plan.py, stage "targets": prefix KV
    cache, suffix activations kept for the backward pass, log-probabilities with gradients, on the actual token
    lengths of `requests`): as many as fit min(TARGETS_CPU_BUDGET, MEMORY_FRACTION x `available`), within
    [1, TARGETS_CPU_BATCH]. `available`: bytes this process may use (default: its share of the host's available
    memory, core.memory.host_available_bytes, divided between the grid's parallel stage processes)."""
    from dataclasses import replace

    from editdecay.core.memory import MEMORY_FRACTION, host_available_bytes
    from editdecay.core.memory_plan import EditSetting, ModelDims, stage_memory

    dims = ModelDims.of_model(model)
    flat = templates if isinstance(templates, ContextTemplates) else ContextTemplates((tuple(templates),))
    setting = EditSetting.from_requests(tokenizer, requests[:64], flat, layers=(cfg.layer,))

    def peak(n: int) -> int:
        return stage_memory(dims, "targets", edit=replace(setting, n_requests=n, target_batch=n)).peak

    per_request = max(1, peak(2) - peak(1))          # every part of the transient grows linearly with the batch
    free = host_available_bytes() if available is None else available
    budget = min(TARGETS_CPU_BUDGET, MEMORY_FRACTION * free)
    return max(1, min(TARGETS_CPU_BATCH, len(requests), int(budget // per_request)))


def _all_batches(model, tokenizer, requests, templates, cfg, progress) -> list[TargetResult]:
    per_req = _bytes_per_request(model, tokenizer, requests, templates, cfg)
    device = input_device(model)
    # The CPU plan from host memory is the default where the device has no free-memory query (plan_batch_size uses
    # cpu_default only then); an explicit batch size, or a device's own free memory, takes precedence.
    cpu_default = TARGETS_CPU_BATCH
    if cfg.batch_size is None and device.type == "cpu":
        cpu_default = cpu_batch_size(model, tokenizer, requests, templates, cfg)
    size = plan_batch_size("E3 targets", n_items=len(requests), bytes_per_item=per_req, device=device,
                           explicit=cfg.batch_size, cpu_default=cpu_default)
    done = [0]

    def one(part):
        with tqdm(total=cfg.v_num_grad_steps, desc=f"target values {done[0] + len(part)}/{len(requests)}",
                  disable=not progress, leave=False) as bar:
            out = _optimise(model, tokenizer, part, templates, cfg, bar)
        done[0] += len(part)
        return out

    return run_batched("E3 targets", requests, one, batch_size=size, bytes_per_item=per_req,
                       device=input_device(model))


def _optimise(model, tokenizer, requests, templates, cfg: TargetSettings, bar=None) -> TargetResult:
    spec = arch_for(model)
    unembed = unembed_module(model)
    # Devices (a model may be spread over several): delta lives where block l* computes; losses where the
    # unembedding computes. On one device both are the same.
    block_dev = module_device(get_module(model, spec.block_name(cfg.layer)))
    device = module_device(unembed)
    rows = _rows(tokenizer, requests, templates, cfg.kl_prompt)
    n = len(requests)
    d = model.config.hidden_size
    batch = _PrefixBatch(model, rows, pad_id(tokenizer))
    lay = _Layout.of(batch.rows, device)
    row_req = lay.row_req.to(block_dev)                                                  # (B,) for the hook
    bare_rows = torch.tensor([b for b, r in enumerate(rows) if r.bare], device=block_dev)   # one per request

    delta = torch.zeros(n, d, device=block_dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    h_init = None
    kl_init = torch.zeros(n, 0)
    final_loss = torch.zeros(n)
    steps = torch.zeros(n, dtype=torch.long)
    for p in model.parameters():
        p.requires_grad_(False)

    def add_delta(h):  # h: (B, S, d) block-l* output of the suffixes; position 0 is the subject's last token
        nonlocal h_init
        if h_init is None:                                                              # first step: all rows
            h_init = h[bare_rows, 0].detach().float().clone()                          # (n, d)
        h = h.clone()
        h[:, 0] = h[:, 0] + delta[row_req].to(h.dtype)
        return h

    for it in range(cfg.v_num_grad_steps):
        with edit_output(model, spec.block_name(cfg.layer), add_delta):
            hidden = batch.hidden().to(device)                                           # (B, S, d)
        logp = torch.log_softmax(unembed(hidden[lay.g_row, lay.g_pos]).float(), -1)    # (G, V)
        tok_nll = -logp.gather(1, lay.g_tok[:, None]).squeeze(1) * lay.g_weight         # (G,)
        nll = torch.zeros(n, device=device).index_add(0, lay.g_req, tok_nll)            # (n,) mean over tokens, templates
        kl_logp = torch.log_softmax(unembed(hidden[lay.kl_rows, 0]).float(), -1)       # (K, V)
        if it == 0:
            kl_init = torch.zeros(n, kl_logp.shape[1], device=device)
            kl_init[lay.kl_req] = kl_logp.detach()
        kl_each = (kl_logp.exp() * (kl_logp - kl_init[lay.kl_req])).sum(-1)            # KL(new || orig), (K,)
        kl = cfg.kl_factor * torch.zeros(n, device=device).index_add(0, lay.kl_req, kl_each)
        wd = (cfg.v_weight_decay * delta.norm(dim=1) / h_init.norm(dim=1) ** 2).to(device)
        loss = nll + kl + wd                                                             # (n,); valid where active
        with torch.no_grad():
            was = active.clone()
            steps[was.cpu()] = it
            final_loss[was.cpu()] = loss.detach().cpu()[was.cpu()]
            active &= loss.detach() >= cfg.early_stop_loss
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(active.sum()), loss=f"{float(loss.detach()[was].mean()):.3f}")
        if not bool(active.any()) or it == cfg.v_num_grad_steps - 1:
            break
        frozen = delta.detach()[~active.to(block_dev)].clone()
        opt.zero_grad(set_to_none=False)
        (loss * active).sum().backward()
        opt.step()
        with torch.no_grad():
            delta[~active.to(block_dev)] = frozen        # finished requests keep their delta
            max_norm = cfg.clamp_norm_factor * h_init.norm(dim=1, keepdim=True)          # (n, 1)
            scale = torch.clamp(max_norm / delta.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
            delta.mul_(scale)
        if not bool(active.all().item()) and bool((~active[lay.row_req]).any()):
            # Finished requests leave the batch; their rows are not computed again.
            keep = active[lay.row_req].nonzero().squeeze(1).tolist()
            batch.select(keep)
            lay = _Layout.of(batch.rows, device)
            row_req = lay.row_req.to(block_dev)
    z = (h_init + delta.detach()).float()
    return TargetResult(z=z.cpu(), h=h_init.cpu(), loss=final_loss.tolist(), steps=(steps + 1).tolist())
