"""Deliberately plain implementations of FT-M, GRACE and MEND, to check the editors (edit/ft.py, edit/grace.py,
edit/mend.py) against. Used only by tests.

Everything here trades speed for obviousness: one request at a time, no padding, every loss read from the
full `model(...).logits`, hooks written out here (not core/hooks.py, not core/module_edit.py), the MEND
network's arithmetic written out from its tensors. Shared with the editors only: the tokenisation
conventions (core/tokens.py: prompt with special tokens, target with its leading space), since both must see
the same tokens, and for MEND the trained network's tensors (the thing being applied).

Sources: FT-M from zjunlp/EasyEdit `easyeditor/models/ft/ft_main.py` `execute_ft`; GRACE from
thartvigsen/grace `grace/editors/grace.py` (as ported to EasyEdit `easyeditor/models/grace/GRACE.py`
`GRACEAdapter.forward`); MEND from eric-mitchell/mend `algs/mend.py` (`GradientTransform.forward`,
`MEND.edit`), `hooks.py` (input and output-gradient hooks), `nn.py` (`IDMLP`/`LRLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from editdecay.core.arch import get_module
from editdecay.core.request import EditRequest
from editdecay.core.tokens import encode_prompt, encode_target


def _ids(tokenizer, r: EditRequest) -> tuple[torch.Tensor, int, int]:
    """(input ids (1, T) of prompt + target, number of prompt tokens, number of target tokens)."""
    p, t = encode_prompt(tokenizer, r.rewrite_prompt), encode_target(tokenizer, r.target_new)
    return torch.tensor([p + t]), len(p), len(t)


def request_nll(model, tokenizer, r: EditRequest) -> torch.Tensor:
    """Mean NLL of the target tokens given the prompt, from the full logits of one unpadded sequence."""
    ids, n_p, n_t = _ids(tokenizer, r)
    logits = model(input_ids=ids).logits[0].float()                       # (T, V)
    lp = torch.log_softmax(logits[n_p - 1:n_p - 1 + n_t], dim=-1)         # position j predicts token j + 1
    return -lp[torch.arange(n_t), ids[0, n_p:]].mean()


# --------------------------------------------------------------------------- FT-M

def reference_ft(model, tokenizer, weight_name: str, requests: list[EditRequest], *, lr: float, num_steps: int,
                 per_step: int, stop_loss: float = 1e-2, norm_constraint: float | None = None) -> torch.Tensor:
    """EasyEdit `execute_ft` (objective target_new): Adam on one weight, chunks of `per_step` requests, a step
    skipped below `stop_loss`, passes stopped when the mean loss is below it. Returns the weight's change
    (float32); the model's weight is put back."""
    w = get_module(model, weight_name).weight
    start = w.detach().clone()
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    chunks = [requests[i:i + per_step] for i in range(0, len(requests), per_step)]
    for _ in range(num_steps):
        total = 0.0
        for chunk in chunks:
            opt.zero_grad()
            loss = torch.stack([request_nll(model, tokenizer, r) for r in chunk]).mean()
            total += float(loss) * len(chunk)
            if float(loss) >= stop_loss:
                loss.backward()
                opt.step()
            if norm_constraint is not None:
                with torch.no_grad():
                    w.copy_(torch.max(torch.min(w, start + norm_constraint), start - norm_constraint))
        if total / len(requests) < stop_loss:
            break
    delta = w.detach() - start
    with torch.no_grad():
        w.copy_(start)
    for p, flag in saved:
        p.requires_grad_(flag)
    return delta


# --------------------------------------------------------------------------- GRACE

@dataclass
class ReferenceCodebook:
    keys: list[torch.Tensor] = field(default_factory=list)       # (d_in,) each
    values: list[torch.Tensor] = field(default_factory=list)     # (d_out,) each
    eps: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


class _Replace:
    """Forward hook on the host: where the input is within a key's radius (nearest key), the output is that key's
    value; `values` may be a list of tensors that require grad."""

    def __init__(self, book: ReferenceCodebook):
        self.book = book
        self.active = True

    def __call__(self, module, args, output):
        if not self.active or not self.book.keys:
            return output
        x = args[0][0]                                         # (T, d_in), batch of one
        rows = []
        for t in range(x.shape[0]):
            d = [float(torch.linalg.vector_norm(x[t].float() - k)) for k in self.book.keys]
            i = min(range(len(d)), key=d.__getitem__)
            rows.append(self.book.values[i].to(output.dtype) if d[i] <= self.book.eps[i] else output[0, t])
        return torch.stack(rows)[None]


def reference_grace(model, tokenizer, host_name: str, batches: list[list[EditRequest]], *, epsilon: float,
                    steps: int, lr: float, seed: int) -> ReferenceCodebook:
    """GRACE, batch after batch: insert each request's key (the host's input at the last prompt token) by
    GRACE's rules, cold values drawn from U[0, 1) in request order, then Adam on the batch's values over the
    mean target NLL of its requests. The model is left unchanged (the hook is removed)."""
    host = get_module(model, host_name)
    d_out = (host.weight.shape[0] if isinstance(host, nn.Linear) else host.weight.shape[1])
    book = ReferenceCodebook()
    gen = torch.Generator().manual_seed(seed)
    replace = _Replace(book)
    handle = host.register_forward_hook(replace)
    seen: dict = {}
    capture = host.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach()))
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for batch in batches:
            rows = []
            for r in batch:
                ids, n_p, _ = _ids(tokenizer, r)
                replace.active = False
                with torch.no_grad():
                    model(input_ids=ids[:, :n_p])
                replace.active = True
                key = seen["x"][0, n_p - 1].float()
                value = torch.rand(d_out, generator=gen)
                if not book.keys:
                    rows.append(_add(book, key, value, epsilon, r.target_new))
                    continue
                d = [float(torch.linalg.vector_norm(key - k)) for k in book.keys]
                j = min(range(len(d)), key=d.__getitem__)
                if d[j] > epsilon + book.eps[j]:
                    rows.append(_add(book, key, value, epsilon, r.target_new))
                elif book.labels[j] != r.target_new:
                    new = _add(book, key, value, epsilon, r.target_new)
                    book.eps[j], book.eps[new] = d[j] / 2 - 1e-5, d[j] / 2
                    rows.append(new)
                else:
                    book.eps[j] = max(book.eps[j], d[j])
                    rows.append(j)
            chosen = sorted(set(rows))
            params = [book.values[i].clone().requires_grad_(True) for i in chosen]
            for i, p in zip(chosen, params):
                book.values[i] = p
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.stack([request_nll(model, tokenizer, r) for r in batch]).mean()
                loss.backward()
                opt.step()
            for i in chosen:
                book.values[i] = book.values[i].detach()
    finally:
        handle.remove()
        capture.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
    return book


def _add(book: ReferenceCodebook, key, value, eps, label) -> int:
    book.keys.append(key)
    book.values.append(value)
    book.eps.append(float(eps))
    book.labels.append(label)
    return len(book.keys) - 1


# --------------------------------------------------------------------------- MEND

def gradient_factors(model, tokenizer, names: list[str], requests: list[EditRequest]):
    """Per weight: (inputs u (N, d_in), output gradients delta (N, d_out)) of the mean target NLL of `requests`,
    from forward and full backward hooks (mend hooks.py), one unpadded request at a time. Also the weights'
    autograd gradients, to check that sum_t delta_t u_t^T is the gradient."""
    us = {n: [] for n in names}
    ds = {n: [] for n in names}
    handles = []
    for n in names:
        m = get_module(model, n)
        handles.append(m.register_forward_hook(lambda mod, a, o, n=n: us[n].append(a[0][0].detach())))
        handles.append(m.register_full_backward_hook(lambda mod, gi, go, n=n: ds[n].append(go[0][0].detach())))
    weights = [get_module(model, n).weight for n in names]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = {n: torch.zeros_like(w) for n, w in zip(names, weights)}
        for r in requests:
            loss = request_nll(model, tokenizer, r) / len(requests)
            g = torch.autograd.grad(loss, weights)
            for n, gi in zip(names, g):
                grads[n] += gi
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
    return {n: (torch.cat(us[n]).float(), torch.cat(ds[n]).float()) for n in names}, grads


def transform(net, name: str, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MEND's g on one weight's rows, from the network's tensors: drop rows where a factor is zero, standardise
    with the running mean and (k - 1)-variance, then each layer x <- relu((x V^T U^T + b) * s_mode + t_mode) + x."""
    keep = (u != 0).any(-1) & (d != 0).any(-1)
    u, d = u[keep], d[keep]
    d_in, d_out, _ = net.weights[name]
    names_of_shape = [n for n, w in net.weights.items() if (w[0], w[1]) == (d_in, d_out)]
    mode = names_of_shape.index(name)
    tf = net.transforms[f"{d_in}x{d_out}"]
    k = float(tf.k)
    x = torch.cat([(u - tf.u_mean) / ((tf.u_s / (k - 1)).sqrt() + 1e-7),
                   (d - tf.v_mean) / ((tf.v_s / (k - 1)).sqrt() + 1e-7)], dim=1)
    for layer in tf.layers:
        h = x @ layer.v.T @ layer.u.T + layer.bias
        x = torch.relu(h * layer.mode_scale[mode] + layer.mode_shift[mode]) + x
    return x[:, :d_in], x[:, d_in:]


def reference_mend(model, tokenizer, net, names: list[str], requests: list[EditRequest], *, per_step: int,
                   lr_scale: float = 1.0, conv1d: bool = False) -> dict[str, torch.Tensor]:
    """MEND.edit, `per_step` requests at a time, each step on the model the previous steps edited:
    W += lr_scale * eta_W * sum_t delta~_t u~_t^T (the transpose for Conv1D). Returns each weight's total
    change; the model's weights are put back."""
    start = {n: get_module(model, n).weight.detach().clone() for n in names}
    order = list(net.weights)
    for i in range(0, len(requests), per_step):
        factors, _ = gradient_factors(model, tokenizer, names, requests[i:i + per_step])
        with torch.no_grad():
            for n in names:
                ut, dt = transform(net, n, *factors[n])
                step = ut.T @ dt if conv1d else dt.T @ ut
                get_module(model, n).weight.add_(lr_scale * net.edit_lrs[order.index(n)] * step)
    out = {}
    with torch.no_grad():
        for n in names:
            w = get_module(model, n).weight
            out[n] = w.detach() - start[n]
            w.copy_(start[n])
    return out
